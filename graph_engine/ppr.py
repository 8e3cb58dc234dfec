"""Forward push (Andersen, Chung, Lang 2006; the paper's ref. [2]) for personalised PageRank, in numba.

Paper 3.1.1 scores neighbour v of source u by s(u, v, H_R), the visit probability of a random walk with
restart (RWR) from u on the induced subgraph H_R, approximated by forward push with error threshold
delta = 1/B (``eps`` here). The exact vector is

    p_s = restart_prob * (I - (1 - restart_prob) P^T)^-1 e_s,   P[u, v] = w(u, v) / W(u),

with W(u) the weighted out-degree of u. ``restart_prob`` is the walk's restart probability (called so to keep
it apart from the pruning alpha of appendix A.1).

Push rule (non-lazy ACL on a weighted directed graph). Every source keeps an estimate p and a residual r
(r = e_s at the start). While some node u has r(u) >= eps * W(u):

    p(u) += restart_prob * r(u);  r(v) += (1 - restart_prob) * r(u) * w(u, v) / W(u) for each out-entry;  r(u) = 0

Invariant: p_s = p + sum_u r(u) p_u, so 0 <= p_s(v) - p(v) <= eps * sum_u W(u) p_u(v) once no node is
pushable; on an undirected graph p_u(v) W(u) = p_v(u) W(v) and this is the classic bound eps * W(v).
A node without out-entries (W = 0) is pushed whenever it holds residual: it keeps restart_prob of it and
the rest leaves the walk, exactly as the zero row of P does in the formula above.

Kernel layout. ``prange`` over worker threads; each worker owns a dense float64 estimate array p, a
residual+threshold array rt[n, 2] (r(v) beside eps * W(v), +inf while queued = the in-queue flag: one
cache line per random access), a FIFO ring buffer and a touched-node list, and walks the sources w, w + T, w + 2T, ...
(interleaved, so expensive sources spread over the workers). After each source only the touched
entries are reset, so a source costs O(its pushes), not O(n). Top-k is a partial selection over
the touched set (a size-k heap, one pass), giving the k winners by (score desc, dense index asc) -- ties
go to the smaller dense index, so results never depend on the thread count. Only nodes that were pushed
(p > 0) are candidates: a node merely touched has an estimate of 0 (its residual is below eps * W).
Inputs are canonicalised to one dtype signature (``_ro``), so the on-disk numba cache (``cache=True``;
NUMBA_CACHE_DIR when set, else ``__pycache__``) compiles the kernel once.
Nothing here runs Python per edge or per source.

Two entry points:
- ``forward_push``: top ``topk`` over all nodes (the benchmark and the homogeneous case);
- ``forward_push_typed``: per-type top-k, the heterogeneous neighbourhood of 3.1.1 -- for blocks
  (type code t_b, k_b) it returns the k_b best nodes of type t_b, blocks side by side. One push per source
  serves every block of a relation subset.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

#: Pipeline defaults (paper 3.1.1 / 4.1): restart probability of the RWR and the budget B (eps = delta = 1/B).
DEFAULT_RESTART_PROB = 0.15
DEFAULT_BUDGET = 10_000


@njit(cache=True, nogil=True)
def _weighted_out_degree(indptr, weights):
    n = indptr.shape[0] - 1
    out = np.zeros(n, dtype=np.float64)
    for u in range(n):
        acc = 0.0
        for e in range(indptr[u], indptr[u + 1]):
            acc += weights[e]
        out[u] = acc
    return out


def weighted_out_degree(indptr: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """float64 [n]: W(u) = sum of u's out-entry weights (float64 accumulation of float32 weights)."""
    return _weighted_out_degree(_ro(indptr, np.int64), _ro(weights, np.float32))


@njit(cache=True, nogil=True)
def _push_one(indptr, indices, weights, unit, wdeg, s, restart_prob, eps, p, rt, queue, touched):
    """Forward push from source s. Returns (number of touched nodes, edge visits).

    ``rt[v] = (r(v), threshold(v))`` side by side, so the hot loop's one random access per visited entry
    reads one cache line. threshold(v) is eps * W(v), or +inf while v waits in the FIFO: that is the
    in-queue flag (a node is queued at most once, no membership scans, no extra flag array). A node is new
    (goes on the ``touched`` list) when r(v) = 0 and p(v) = 0. ``unit``: all weights 1 (``weights`` is not
    read). Touched nodes (s first) keep their values until ``_reset``.
    """
    cap = queue.shape[0]
    keep = 1.0 - restart_prob
    inf = np.inf
    rt[s, 0] = 1.0
    touched[0] = s
    nt = 1
    head = 0
    size = 0
    visits = 0
    if rt[s, 0] >= rt[s, 1]:
        queue[0] = s
        rt[s, 1] = inf
        size = 1
    while size > 0:
        u = queue[head]
        head += 1
        if head == cap:
            head = 0
        size -= 1
        wu = wdeg[u]
        rt[u, 1] = eps * wu  # out of the queue: the real threshold again
        ru = rt[u, 0]
        p[u] += restart_prob * ru
        rt[u, 0] = 0.0
        if wu <= 0.0:
            continue  # no out-entries: the walk's remaining mass leaves (zero row of P)
        c = keep * ru / wu
        lo = indptr[u]
        hi = indptr[u + 1]
        visits += hi - lo
        for e in range(lo, hi):
            v = indices[e]
            r0 = rt[v, 0]
            if r0 == 0.0 and p[v] == 0.0:
                touched[nt] = v
                nt += 1
            rv = r0 + (c if unit else c * weights[e])
            rt[v, 0] = rv
            if rv >= rt[v, 1]:
                tail = head + size
                if tail >= cap:
                    tail -= cap
                queue[tail] = v
                rt[v, 1] = inf
                size += 1
    return nt, visits


