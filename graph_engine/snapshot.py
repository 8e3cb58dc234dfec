"""Memory-mapped graph snapshot of one day's pruned graph (paper 3.1.1, 3.4.1 "Grog", 4.1).

``build_snapshot`` turns ``warehouse/pruned_edges/dt=D/*.parquet`` (contract "Edges": one row per kept
directed adjacency-list entry) into plain ``.npy`` arrays that ``GraphSnapshot.open`` memory-maps
(3.4.1: "the graph is loaded into memory using memory mapping"): opening reads only the manifest and
the ``.npy`` headers, never the data.

On-disk layout of a snapshot directory::

    manifest.json                    counts, subsets, dtypes, sha256 checksums, source partition
    nodes/node_type.npy   int8 [n]   NODE_TYPE_CODE of every dense node
    nodes/node_id.npy     int64 [n]  entity id of every dense node
    nodes/degree.npy      int64 [n]  entries in the node's pruned adjacency list, all edge types
    csr/<subset>/indptr.npy   int64 [n+1]
    csr/<subset>/indices.npy  int32 [m] (int64 when n >= 2**31)
    csr/<subset>/weights.npy  float32 [m]

Dense node order: sorted by (type code, entity id), so dense indices of one type form one contiguous,
id-sorted range (``type_offsets``) and ``lookup`` is a vectorised binary search. The order depends only on
the set of nodes, never on the input's file or row order: the same input gives the same arrays.

One CSR per relation subset R_i (3.1.1: the induced subgraph H_R holds the edges whose type is in R_i).
Row u of a CSR is u's own pruned adjacency list restricted to R_i (pruning, A.1, is per node, so the
snapshot is directed even though the edges are undirected), sorted by neighbour index. A repeated
(src, dst) entry of the same subset is merged by summing its weights (and counted in the manifest).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from graph_engine.batch import NODE_TYPE_CODE

FORMAT = "omnisage-graph-snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

#: Contract "Names": default relation subsets (paper 3.1.1 R_i), named by the edge types they hold.
DEFAULT_SUBSETS: dict[str, tuple[str, ...]] = {"pin_board": ("pin_board",), "pin_pin": ("pin_pin",)}

EDGE_COLUMNS = ("src_type", "src_id", "dst_type", "dst_id", "edge_type", "weight")
_INT32_MAX = np.iinfo(np.int32).max


class SnapshotError(ValueError):
    """The pruned edges (or a snapshot directory) cannot be used; the message names the file and field."""


# --------------------------------------------------------------------------------------------- reading


def _edge_files(pruned_edges_dir: Path) -> list[Path]:
    if not pruned_edges_dir.is_dir():
        raise FileNotFoundError(f"pruned edges directory {pruned_edges_dir} does not exist")
    # Spark/DuckDB may nest part files; skip their hidden/underscore markers (_SUCCESS, .crc, staging).
    files = [
        p
        for p in pruned_edges_dir.rglob("*.parquet")
        if not any(part.startswith((".", "_")) for part in p.relative_to(pruned_edges_dir).parts)
    ]
    return sorted(files)


def _string_column(table: pa.Table, name: str, path: Path) -> pa.ChunkedArray:
    col = table.column(name)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise SnapshotError(f"{path}: column {name!r} has type {col.type}, expected string")
    return col


def _read_edge_file(path: Path) -> dict[str, np.ndarray]:
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise SnapshotError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in EDGE_COLUMNS if c not in table.column_names]
    if missing:
        raise SnapshotError(f"{path}: required column(s) {missing} missing (have {table.column_names})")
    for name in EDGE_COLUMNS:
        if table.column(name).null_count:
            raise SnapshotError(f"{path}: column {name!r} holds {table.column(name).null_count} null value(s)")

    out: dict[str, np.ndarray] = {}
    for side in ("src", "dst"):
        types = _string_column(table, f"{side}_type", path)
        codes = pc.index_in(types, value_set=pa.array(list(NODE_TYPE_CODE), pa.string()))
        if codes.null_count:
            bad = pc.unique(pc.filter(types, pc.is_null(codes))).to_pylist()[:5]
            raise SnapshotError(
                f"{path}: column '{side}_type' holds unknown node type(s) {bad}; expected {list(NODE_TYPE_CODE)}"
            )
        lut = np.array(list(NODE_TYPE_CODE.values()), dtype=np.int8)
        out[f"{side}_code"] = lut[codes.to_numpy()]
        ids = table.column(f"{side}_id")
        if not pa.types.is_integer(ids.type):
            raise SnapshotError(f"{path}: column '{side}_id' has type {ids.type}, expected int64")
        out[f"{side}_id"] = ids.to_numpy().astype(np.int64, copy=False)
    # Edge types as integer codes into this file's distinct names (no Python object per entry).
    edge_type = _string_column(table, "edge_type", path)
    names = pc.unique(edge_type)
    out["edge_type_names"] = np.array(names.to_pylist(), dtype=object)
    out["edge_type_code"] = pc.index_in(edge_type, value_set=names).to_numpy().astype(np.int32, copy=False)
    weight = table.column("weight")
    if not (pa.types.is_floating(weight.type) or pa.types.is_integer(weight.type)):
        raise SnapshotError(f"{path}: column 'weight' has type {weight.type}, expected float64")
    w = weight.to_numpy().astype(np.float64, copy=False)
    bad = ~np.isfinite(w) | (w <= 0)
    if bad.any():
        raise SnapshotError(
            f"{path}: column 'weight' holds {int(bad.sum())} non-finite or non-positive value(s), "
            f"e.g. {w[bad][:3].tolist()}; the random walk needs positive weights"
        )
    out["weight"] = w
    return out


# --------------------------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _save(out_dir: Path, rel: str, arr: np.ndarray, arrays: dict[str, dict]) -> None:
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(arr), allow_pickle=False)
    arrays[rel] = {"dtype": str(arr.dtype), "shape": list(arr.shape), "sha256": _sha256(path)}


def _csr(src: np.ndarray, dst: np.ndarray, w: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """CSR rows sorted by (src, dst); repeated (src, dst) entries merged by summing weights."""
    order = np.lexsort((dst, src))
    src, dst, w = src[order], dst[order], w[order]
    merged = 0
    if src.size > 1:
        dup = (src[1:] == src[:-1]) & (dst[1:] == dst[:-1])
        if dup.any():
            starts = np.flatnonzero(np.concatenate(([True], ~dup)))
            w = np.add.reduceat(w, starts)
            src, dst = src[starts], dst[starts]
            merged = int(dup.sum())
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=indptr[1:])
    idx_dtype = np.int32 if n <= _INT32_MAX else np.int64
    return indptr, dst.astype(idx_dtype), w.astype(np.float32), merged


def _global_edge_type_codes(parts: list[dict[str, np.ndarray]]) -> tuple[list[str], np.ndarray]:
    """(sorted distinct edge type names, int32 code per entry) from the files' local codes: only the
    distinct names are Python strings; each file's codes are remapped by one lookup table."""
    names = sorted({str(t) for d in parts for t in d["edge_type_names"]})
    index = {t: i for i, t in enumerate(names)}
    codes = [
        np.array([index[str(t)] for t in d["edge_type_names"]], dtype=np.int32)[d["edge_type_code"]] for d in parts
    ]
    return names, (np.concatenate(codes) if codes else np.zeros(0, np.int32))


