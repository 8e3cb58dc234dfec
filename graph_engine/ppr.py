"""Forward push (Andersen, Chung, Lang 2006; the paper's ref. [2]) for personalised PageRank, in numba.

Paper 3.1.1 scores neighbour v of source u by s(u, v, H_R), the visit probability of a random walk with
restart (RWR) from u on the induced subgraph H_R, approximated by forward push with error threshold
delta = 1/B (``eps`` here). The exact vector is

    pi_s = restart_prob * (I - (1 - restart_prob) P^T)^-1 e_s,   P[u, v] = w(u, v) / W(u),

with w(u, v) the entry's weight (an engagement count), W(u) = sum_v w(u, v) the weighted out-degree and
d(u) the number of out-entries (unweighted out-degree). ``restart_prob`` (alpha below) is the walk's restart
probability (named so to keep it apart from the pruning alpha of appendix A.1).

Push rule (ACL on a weighted directed graph: transitions row-normalised, threshold on d, not on W).
Every source s keeps an estimate p and a residual r, r = e_s at the start. The source is pushed once; then,
while some node u has r(u) >= eps * d(u):

    p(u) += alpha * r(u);  r(v) += (1 - alpha) * r(u) * w(u, v) / W(u) for each out-entry;  r(u) = 0

The threshold must not grow with the counts: with eps * W(u) (W = summed counts) a node with W(u) > B is
never pushed, even as the source, and popular pins/boards lose their neighbourhoods. With d(u) the walk is
that of P, but scaling every count by a constant changes nothing, and on unit weights (d = W) the rule is
the classic one, so B = 1/eps keeps the meaning of paper 3.1.1 / Table 4 (budget B/alpha edge visits).

Proof sketch (pi_u = the exact vector of source u; R = sum_v r(v) the residual mass).
- Invariant: pi_s = p + sum_u r(u) pi_u. It holds at the start and a push at u replaces r(u) pi_u by
  alpha r(u) e_u + (1 - alpha) r(u) sum_v P[u, v] pi_v, which is the same vector (the RWR equation of pi_u).
- Work: a push at u with d(u) > 0 lowers R by exactly alpha r(u) (the rest moves, as P's row sums to 1); at
  a node without out-entries (a zero row of P) all of r(u) leaves. R starts at 1 and stays >= 0, and every
  push but the source's first has r(u) >= eps d(u), so alpha eps sum_pushes d(u) <= 1: the edge visits of a
  source are at most d(s) + 1/(eps alpha) = d(s) + B/alpha, whatever the counts (d(s) <= d_max of A.1).
  A node is queued only during an edge visit (or as the source), so pops are bounded too: termination.
- Error: at the end every node has r(u) < eps d(u) (a node reaching its threshold is queued and then
  zeroed). With pi_v(v) >= alpha the invariant gives, per node v, for the reported score
  p_hat(v) = p(v) + alpha r(v) and D(v) = sum_u d(u) pi_u(v):

      0 <= pi_s(v) - p_hat(v) <= pi_s(v) - p(v) = sum_u r(u) pi_u(v) <= eps * D(v),

  and in l1, sum_v (pi_s(v) - p(v)) <= R_end. On an undirected graph pi_u(v) W(u) = pi_v(u) W(v), so
  D(v) = W(v) sum_u pi_v(u) d(u) / W(u) <= W(v) max_u d(u) / W(u): eps d(v) on unit weights (ACL's bound),
  at most eps W(v) when counts are >= 1.
Reporting p_hat (default; ``credit_residual=False`` gives ACL's / PyG's p over pushed nodes) is never
further from pi_s than p, node by node, and keeps every touched node a candidate: a neighbour whose degree
d(v) > (1-alpha)B is never pushed, yet p_hat(v) >= alpha r(v) > 0 ranks it by the mass that reached it (p
would drop it: on power-law graphs hubs are exactly such nodes). With the source always pushed, every
node with out-entries gets a non-empty neighbourhood.

Kernels (``graph_engine.ppr_kernels``, whose docstring gives their memory layout): one worker per
thread, each with its own scratch (node records, FIFO, touched list). The scratch arrays belong to a
``PushGraph`` (one per CSR, i.e. per snapshot subset): allocated and initialised once, and after each
source only the entries it touched are reset, so a call costs O(its pushes + its sources), never O(n).
Top-k ranks by (score desc, dense index asc), so results never depend on the thread count or on what
earlier calls left in the scratch. Inputs are canonicalised to one dtype signature (``_ro``), so the
on-disk numba cache (``cache=True``; NUMBA_CACHE_DIR when set, else ``__pycache__``) compiles the kernel
once. Nothing here runs Python per edge or per source.

Entry points:
- ``PushGraph``: a CSR validated once (weights, indices, W(u)) with its scratch; ``push`` / ``push_typed``;
- ``forward_push``: top ``topk`` over all nodes (the benchmark and the homogeneous case);
- ``forward_push_typed``: per-type top-k, the heterogeneous neighbourhood of 3.1.1 -- for blocks
  (type code t_b, k_b) it returns the k_b best nodes of type t_b, blocks side by side. One push per source
  serves every block of a relation subset.
The two functions build a ``PushGraph`` per call (O(n + m)); callers with many calls keep a ``PushGraph``.
"""