@njit(cache=True, nogil=True)
def _reset(p, rt, touched, nt):
    # thresholds are already restored: every queued node was popped
    for i in range(nt):
        v = touched[i]
        p[v] = 0.0
        rt[v, 0] = 0.0


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
def _select(p, touched, nt, s, node_type, want_type, k, out_ids, out_scores, row, col0, heap_s, heap_i):
    """Write the k best touched nodes (excluding s; of type want_type unless it is -1) into
    out_ids[row, col0:col0+k] / out_scores[...] by (score desc, index asc). Returns how many were written.

    Partial selection with a size-k min-heap keyed on the rank order (worst at the root): one pass over the
    touched set, O(T log k), and most candidates are rejected by one comparison with the root.
    """
    if k == 0:
        return 0
    m = 0
    for i in range(nt):
        v = touched[i]
        pv = p[v]
        if v == s or pv <= 0.0:
            continue
        if want_type >= 0 and node_type[v] != want_type:
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


@njit(cache=True, parallel=True)
def _forward_push_kernel(indptr, indices, weights, unit, wdeg, sources, restart_prob, eps, node_type, block_type, block_k, out_ids, out_scores, visits_out):
    # one worker per entry of visits_out (= numba threads, passed in: get_num_threads() here blocks caching)
    n = indptr.shape[0] - 1
    S = sources.shape[0]
    nb = block_type.shape[0]
    nw = visits_out.shape[0]
    kmax = 1
    for b in range(nb):
        kmax = max(kmax, block_k[b])
    for w in prange(nw):
        p = np.zeros(n, dtype=np.float64)
        rt = np.empty((n, 2), dtype=np.float64)
        for v in range(n):
            rt[v, 0] = 0.0
            rt[v, 1] = eps * wdeg[v]
        queue = np.empty(max(n, 1), dtype=np.int64)
        touched = np.empty(max(n, 1), dtype=np.int64)
        heap_s = np.empty(kmax, dtype=np.float64)
        heap_i = np.empty(kmax, dtype=np.int64)
        visits = 0
        # interleaved sources: expensive ones spread over the workers without a dynamic scheduler
        for i in range(w, S, nw):
            s = sources[i]
            if s < 0 or s >= n:
                continue  # absent node: empty row (padding already in the outputs)
            nt, vi = _push_one(indptr, indices, weights, unit, wdeg, s, restart_prob, eps, p, rt, queue, touched)
            visits += vi
            col = 0
            for b in range(nb):
                _select(p, touched, nt, s, node_type, block_type[b], block_k[b], out_ids, out_scores, i, col, heap_s, heap_i)
                col += block_k[b]
            _reset(p, rt, touched, nt)
        visits_out[w] = visits


_INT32_MAX = np.iinfo(np.int32).max


def _ro(a, dtype) -> np.ndarray:
    """A C-contiguous, read-only plain ndarray of ``dtype`` (no copy for a matching memmap).

    Every call then hits ONE compiled specialisation of the kernel (numba specialises on dtype, layout and
    read-only-ness: a memmap opened with mode "r" is read-only, a fresh array is not), so the on-disk cache
    built by the first call serves tests, benchmark and pipeline alike.
    """
    a = np.asarray(np.ascontiguousarray(a, dtype=dtype))
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _check(indptr, indices, weights, sources, restart_prob, eps):
    indptr = np.asarray(indptr)
    indices = np.asarray(indices)
    if indptr.ndim != 1 or indptr.shape[0] < 1:
        raise ValueError("forward_push: indptr must be a 1-d array of length n + 1")
    if indices.dtype.kind not in "iu":
        raise ValueError(f"forward_push: indices dtype {indices.dtype}, expected int32 or int64")
    if int(indptr[-1]) != indices.shape[0]:
        raise ValueError(f"forward_push: indptr[-1] = {int(indptr[-1])} != len(indices) = {indices.shape[0]}")
    n = indptr.shape[0] - 1
    unit = weights is None
    weights = np.ones(0, dtype=np.float32) if unit else np.asarray(weights)
    if not unit and weights.shape != indices.shape:
        raise ValueError(f"forward_push: weights shape {weights.shape} != indices shape {indices.shape}")
    if not unit and weights.size and not (np.min(weights) > 0 and np.isfinite(np.max(weights))):
        # the kernel relies on it: a touched node has r > 0 or p > 0
        raise ValueError("forward_push: weights must be finite and > 0")
    if not 0.0 < restart_prob <= 1.0:
        raise ValueError(f"forward_push: restart_prob={restart_prob} must be in (0, 1]")
    if not eps > 0.0:
        raise ValueError(f"forward_push: eps={eps} must be > 0 (eps = 1/B, paper 3.1.1)")
    sources = np.array(sources, dtype=np.int64).reshape(-1)  # a private, writable copy
    if sources.size and int(sources.max()) >= n:
        raise ValueError(f"forward_push: source {int(sources.max())} out of range for a graph of {n} nodes")
    # Canonical dtypes (the snapshot's): int64 indptr, int32 indices while n fits, float32 weights.
    idx_dtype = np.int32 if n <= _INT32_MAX else np.int64
    return _ro(indptr, np.int64), _ro(indices, idx_dtype), _ro(weights, np.float32), unit, sources


