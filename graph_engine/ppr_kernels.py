"""The numba kernels of forward push (``graph_engine.ppr`` states the push rule, its proof and the API).

Layout. ``prange`` over worker threads; each worker owns a record array rt[n, 4] of float32,
(r(v), d(v), p(v), 1/W(v)) per node -- 16 bytes, so the one random access per edge visit touches one cache
line, and d(v) reads +inf while v is queued (the in-queue flag) -- plus a FIFO ring buffer and a
touched-node list, and walks the sources w, w + T, w + 2T, ... (interleaved, so expensive sources spread
over the workers). The push is bound by memory latency (one cache miss per touched node), so the record is
kept small: float32 carries r and p to ~1e-7 relative, far below the push error eps * D(v) at the budgets
used (B <= 1e6), and halves the scratch that competes with the CSR for the caches. The misses are issued
early with ``llvm.prefetch`` (the record 16 entries ahead in a row, the next popped row, the indptr of the
pop after): the visit loop's stores otherwise fill the out-of-order window while one miss is outstanding.
The scratch arrives clean (``init_scratch``) and after each source only the entries it touched are reset,
so a call costs O(its pushes + its sources), never O(n).
Top-k is a partial selection over the touched set (a size-k heap, one pass per block), giving the k
winners by (score desc, dense index asc) -- ties go to the smaller dense index, so results never depend on
the thread count or on what earlier calls left in the scratch. Nothing here runs Python per edge or per
source.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

#: Entries ahead of the current one whose node record is prefetched in a row (see ``_push_one``).
_PREFETCH_AHEAD = 16


@intrinsic
def _prefetch(typingctx, arr, i):
    """Hint the CPU to load the cache line of ``arr[i]`` (``arr[i, 0]`` for a 2-d array): LLVM's
    ``llvm.prefetch`` (read, high locality). It never faults and nothing waits on it."""
    sig = types.void(arr, i)

    def codegen(context, builder, signature, args):
        aryty, ity = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = [context.cast(builder, args[1], ity, types.intp)]
        idx += [context.get_constant(types.intp, 0)] * (aryty.ndim - 1)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx, wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8"
        )
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def weighted_out_degree_kernel(indptr, weights):
    """float64 [n]: W(u), summed in float64 (``graph_engine.ppr.weighted_out_degree`` canonicalises)."""
    n = indptr.shape[0] - 1
    out = np.zeros(n, dtype=np.float64)
    for u in range(n):
        acc = 0.0
        for e in range(indptr[u], indptr[u + 1]):
            acc += weights[e]
        out[u] = acc
    return out


@njit(cache=True, nogil=True)
def _push_one(indptr, ent_idx, ent_w, wcol, unit, s, restart_prob, eps, rt, queue, touched):
    """Forward push from source s. Returns (number of touched nodes, edge visits).

    ``rt[v] = (r(v), d(v), p(v), 1 / W(v))``, one 16-byte float32 record per node: the hot loop's one
    random access per visited entry reads one cache line, and a pop reads W(u) from the record it updates
    anyway. Entry e of the CSR is ``(ent_idx[e, 0], ent_w[e, wcol])``: with interleaved (index, weight)
    pairs a row is one sequential run (one miss per row, not two). v is pushable when r(v) >= eps * d(v);
    d(v) reads +inf while v waits in the FIFO: that is the in-queue flag (a node is queued at most once, no
    membership scans, no flag array). A node is new (goes on the ``touched`` list) when r(v) = p(v) = 0.
    The list and FIFO updates are branch-free (write the slot, advance by the condition): a mispredicted
    branch per entry would stall while the record's cache miss is still outstanding. Both hold n + 1
    slots, so the unconditional write never lands on a live entry. ``unit``: all weights 1 (``ent_w`` is
    not read). Touched nodes (s first) keep their values until ``_reset``.
    """
    cap = queue.shape[0]
    keep = 1.0 - restart_prob
    inf = np.float32(np.inf)
    rt[s, 0] = 1.0
    touched[0] = s
    nt = 1
    # the source is pushed once whatever d(s): its out-neighbours are always touched (non-empty result)
    queue[0] = s
    rt[s, 1] = inf
    head = 0
    size = 1
    visits = 0
    while size > 0:
        u = queue[head]
        head += 1
        if head == cap:
            head = 0
        size -= 1
        if size > 1:  # the FIFO knows the next pops: their indptr, then their row, arrive ahead of use
            _prefetch(indptr, queue[head + 1 if head + 1 < cap else 0])
        if size > 0:
            _prefetch(ent_idx, indptr[queue[head]])
        lo = indptr[u]
        hi = indptr[u + 1]
        for e in range(lo, min(hi, lo + _PREFETCH_AHEAD)):
            _prefetch(rt, ent_idx[e, 0])
        rt[u, 1] = hi - lo  # out of the queue: d(u) again
        ru = rt[u, 0]
        rt[u, 2] += restart_prob * ru
        rt[u, 0] = 0.0
        if hi == lo:
            continue  # no out-entries: the walk's remaining mass leaves (zero row of P)
        c = keep * ru * rt[u, 3]  # (1 - alpha) r(u) / W(u): the row of P = D_W^-1 A
        visits += hi - lo
        for e in range(lo, hi):
            if e + _PREFETCH_AHEAD < hi:
                _prefetch(rt, ent_idx[e + _PREFETCH_AHEAD, 0])
            v = ent_idx[e, 0]
            r0 = rt[v, 0]
            touched[nt] = v
            nt += (r0 == 0.0) & (rt[v, 2] == 0.0)
            rv = np.float32(r0 + (c if unit else c * ent_w[e, wcol]))
            rt[v, 0] = rv
            dv = rt[v, 1]
            due = rv >= eps * dv  # eps * d(v), a threshold independent of the counts
            tail = head + size
            if tail >= cap:
                tail -= cap
            queue[tail] = v
            size += due
            rt[v, 1] = inf if due else dv
    return nt, visits


@njit(cache=True, nogil=True)
def _reset(rt, touched, nt):
    # d(v) is already restored (every queued node was popped): zero only what this source touched
    for i in range(nt):
        v = touched[i]
        rt[v, 0] = 0.0
        rt[v, 2] = 0.0


@njit(cache=True, nogil=True, inline="always")
def _worse(sa, ia, sb, ib):
    """(score sa, index ia) ranks below (sb, ib): lower score, or equal score and larger index."""
    return sa < sb or (sa == sb and ia > ib)


@njit(cache=True, nogil=True, inline="always")
def _sift_down(heap_s, heap_i, size, xs, xi):
    """Put (xs, xi) at the root of the size-``size`` min-heap (worst at the root) and sift it down."""
    j = 0
    while True:
        c = 2 * j + 1
        if c >= size:
            break
        if c + 1 < size and _worse(heap_s[c + 1], heap_i[c + 1], heap_s[c], heap_i[c]):
            c += 1
        if _worse(heap_s[c], heap_i[c], xs, xi):
            heap_s[j] = heap_s[c]
            heap_i[j] = heap_i[c]
            j = c
        else:
            break
    heap_s[j] = xs
    heap_i[j] = xi


@njit(cache=True, nogil=True)
def _select(rt, credit, touched, nt, s, node_type, want_type, k, out_ids, out_scores, row, col0, heap_s, heap_i):
    """Write the k best touched nodes (excluding s; of type want_type unless it is -1) into
    out_ids[row, col0:col0+k] / out_scores[...] by (score desc, index asc). Returns how many were written.

    The score is p(v) + credit * r(v): credit = alpha gives p_hat (> 0 on every touched node), credit = 0
    ACL's p (pushed nodes only; a node with p = 0 is no candidate). Partial selection with a size-k min-heap
    keyed on the rank order (worst at the root): one pass over the touched set, O(T log k), most candidates
    rejected by one comparison.
    """
    if k == 0:
        return 0
    m = 0
    for i in range(nt):
        v = touched[i]
        if v == s:
            continue
        if want_type >= 0 and node_type[v] != want_type:
            continue
        pv = np.float64(rt[v, 2]) + credit * rt[v, 0]
        if pv <= 0.0:
            continue
        if m < k:
            # sift up
            j = m
            m += 1
            while j > 0:
                par = (j - 1) >> 1
                if _worse(pv, v, heap_s[par], heap_i[par]):
                    heap_s[j] = heap_s[par]
                    heap_i[j] = heap_i[par]
                    j = par
                else:
                    break
            heap_s[j] = pv
            heap_i[j] = v
        elif _worse(heap_s[0], heap_i[0], pv, v):
            _sift_down(heap_s, heap_i, m, pv, v)  # replace the root
    # heap sort in place: repeatedly move the worst to the end -> best first
    for end in range(m - 1, 0, -1):
        ts = heap_s[0]
        ti = heap_i[0]
        heap_s[0] = heap_s[end]
        heap_i[0] = heap_i[end]
        heap_s[end] = ts
        heap_i[end] = ti
        _sift_down(heap_s, heap_i, end, heap_s[0], heap_i[0])
    for i in range(m):
        out_ids[row, col0 + i] = heap_i[i]
        out_scores[row, col0 + i] = heap_s[i]
    return m


@njit(cache=True, nogil=True)
def init_scratch(indptr, wdeg, rt_all):
    """Write the clean state every source starts from (and ``_reset`` returns to) into every worker's
    records: r = p = 0, d(v) and 1 / W(v) beside."""
    n = indptr.shape[0] - 1
    for w in range(rt_all.shape[0]):
        for v in range(n):
            rt_all[w, v, 0] = 0.0
            rt_all[w, v, 1] = indptr[v + 1] - indptr[v]
            rt_all[w, v, 2] = 0.0
            rt_all[w, v, 3] = 1.0 / wdeg[v] if wdeg[v] > 0 else 0.0


@njit(cache=True, parallel=True)
def forward_push_kernel(
    indptr,
    ent_idx,
    ent_w,
    wcol,
    unit,
    sources,
    restart_prob,
    eps,
    credit,
    node_type,
    block_type,
    block_k,
    rt_all,
    queue_all,
    touched_all,
    out_ids,
    out_scores,
    visits_out,
):
    """Push every source and write its per-block top-k into row i of ``out_ids`` / ``out_scores``; the edge
    visits of worker w into ``visits_out[w]``.

    One worker per entry of visits_out (<= numba threads, passed in: get_num_threads() here blocks
    caching); worker w uses row w of the scratch arrays, which are clean on entry and left clean on exit.
    """
    n = indptr.shape[0] - 1
    S = sources.shape[0]
    nb = block_type.shape[0]
    nw = visits_out.shape[0]
    kmax = 1
    for b in range(nb):
        kmax = max(kmax, block_k[b])
    for w in prange(nw):
        rt = rt_all[w]
        queue = queue_all[w]
        touched = touched_all[w]
        heap_s = np.empty(kmax, dtype=np.float64)
        heap_i = np.empty(kmax, dtype=np.int64)
        visits = 0
        # interleaved sources: expensive ones spread over the workers without a dynamic scheduler
        for i in range(w, S, nw):
            s = sources[i]
            if s < 0 or s >= n:
                continue  # absent node: empty row (padding already in the outputs)
            nt, vi = _push_one(indptr, ent_idx, ent_w, wcol, unit, s, restart_prob, eps, rt, queue, touched)
            visits += vi
            col = 0
            for b in range(nb):
                _select(
                    rt,
                    credit,
                    touched,
                    nt,
                    s,
                    node_type,
                    block_type[b],
                    block_k[b],
                    out_ids,
                    out_scores,
                    i,
                    col,
                    heap_s,
                    heap_i,
                )
                col += block_k[b]
            _reset(rt, touched, nt)
        visits_out[w] = visits