def build_snapshot(
    pruned_edges_dir: Path,
    out_dir: Path,
    subsets: dict[str, tuple[str, ...]] | None = None,
    source_partition: str = "",
) -> dict:
    """Build the snapshot of ``pruned_edges_dir`` into ``out_dir`` (an empty directory the caller publishes).

    ``subsets`` maps a relation-subset name to the edge types it holds (paper 3.1.1 R_i; contract defaults
    ``DEFAULT_SUBSETS``). Returns the manifest (also written as ``out_dir/manifest.json``, last).
    """
    t0 = time.perf_counter()
    pruned_edges_dir, out_dir = Path(pruned_edges_dir), Path(out_dir)
    subsets = {k: tuple(v) for k, v in (subsets or DEFAULT_SUBSETS).items()}
    if not subsets:
        raise SnapshotError("build_snapshot: at least one relation subset is required")
    for name, types in subsets.items():
        if not name or "/" in name or name.startswith("."):
            raise SnapshotError(f"relation subset name {name!r} is not a plain name")
        if not types:
            raise SnapshotError(f"relation subset {name!r} holds no edge type")
    out_dir.mkdir(parents=True, exist_ok=True)

    files = _edge_files(pruned_edges_dir)
    parts = [_read_edge_file(p) for p in files]
    source_files = [
        {"file": str(p.relative_to(pruned_edges_dir)), "rows": len(d["weight"])} for p, d in zip(files, parts)
    ]

    def cat(key: str, dtype) -> np.ndarray:
        return np.concatenate([d[key] for d in parts]) if parts else np.zeros(0, dtype=dtype)

    src_code, dst_code = cat("src_code", np.int8), cat("dst_code", np.int8)
    src_id, dst_id = cat("src_id", np.int64), cat("dst_id", np.int64)
    weight = cat("weight", np.float64)
    edge_names, edge_codes = _global_edge_type_codes(parts)
    parts.clear()  # free the per-file arrays

    # Node index: every endpoint of a kept entry, dense ids sorted by (type code, id).
    type_ids, type_offsets, acc = [], {}, 0
    for name, code in sorted(NODE_TYPE_CODE.items(), key=lambda kv: kv[1]):
        ids = np.unique(np.concatenate((src_id[src_code == code], dst_id[dst_code == code])))
        type_ids.append(ids)
        type_offsets[name] = [acc, acc + int(ids.size)]
        acc += int(ids.size)
    n = acc
    node_id = np.concatenate(type_ids) if type_ids else np.zeros(0, np.int64)
    node_type = np.repeat(
        np.array(sorted(NODE_TYPE_CODE.values()), dtype=np.int8), [ids.size for ids in type_ids]
    ).astype(np.int8)

    def dense(codes: np.ndarray, ids: np.ndarray) -> np.ndarray:
        out = np.empty(ids.size, dtype=np.int64)
        for name, code in NODE_TYPE_CODE.items():
            sel = codes == code
            lo, hi = type_offsets[name]
            out[sel] = lo + np.searchsorted(node_id[lo:hi], ids[sel])
        return out

    src, dst = dense(src_code, src_id), dense(dst_code, dst_id)
    del src_id, dst_id, src_code, dst_code
    degree = np.bincount(src, minlength=n).astype(np.int64)

    arrays: dict[str, dict] = {}
    _save(out_dir, "nodes/node_type.npy", node_type, arrays)
    _save(out_dir, "nodes/node_id.npy", node_id, arrays)
    _save(out_dir, "nodes/degree.npy", degree, arrays)

    entries_by_edge_type = {
        str(t): int(c) for t, c in zip(edge_names, np.bincount(edge_codes, minlength=len(edge_names)))
    }
    subset_meta = {}
    for name, types in subsets.items():
        codes = [i for i, t in enumerate(edge_names) if t in types]
        mask = np.isin(edge_codes, codes)
        indptr, indices, weights, merged = _csr(src[mask], dst[mask], weight[mask], n)
        _save(out_dir, f"csr/{name}/indptr.npy", indptr, arrays)
        _save(out_dir, f"csr/{name}/indices.npy", indices, arrays)
        _save(out_dir, f"csr/{name}/weights.npy", weights, arrays)
        subset_meta[name] = {
            "edge_types": list(types),
            "num_entries": int(indices.size),
            "duplicate_entries_merged": merged,
            "nodes_with_entries": int(np.count_nonzero(np.diff(indptr))),
        }

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source_partition": source_partition,
        "source_dir": str(pruned_edges_dir),
        "source_files": source_files,
        "num_nodes": n,
        "num_nodes_by_type": {t: hi - lo for t, (lo, hi) in type_offsets.items()},
        "type_offsets": type_offsets,
        "node_type_code": dict(NODE_TYPE_CODE),
        "num_entries": int(src.size),
        "entries_by_edge_type": entries_by_edge_type,
        "subsets": subset_meta,
        "arrays": arrays,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    # The manifest goes last: a directory without one is an unfinished build.
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