def forward_push_typed(
    indptr: np.ndarray,
    indices: np.ndarray,
    weights: np.ndarray | None,
    sources: np.ndarray,
    restart_prob: float,
    eps: float,
    node_type: np.ndarray,
    block_types,
    block_ks,
    out_weight: np.ndarray | None = None,
    return_visits: bool = False,
):
    """Per-type top-k (paper 3.1.1, N(u, H_R) = union over t of the top k_t nodes of type t).

    ``block_types[b]`` is a node-type code (or -1 for any type), ``block_ks[b]`` its k. Returns
    ``ids`` int64 [S, sum(k)] and ``scores`` float64 [S, sum(k)], block b in columns
    [sum(k[:b]), sum(k[:b]) + k[b]), each block score-descending, padded with -1 / 0. A source of -1
    (node absent from the graph) gets an all-padding row. ``out_weight`` is W(u) when the caller has it
    cached (``weighted_out_degree``); ``return_visits`` also returns the number of edge visits.
    """
    indptr, indices, weights, unit, sources = _check(indptr, indices, weights, sources, restart_prob, eps)
    n = indptr.shape[0] - 1
    node_type = _ro(node_type, np.int8)
    if node_type.shape[0] != n:
        raise ValueError(f"forward_push_typed: node_type has {node_type.shape[0]} entries for {n} nodes")
    block_type = np.asarray(block_types, dtype=np.int64).reshape(-1)
    block_k = np.asarray(block_ks, dtype=np.int64).reshape(-1)
    if block_type.shape != block_k.shape or (block_k < 0).any():
        raise ValueError("forward_push_typed: block_types and block_ks must have equal length, k >= 0")
    if out_weight is None:
        wdeg = np.diff(indptr).astype(np.float64) if unit else weighted_out_degree(indptr, weights)
    else:
        wdeg = out_weight
    wdeg = _ro(wdeg, np.float64)
    if wdeg.shape[0] != n:
        raise ValueError(f"forward_push_typed: out_weight has {wdeg.shape[0]} entries for {n} nodes")
    width = int(block_k.sum())
    ids = np.full((sources.shape[0], width), -1, dtype=np.int64)
    scores = np.zeros((sources.shape[0], width), dtype=np.float64)
    visits = np.zeros(max(1, min(numba.get_num_threads(), sources.shape[0])), dtype=np.int64)
    _forward_push_kernel(
        indptr, indices, weights, unit, wdeg, sources, float(restart_prob), float(eps), node_type, block_type, block_k, ids, scores, visits
    )
    if return_visits:
        return ids, scores, int(visits.sum())
    return ids, scores


_NO_TYPE = np.zeros(0, dtype=np.int8)


def forward_push(
    indptr: np.ndarray,
    indices: np.ndarray,
    weights: np.ndarray | None,
    sources: np.ndarray,
    restart_prob: float = DEFAULT_RESTART_PROB,
    eps: float = 1.0 / DEFAULT_BUDGET,
    topk: int = 100,
    out_weight: np.ndarray | None = None,
    return_visits: bool = False,
):
    """Approximate personalised PageRank top-k of every source by forward push.

    Returns ``ids`` int64 [S, topk] (dense node indices; the source itself excluded) and ``scores``
    float64 [S, topk], score-descending (ties by index), padded with -1 / 0. ``weights=None`` means unit
    weights. See the module docstring for the push rule and error bound.
    """
    indptr_c = np.asarray(indptr)
    n = indptr_c.shape[0] - 1
    # The untyped case is the typed kernel with one block of "any type" (-1): node_type is never read.
    node_type = np.zeros(n, dtype=np.int8)
    return forward_push_typed(
        indptr_c, indices, weights, sources, restart_prob, eps, node_type, [-1], [int(topk)], out_weight, return_visits
    )
