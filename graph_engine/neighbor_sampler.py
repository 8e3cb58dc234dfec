"""Heterogeneous importance-based neighbour sampling (paper 3.1.1, 3.4.1 "Neighbor Sampler", 4.1).

For a node u and every relation subset R_i named in the ``NeighborhoodLayout``, one forward push
(``graph_engine.ppr``) runs on H_{R_i}'s CSR; each block (R_i, t, k_t) of the layout keeps the k_t nodes
of type t with the highest proximity score s(u, v, H_{R_i}). The blocks side by side are
N(u, H) = union_i N(u, H_{R_i}) (3.1.1), in layout order, each block score-descending (3.2 needs the order),
then padding (-1 / score 0 / mask False). A node absent from the graph (dense index -1) gets an
all-padding row (3.5 imputes zeros for its neighbours).

Each node is sampled once per snapshot: ``build_neighborhood_cache`` samples every node of the snapshot
(batched; the kernel is parallel over sources) and stores memory-mappable ``.npy`` arrays next to it;
``NeighborhoodCache`` serves training and inference from them. Every O(n) or O(m) cost of a push (CSR
validation, W(u), the per-worker scratch arrays) is paid once per snapshot and subset: the sampler keeps
one ``PushGraph`` per subset, so a batch costs O(its pushes) and sampling every node is linear in n
however small the batches. Both ``NeighborSampler`` and ``NeighborhoodCache`` expose ``layout``,
``sample(dense_index)`` and ``get(dense_index)`` so a consumer (BatchBuilder) can take either.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graph_engine.batch import NODE_TYPE_CODE, NeighborBlock, NeighborhoodLayout
from graph_engine.ppr import DEFAULT_BUDGET, DEFAULT_RESTART_PROB, PushGraph
from graph_engine.snapshot import GraphSnapshot

CACHE_FORMAT = "omnisage-neighborhood-cache"
CACHE_FORMAT_VERSION = 1
CACHE_CONFIG = "config.json"


@dataclass
class Neighborhoods:
    """Sampled neighbourhoods of B nodes, columns laid out by a ``NeighborhoodLayout`` (width K)."""

    index: np.ndarray  # int64 [B, K] dense node index into the snapshot, -1 = padding
    scores: np.ndarray  # float32 [B, K] proximity score s(u, v, H_R), 0 for padding
    mask: np.ndarray  # bool [B, K] True = real neighbour

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def take(self, rows) -> Neighborhoods:
        return Neighborhoods(self.index[rows], self.scores[rows], self.mask[rows])

    @classmethod
    def empty(cls, batch: int, width: int) -> Neighborhoods:
        return cls(
            np.full((batch, width), -1, dtype=np.int64),
            np.zeros((batch, width), dtype=np.float32),
            np.zeros((batch, width), dtype=bool),
        )


def layout_to_json(layout: NeighborhoodLayout) -> list[dict]:
    return [{"subset": b.subset, "node_type": b.node_type, "k": int(b.k)} for b in layout.blocks]


def layout_from_json(blocks: list[dict]) -> NeighborhoodLayout:
    return NeighborhoodLayout(tuple(NeighborBlock(b["subset"], b["node_type"], int(b["k"])) for b in blocks))


def _dense_index(dense_index) -> tuple[np.ndarray, tuple[int, ...]]:
    idx = np.asarray(dense_index)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"dense_index must be integers (GraphSnapshot.lookup output), got {idx.dtype}")
    return idx.astype(np.int64, copy=False).reshape(-1), idx.shape


class NeighborSampler:
    """On-the-fly sampler over a ``GraphSnapshot`` (paper 3.4.1).

    ``restart_prob``: the RWR restart probability; ``budget``: B of 3.1.1 (push threshold delta = 1/B).
    """

    def __init__(
        self,
        snapshot: GraphSnapshot,
        layout: NeighborhoodLayout | None = None,
        restart_prob: float = DEFAULT_RESTART_PROB,
        budget: int = DEFAULT_BUDGET,
    ):
        self.snapshot = snapshot
        self.layout = layout or NeighborhoodLayout.paper_default()
        if not 0.0 < restart_prob <= 1.0:
            raise ValueError(f"NeighborSampler: restart_prob={restart_prob} must be in (0, 1]")
        if budget <= 0:
            raise ValueError(f"NeighborSampler: budget={budget} must be > 0 (delta = 1/B, paper 3.1.1)")
        self.restart_prob = float(restart_prob)
        self.budget = int(budget)
        self.eps = 1.0 / self.budget
        have = snapshot.subsets
        # Group the layout's blocks by subset (first-appearance order): one push per (node, subset).
        self._plan: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        offsets = self.layout.offsets
        by_subset: dict[str, list[int]] = {}
        for b, block in enumerate(self.layout.blocks):
            if block.subset not in have:
                raise ValueError(
                    f"NeighborhoodLayout block {block} names relation subset {block.subset!r}, "
                    f"not in snapshot {snapshot.path} (has {sorted(have)})"
                )
            if block.node_type not in NODE_TYPE_CODE:
                raise ValueError(f"NeighborhoodLayout block {block}: node_type not in {list(NODE_TYPE_CODE)}")
            if block.k < 0:
                raise ValueError(f"NeighborhoodLayout block {block}: k must be >= 0")
            by_subset.setdefault(block.subset, []).append(b)
        for subset, blocks in by_subset.items():
            types = np.array([NODE_TYPE_CODE[self.layout.blocks[b].node_type] for b in blocks], dtype=np.int64)
            ks = np.array([self.layout.blocks[b].k for b in blocks], dtype=np.int64)
            # output columns of these blocks in the layout (the kernel writes them side by side)
            cols = np.concatenate([np.arange(offsets[b], offsets[b] + self.layout.blocks[b].k) for b in blocks])
            self._plan.append((subset, types, ks, cols.astype(np.int64)))
        self._graphs: dict[str, PushGraph] = {}  # built on first use: one per subset for the sampler's life
        self._node_type: np.ndarray | None = None  # read per touched node: copied out of the mapping once

    def push_graph(self, subset: str) -> PushGraph:
        """H_R's CSR prepared for forward push (validated, W(u) from the snapshot's cache, scratch), once."""
        graph = self._graphs.get(subset)
        if graph is None:
            indptr, indices, weights = self.snapshot.csr(subset)
            graph = PushGraph(indptr, indices, weights, out_weight=self.snapshot.weighted_out_degree(subset))
            self._graphs[subset] = graph
        return graph

    @property
    def config(self) -> dict:
        return {
            "layout": layout_to_json(self.layout),
            "restart_prob": self.restart_prob,
            "budget": self.budget,
            # what the scores are (graph_engine.ppr): push while r(u) >= d(u) / B, score p + restart_prob * r
            "estimator": "forward-push/degree-threshold/p-hat",
        }

    def sample(self, dense_index) -> Neighborhoods:
        """Neighbourhoods of dense nodes (any shape; -1 = absent node). Result rows follow the flattened input."""
        idx, _ = _dense_index(dense_index)
        out = Neighborhoods.empty(idx.shape[0], self.layout.width)
        if idx.size == 0:
            return out
        n = self.snapshot.num_nodes
        if idx.size and (idx.max() >= n or idx.min() < -1):
            raise IndexError(f"dense index out of range [-1, {n}) for snapshot {self.snapshot.path}")
        if self._node_type is None:
            self._node_type = np.array(self.snapshot.node_type, dtype=np.int8)
        for subset, types, ks, cols in self._plan:
            graph = self.push_graph(subset)
            ids, scores = graph.push_typed(idx, self.restart_prob, self.eps, self._node_type, types, ks)
            out.index[:, cols] = ids
            out.scores[:, cols] = scores.astype(np.float32)
        out.mask[:] = out.index >= 0
        return out

    get = sample


def build_neighborhood_cache(
    snapshot: GraphSnapshot, sampler: NeighborSampler, out_dir: Path, batch_size: int = 8192
) -> dict:
    """Sample every node of ``snapshot`` once and store the result in ``out_dir`` (a directory the caller
    publishes, e.g. ``graph/dt=D/neighborhoods``). Returns the cache config (also ``config.json``, written last).

    Files: ``index.npy`` int32 [n, K] (int64 when n >= 2**31), ``scores.npy`` float32 [n, K]; the mask is
    ``index >= 0``. Rows are written through ``np.lib.format.open_memmap`` batch by batch, so memory stays
    O(batch) however large the graph.
    """
    if sampler.snapshot is not snapshot and sampler.snapshot.path != snapshot.path:
        raise ValueError("build_neighborhood_cache: the sampler samples a different snapshot")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, width = snapshot.num_nodes, sampler.layout.width
    idx_dtype = np.int32 if n <= np.iinfo(np.int32).max else np.int64
    index = np.lib.format.open_memmap(out_dir / "index.npy", mode="w+", dtype=idx_dtype, shape=(n, width))
    scores = np.lib.format.open_memmap(out_dir / "scores.npy", mode="w+", dtype=np.float32, shape=(n, width))
    t0 = time.perf_counter()
    filled = 0
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        nb = sampler.sample(np.arange(lo, hi, dtype=np.int64))
        index[lo:hi] = nb.index
        scores[lo:hi] = nb.scores
        filled += int(nb.mask.sum())
    seconds = time.perf_counter() - t0
    index.flush()
    scores.flush()
    del index, scores
    config = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        **sampler.config,
        "num_nodes": n,
        "width": width,
        "index_dtype": np.dtype(idx_dtype).name,
        "snapshot_partition": snapshot.source_partition,
        "snapshot_arrays_sha256": {k: v["sha256"] for k, v in snapshot.manifest["arrays"].items()},
        "filled_entries": filled,
        "fill_rate": (filled / (n * width)) if n * width else 0.0,
        "sampling_seconds": round(seconds, 3),
        "nodes_per_second": round(n / seconds, 1) if seconds > 0 else None,
    }
    (out_dir / CACHE_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return config


class NeighborhoodCache:
    """Neighbourhoods precomputed by ``build_neighborhood_cache``, memory-mapped."""

    def __init__(self, path: Path, config: dict, index: np.ndarray, scores: np.ndarray):
        self.path = Path(path)
        self.config = config
        self.layout = layout_from_json(config["layout"])
        self.restart_prob = float(config["restart_prob"])
        self.budget = int(config["budget"])
        self._index = index
        self._scores = scores

    @classmethod
    def open(cls, path: Path, snapshot: GraphSnapshot | None = None) -> NeighborhoodCache:
        """Map a cache directory; with ``snapshot`` also check it was sampled from that snapshot."""
        path = Path(path)
        cpath = path / CACHE_CONFIG
        if not cpath.is_file():
            raise FileNotFoundError(f"{cpath} not found: {path} is not a (finished) neighbourhood cache")
        config = json.loads(cpath.read_text())
        if config.get("format") != CACHE_FORMAT or config.get("format_version") != CACHE_FORMAT_VERSION:
            raise ValueError(
                f"{cpath}: fields 'format'/'format_version' are not {CACHE_FORMAT!r}/{CACHE_FORMAT_VERSION}"
            )
        index = np.load(path / "index.npy", mmap_mode="r")
        scores = np.load(path / "scores.npy", mmap_mode="r")
        shape = (config["num_nodes"], config["width"])
        for name, arr in (("index.npy", index), ("scores.npy", scores)):
            if arr.shape != shape:
                raise ValueError(f"{path / name}: shape {arr.shape} differs from config.json's {shape}")
        if snapshot is not None:
            want = {k: v["sha256"] for k, v in snapshot.manifest["arrays"].items()}
            if want != config["snapshot_arrays_sha256"]:
                raise ValueError(f"{cpath}: sampled from a different snapshot than {snapshot.path}")
        return cls(path, config, index, scores)

    @property
    def num_nodes(self) -> int:
        return int(self.config["num_nodes"])

    def get(self, dense_index) -> Neighborhoods:
        """Neighbourhoods of dense nodes (-1 = absent node -> all padding). Rows follow the flattened input."""
        idx, _ = _dense_index(dense_index)
        n = self.num_nodes
        if idx.size and (idx.max() >= n or idx.min() < -1):
            raise IndexError(f"dense index out of range [-1, {n}) for neighbourhood cache {self.path}")
        present = idx >= 0
        safe = np.where(present, idx, 0)
        out = Neighborhoods.empty(idx.shape[0], self.layout.width)
        if n == 0 or not present.any():
            return out
        rows = safe[present]
        out.index[present] = self._index[rows]
        out.scores[present] = self._scores[rows]
        out.mask[:] = out.index >= 0
        return out

    sample = get