# --------------------------------------------------------------------------------------------- reading back


class GraphSnapshot:
    """A published snapshot, memory-mapped: ``open`` reads the manifest and the .npy headers only."""

    def __init__(self, path: Path, manifest: dict, arrays: dict[str, np.ndarray]):
        self.path = Path(path)
        self.manifest = manifest
        self._arrays = arrays
        self._csr_weight_sums: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, path: Path, verify: bool = False) -> GraphSnapshot:
        """Map a snapshot directory. ``verify=True`` also checks every array's sha256 (reads the data)."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(f"{mpath} not found: {path} is not a (finished) graph snapshot")
        manifest = json.loads(mpath.read_text())
        if manifest.get("format") != FORMAT:
            raise SnapshotError(f"{mpath}: field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise SnapshotError(
                f"{mpath}: field 'format_version' is {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        arrays = {}
        for rel, meta in manifest["arrays"].items():
            file = path / rel
            if verify and _sha256(file) != meta["sha256"]:
                raise SnapshotError(f"{file}: sha256 differs from the manifest's checksum")
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
            if str(arr.dtype) != meta["dtype"] or list(arr.shape) != meta["shape"]:
                raise SnapshotError(
                    f"{file}: dtype/shape {arr.dtype}/{list(arr.shape)} differ from the manifest's {meta['dtype']}/{meta['shape']}"
                )
            arrays[rel] = arr
        return cls(path, manifest, arrays)

    # -- nodes
    @property
    def num_nodes(self) -> int:
        return int(self.manifest["num_nodes"])

    @property
    def node_type(self) -> np.ndarray:
        return self._arrays["nodes/node_type.npy"]

    @property
    def node_id(self) -> np.ndarray:
        return self._arrays["nodes/node_id.npy"]

    def degree(self) -> np.ndarray:
        """int64 [n]: entries in the node's pruned adjacency list, all edge types (memory-mapped)."""
        return self._arrays["nodes/degree.npy"]

    @property
    def source_partition(self) -> str:
        return self.manifest["source_partition"]

    def type_range(self, node_type: str) -> tuple[int, int]:
        """Dense index range [lo, hi) of one node type."""
        lo, hi = self.manifest["type_offsets"][node_type]
        return int(lo), int(hi)

    def lookup(self, type_codes, ids) -> np.ndarray:
        """Dense index of each (type code, entity id); -1 where the node is not in the graph.

        ``type_codes`` may be one scalar code for all ids. Vectorised binary search in the id-sorted range
        of each type (touches O(log n) pages of the mapped id array per lookup).
        """
        ids = np.asarray(ids, dtype=np.int64)
        codes = np.broadcast_to(np.asarray(type_codes, dtype=np.int8), ids.shape)
        out = np.full(ids.shape, -1, dtype=np.int64)
        node_id = self.node_id
        for name, code in NODE_TYPE_CODE.items():
            sel = codes == code
            if not sel.any():
                continue
            lo, hi = self.type_range(name)
            if hi == lo:
                continue
            want = ids[sel]
            pos = np.searchsorted(node_id[lo:hi], want)
            pos_c = np.minimum(pos, hi - lo - 1)
            hit = np.asarray(node_id[lo:hi][pos_c]) == want
            out[sel] = np.where(hit, lo + pos_c, -1)
        return out

    # -- relation subsets
    @property
    def subsets(self) -> dict[str, tuple[str, ...]]:
        return {k: tuple(v["edge_types"]) for k, v in self.manifest["subsets"].items()}

    def csr(self, subset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr int64 [n+1], indices int32|int64 [m], weights float32 [m]) of relation subset R_i."""
        if subset not in self.manifest["subsets"]:
            raise KeyError(f"relation subset {subset!r} not in snapshot {self.path} (has {sorted(self.subsets)})")
        base = f"csr/{subset}/"
        return (
            self._arrays[base + "indptr.npy"],
            self._arrays[base + "indices.npy"],
            self._arrays[base + "weights.npy"],
        )

    def weighted_out_degree(self, subset: str) -> np.ndarray:
        """float64 [n]: sum of the subset's entry weights per node (the push threshold's denominator), cached."""
        if subset not in self._csr_weight_sums:
            from graph_engine.ppr import weighted_out_degree

            indptr, _, weights = self.csr(subset)
            self._csr_weight_sums[subset] = weighted_out_degree(indptr, weights)
        return self._csr_weight_sums[subset]

    def __repr__(self) -> str:
        return (
            f"GraphSnapshot({self.path}, partition={self.source_partition!r}, nodes={self.num_nodes}, "
            f"subsets={ {k: v['num_entries'] for k, v in self.manifest['subsets'].items()} })"
        )