from __future__ import annotations

import mmap
import threading

import numba
import numpy as np

from graph_engine.ppr_kernels import forward_push_kernel, init_scratch, weighted_out_degree_kernel

#: Pipeline defaults (paper 3.1.1 / 4.1): restart probability of the RWR and the budget B (eps = delta = 1/B).
DEFAULT_RESTART_PROB = 0.15
DEFAULT_BUDGET = 10_000

_INT32_MAX = np.iinfo(np.int32).max
#: A memory-mapped CSR up to this size is copied into process memory once per ``PushGraph``: random row reads
#: then hit anonymous memory (numpy asks for transparent huge pages) instead of 4 KiB file pages, whose TLB
#: misses grow with the graph. Larger CSRs are pushed straight from the mapping (paper 3.4.1).
COPY_MAPPED_CSR_BYTES = 2 << 30


def weighted_out_degree(indptr: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """float64 [n]: W(u) = sum of u's out-entry weights (float64 accumulation of float32 weights)."""
    return weighted_out_degree_kernel(_ro(indptr, np.int64), _ro(weights, np.float32))


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


_NO_TYPE = _ro(np.zeros(0, dtype=np.int8), np.int8)


def _mapped(a) -> bool:
    """``a`` (or an array it views) is backed by a file mapping."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def _canonical_csr(indptr, indices, weights):
    """Validate a CSR once (O(n + m)) and return it in the kernel's dtypes: int64 indptr, int32 indices while
    n fits (the snapshot's), float32 weights (empty when ``weights`` is None: unit weights)."""
    indptr = np.asarray(indptr)
    indices = np.asarray(indices)
    if indptr.ndim != 1 or indptr.shape[0] < 1:
        raise ValueError("forward_push: indptr must be a 1-d array of length n + 1")
    if indices.dtype.kind not in "iu":
        raise ValueError(f"forward_push: indices dtype {indices.dtype}, expected int32 or int64")
    if int(indptr[0]) != 0 or int(indptr[-1]) != indices.shape[0]:
        raise ValueError(f"forward_push: indptr must run from 0 to len(indices) = {indices.shape[0]}")
    n = indptr.shape[0] - 1
    if n and np.any(np.diff(indptr) < 0):
        raise ValueError("forward_push: indptr must be non-decreasing")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"forward_push: indices must be dense node indices in [0, {n})")
    unit = weights is None
    weights = np.ones(0, dtype=np.float32) if unit else np.asarray(weights)
    if not unit and weights.shape != indices.shape:
        raise ValueError(f"forward_push: weights shape {weights.shape} != indices shape {indices.shape}")
    if not unit and weights.size and not (np.min(weights) > 0 and np.isfinite(np.max(weights))):
        # the kernel relies on it: a touched node has r > 0 or p > 0, and W(u) > 0 when d(u) > 0
        raise ValueError("forward_push: weights must be finite and > 0")
    idx_dtype = np.int32 if n <= _INT32_MAX else np.int64
    return _ro(indptr, np.int64), _ro(indices, idx_dtype), _ro(weights, np.float32), unit


def _entry_views(indices, weights, unit, in_memory):
    """The kernel's view of the CSR entries: (ent_idx [m, k], ent_w [m, k'], wcol) with entry e =
    (ent_idx[e, 0], ent_w[e, wcol]). ``in_memory``: the kernel reads process memory (False: a CSR over
    ``COPY_MAPPED_CSR_BYTES`` is pushed straight from its file mapping). Weighted int32 entries in memory are
    interleaved into (index, weight bits) pairs -- the one O(m) copy: a pushed row is then one sequential run
    of memory instead of two, one cache miss fewer per push. Other entries are copied only when mapped."""
    if in_memory and not unit and indices.dtype == np.int32:
        pairs = np.empty((indices.shape[0], 2), dtype=np.int32)
        pairs[:, 0] = indices
        pairs[:, 1] = weights.view(np.int32)
        return _ro(pairs, np.int32), _ro(pairs.view(np.float32), np.float32), 1
    if in_memory and _mapped(indices):
        indices, weights = (_ro(np.array(a), a.dtype) for a in (indices, weights))
    return _ro(indices[:, None], indices.dtype), _ro(weights[:, None], np.float32), 0


class PushGraph:
    """One CSR (a snapshot's relation subset H_R) prepared for forward push, once: validated, in the
    kernel's dtypes, with W(u), and with per-worker scratch (rt, queue, touched: 32 bytes x n x threads)
    allocated on the first call and kept clean between calls. A call then costs O(sources + pushes).

    ``out_weight``: W(u) when the caller has it cached (``GraphSnapshot.weighted_out_degree``). A
    memory-mapped CSR up to ``COPY_MAPPED_CSR_BYTES`` is copied into process memory here, once (as the
    interleaved entries when weighted). Calls are
    serialised by a lock (the scratch is shared); results never depend on earlier calls.
    """

    def __init__(self, indptr, indices, weights=None, out_weight=None):
        self.indptr, indices, weights, self.unit = _canonical_csr(indptr, indices, weights)
        csr = (self.indptr, indices, weights)
        in_memory = not any(_mapped(a) for a in csr) or sum(a.nbytes for a in csr) <= COPY_MAPPED_CSR_BYTES
        if in_memory and _mapped(self.indptr):
            self.indptr = _ro(np.array(self.indptr), np.int64)
        n = self.num_nodes
        if out_weight is None:
            unit_w = np.diff(self.indptr).astype(np.float64)
            wdeg = unit_w if self.unit else weighted_out_degree(self.indptr, weights)
        else:
            wdeg = out_weight
        self.out_weight = _ro(wdeg, np.float64)
        if self.out_weight.shape != (n,):
            raise ValueError(f"forward_push: out_weight has shape {self.out_weight.shape} for {n} nodes")
        self._entries = _entry_views(indices, weights, self.unit, in_memory)
        self._scratch: tuple[np.ndarray, ...] | None = None
        self._lock = threading.Lock()
        self.edge_visits = 0  # all calls together: the work, sum over pushes of d(u)

    @property
    def num_nodes(self) -> int:
        return int(self.indptr.shape[0] - 1)

    @property
    def indices(self) -> np.ndarray:
        """The CSR's column indices (a view of the kernel's entries)."""
        return self._entries[0][:, 0]

    @property
    def weights(self) -> np.ndarray:
        """The CSR's float32 weights (a view of the kernel's entries; empty for unit weights)."""
        return self._entries[1][:, self._entries[2]]

    def __getstate__(self) -> dict:
        # a copy (e.g. to a spawned data-loader worker) gets its own lock and scratch, allocated on first use
        state = {k: v for k, v in self.__dict__.items() if k not in ("_scratch", "_lock", "_entries")}
        return {
            **state,
            "indices": np.ascontiguousarray(self.indices),
            "weights": np.ascontiguousarray(self.weights),
        }

    def __setstate__(self, state: dict) -> None:
        indices, weights = state.pop("indices"), state.pop("weights")
        self.__dict__.update(state)
        for name in ("indptr", "out_weight"):  # unpickled arrays are writable again
            setattr(self, name, _ro(state[name], state[name].dtype))
        self._entries = _entry_views(_ro(indices, indices.dtype), _ro(weights, np.float32), self.unit, True)
        self._scratch = None
        self._lock = threading.Lock()

    def _take_scratch(self, workers: int) -> tuple[np.ndarray, ...]:
        """The clean scratch for ``workers`` workers; allocated (O(n x threads)) only on first use or when the
        thread count grew. Taken out of ``self`` while a kernel runs: an exception drops it."""
        scratch, self._scratch = self._scratch, None
        if scratch is None or scratch[0].shape[0] < workers:
            n, threads = max(self.num_nodes, 1), max(workers, numba.get_num_threads())
            scratch = (
                np.empty((threads, n, 4), dtype=np.float32),  # rt = (r, d, p, 1/W)
                np.empty((threads, n + 1), dtype=np.int64),  # FIFO ring buffer
                np.empty((threads, n + 1), dtype=np.int64),  # touched list
            )
            init_scratch(self.indptr, self.out_weight, scratch[0])
        return scratch

    def push_typed(
        self,
        sources,
        restart_prob,
        eps,
        node_type,
        block_types,
        block_ks,
        return_visits=False,
        credit_residual=True,
    ):
        """Per-type top-k of every source; see ``forward_push_typed``."""
        if not 0.0 < restart_prob <= 1.0:
            raise ValueError(f"forward_push: restart_prob={restart_prob} must be in (0, 1]")
        if not eps > 0.0:
            raise ValueError(f"forward_push: eps={eps} must be > 0 (eps = 1/B, paper 3.1.1)")
        n = self.num_nodes
        sources = np.array(sources, dtype=np.int64).reshape(-1)  # a private, writable copy
        if sources.size and int(sources.max()) >= n:
            raise ValueError(f"forward_push: source {int(sources.max())} out of range ({n} nodes)")
        block_type = np.asarray(block_types, dtype=np.int64).reshape(-1)
        block_k = np.asarray(block_ks, dtype=np.int64).reshape(-1)
        if block_type.shape != block_k.shape or (block_k < 0).any():
            raise ValueError("forward_push_typed: block_types and block_ks must have equal length, k >= 0")
        node_type = _NO_TYPE if node_type is None else _ro(node_type, np.int8)
        if (block_type >= 0).any() and node_type.shape[0] != n:
            raise ValueError(f"forward_push_typed: node_type has {node_type.shape[0]} entries for {n} nodes")
        width = int(block_k.sum())
        ids = np.full((sources.shape[0], width), -1, dtype=np.int64)
        scores = np.zeros((sources.shape[0], width), dtype=np.float64)
        visits = np.zeros(max(1, min(numba.get_num_threads(), sources.shape[0])), dtype=np.int64)
        if sources.size and n:
            with self._lock:
                scratch = self._take_scratch(visits.shape[0])
                forward_push_kernel(
                    self.indptr,
                    *self._entries,
                    self.unit,
                    sources,
                    float(restart_prob),
                    float(eps),
                    float(restart_prob) if credit_residual else 0.0,
                    node_type,
                    block_type,
                    block_k,
                    *scratch,
                    ids,
                    scores,
                    visits,
                )
                self._scratch = scratch
                self.edge_visits += int(visits.sum())
        if return_visits:
            return ids, scores, int(visits.sum())
        return ids, scores

    def push(self, sources, restart_prob, eps, topk, return_visits=False, credit_residual=True):
        """Top ``topk`` over all nodes of every source; see ``forward_push``."""
        # one block of "any type" (-1): node_type is never read
        return self.push_typed(sources, restart_prob, eps, None, [-1], [int(topk)], return_visits, credit_residual)


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
    credit_residual: bool = True,
):
    """Per-type top-k (paper 3.1.1, N(u, H_R) = union over t of the top k_t nodes of type t).

    ``block_types[b]`` is a node-type code (or -1 for any type), ``block_ks[b]`` its k. Returns
    ``ids`` int64 [S, sum(k)] and ``scores`` float64 [S, sum(k)], block b in columns
    [sum(k[:b]), sum(k[:b]) + k[b]), each block score-descending, padded with -1 / 0. A source of -1
    (node absent from the graph) gets an all-padding row. ``out_weight`` is W(u) when the caller has it
    cached (``weighted_out_degree``); ``return_visits`` also returns the number of edge visits.
    ``credit_residual``: score p_hat = p + restart_prob * r over every touched node (default), or ACL's /
    PyG's p over pushed nodes only (False; kept for like-for-like comparisons with other push kernels).
    One-shot: validates the CSR and allocates scratch per call; repeated callers keep a ``PushGraph``.
    """
    graph = PushGraph(indptr, indices, weights, out_weight)
    nt = np.asarray(node_type).shape[0]
    if nt != graph.num_nodes:
        raise ValueError(f"forward_push_typed: node_type has {nt} entries for {graph.num_nodes} nodes")
    return graph.push_typed(
        sources, restart_prob, eps, node_type, block_types, block_ks, return_visits, credit_residual
    )


def forward_push(
    indptr: np.ndarray,
    indices: np.ndarray,
    weights: np.ndarray | None,
    sources: np.ndarray,
    restart_prob: float,
    eps: float,
    topk: int,
    out_weight: np.ndarray | None = None,
    return_visits: bool = False,
    credit_residual: bool = True,
):
    """Approximate personalised PageRank top-k of every source by forward push.

    Returns ``ids`` int64 [S, topk] (dense node indices; the source itself excluded) and ``scores``
    float64 [S, topk] (p_hat = p + restart_prob * r; p with ``credit_residual=False``), score-descending
    (ties by index), padded with -1 / 0. ``weights=None`` means unit weights. See the module docstring for
    the push rule and error bound.
    """
    graph = PushGraph(indptr, indices, weights, out_weight)
    return graph.push(sources, restart_prob, eps, topk, return_visits, credit_residual)
