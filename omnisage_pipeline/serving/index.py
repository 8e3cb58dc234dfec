"""Per-type FAISS indexes over unit vectors (inner product = cosine), their files and their manifest.

Index type by size (``IndexParams``; the ``ann_index`` asset's config holds the same fields):

- ``flat``  (``IndexFlatIP``): exact; chosen when a type has at most ``flat_max_vectors`` vectors (a query scans
  all of them: 10K x 256 floats = 10 MB, ~2-3 ms on one core; 20K measured ~5 ms median).
- ``hnsw``  (``IndexHNSWFlat``, M = ``hnsw_m``, efConstruction / efSearch): above that; ~(4 d + 8 M) bytes a
  vector in memory, sub-millisecond queries.
- ``ivfpq`` (``IndexIVFPQ``: ``ivf_nlist`` lists, ``pq_m`` sub-quantizers of ``pq_nbits`` bits, ``ivf_nprobe``
  lists probed): when ``memory_budget_mb`` cannot hold the plan above, the largest types switch to it
  (pq_m bytes + 8 a vector). Its approximate scores are re-ranked exactly: ``rerank_factor * k`` candidates
  are re-scored against the full vectors, which stay on disk (memory-mapped, outside the budget).

Files of one day (``indexes/dt=D/``): per type ``<type>.faiss`` (the index), ``<type>.ids.npy`` (int64, FAISS
row -> the contract's entity id, sorted so an id is found by binary search) and ``<type>.vectors.npy`` (the
unit vectors, row-aligned: the query vector of an entity, exact re-ranking, the check); ``user.ids.npy`` /
``user.vectors.npy`` (query vectors for the homefeed, no index); ``manifest.json``.

Ids: FAISS labels are row positions (0..n-1, -1 = FAISS padding), never entity ids, so the whole int64
range -- negative ids, int64 min and max included -- is a normal id; a search reports padding with an
explicit mask (``TypeIndex.search``), not with an id value.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from omnisage_pipeline.serving.vectors import USER, Vectors

MANIFEST = "manifest.json"
INDEX_TYPES = ("flat", "hnsw", "ivfpq")
METRIC = "inner_product"


@dataclass(frozen=True)
class IndexParams:
    index_type: str = "auto"  # auto | flat | hnsw | ivfpq (auto: by size and memory budget)
    flat_max_vectors: int = 10_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 64
    ivf_nlist: int = 0  # 0: 4 * sqrt(n), at most n / 39 (FAISS wants ~39 training points per list)
    ivf_nprobe: int = 16
    pq_m: int = 0  # 0: the largest divisor of d that is <= d / 4 (4 dimensions per byte)
    pq_nbits: int = 8
    rerank_factor: int = 4
    memory_budget_mb: float | None = None
    train_sample: int = 100_000
    seed: int = 0


def estimated_bytes(kind: str, n: int, d: int, params: IndexParams) -> int:
    """In-memory size of an index (FAISS's layouts, ids and graph links; the mmapped vectors not counted)."""
    if kind == "flat":
        return n * d * 4
    if kind == "hnsw":
        return n * (d * 4 + params.hnsw_m * 2 * 4 + 8)
    return n * (pq_m_for(d, params) * params.pq_nbits // 8 + 8) + nlist_for(n, params) * d * 4


def pq_m_for(d: int, params: IndexParams) -> int:
    if params.pq_m:
        if d % params.pq_m:
            raise ValueError(f"ann_index config field 'pq_m'={params.pq_m} must divide the dimension {d}")
        return params.pq_m
    return max(m for m in range(1, max(d // 4, 1) + 1) if d % m == 0)


def nlist_for(n: int, params: IndexParams) -> int:
    if params.ivf_nlist:
        return max(1, min(params.ivf_nlist, n))
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def plan_index_types(counts: dict[str, int], d: int, params: IndexParams) -> dict[str, str]:
    """Index type per entity type: flat below the threshold, hnsw above; under a memory budget the largest
    types switch to ivfpq until the plan fits (an error naming the field when even that does not)."""
    if params.index_type != "auto":
        if params.index_type not in INDEX_TYPES:
            raise ValueError(f"ann_index config field 'index_type'={params.index_type!r}: one of auto, {INDEX_TYPES}")
        return {t: params.index_type for t in counts}
    plan = {t: "flat" if n <= params.flat_max_vectors else "hnsw" for t, n in counts.items()}
    if params.memory_budget_mb is None:
        return plan
    budget = params.memory_budget_mb * 2**20

    def total() -> int:
        return sum(estimated_bytes(plan[t], counts[t], d, params) for t in plan)

    # PQ needs 2**nbits training points per sub-quantizer centroid set
    candidates = [t for t in sorted(counts, key=counts.get, reverse=True) if counts[t] >= 2**params.pq_nbits]
    for t in candidates:
        if total() <= budget:
            break
        plan[t] = "ivfpq"
    if total() > budget:
        raise ValueError(
            f"ann_index config field 'memory_budget_mb'={params.memory_budget_mb}: the smallest plan {plan} needs "
            f"{total() / 2**20:.1f} MiB"
        )
    return plan


def build_faiss_index(kind: str, matrix: np.ndarray, params: IndexParams) -> tuple[faiss.Index, dict]:
    """Train (ivfpq) and fill one index; returns it and the parameters recorded in the manifest."""
    n, d = matrix.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        settings: dict = {}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.hnsw_ef_construction
        settings = {
            "m": params.hnsw_m,
            "ef_construction": params.hnsw_ef_construction,
            "ef_search": params.hnsw_ef_search,
        }
    elif kind == "ivfpq":
        nlist, pq_m = nlist_for(n, params), pq_m_for(d, params)
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, pq_m, params.pq_nbits, faiss.METRIC_INNER_PRODUCT)
        # FAISS warns below 39 points a centroid; small days are expected, and the check measures the result
        index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1
        rng = np.random.default_rng(params.seed)
        sample = matrix[np.sort(rng.choice(n, min(n, params.train_sample), replace=False))]
        index.train(sample)
        settings = {
            "nlist": nlist,
            "nprobe": min(params.ivf_nprobe, nlist),
            "pq_m": pq_m,
            "pq_nbits": params.pq_nbits,
            "rerank_factor": params.rerank_factor,
        }
    else:
        raise ValueError(f"unknown index type {kind!r}; expected one of {INDEX_TYPES}")
    index.add(matrix)
    return index, settings


def apply_search_settings(index: faiss.Index, kind: str, settings: dict) -> None:
    """Search-time parameters are set once, on load: the loaded index is then only read (thread-safe)."""
    if kind == "hnsw":
        index.hnsw.efSearch = int(settings["ef_search"])
    elif kind == "ivfpq":
        index.nprobe = int(settings["nprobe"])


@dataclass(frozen=True)
class TypeIndex:
    """One entity type's index, its row -> id array and its (memory-mapped) unit vectors. Immutable."""

    entity_type: str
    kind: str
    index: faiss.Index
    ids: np.ndarray
    vectors: np.ndarray
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """FAISS rows of ``ids`` (-1 for an id not in the index)."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids).clip(0, max(len(self.ids) - 1, 0))
        found = (pos < len(self.ids)) & (self.ids[pos] == ids) if len(self.ids) else np.zeros(len(ids), bool)
        return np.where(found, pos, -1)

    def search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (FAISS rows int64 [q, k], scores float32 [q, k]); row -1 / score -inf pad when the index is
        smaller. Rows, not ids: every int64 is a valid entity id, so no id value can mark padding."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.vectors.shape[1])
        if len(self) == 0:
            return np.full((len(queries), k), -1, np.int64), np.full((len(queries), k), -np.inf, np.float32)
        fetch = k * int(self.settings.get("rerank_factor", 1)) if self.kind == "ivfpq" else k
        scores, rows = self.index.search(queries, min(fetch, len(self)))
        if self.kind == "ivfpq":
            scores = self._exact_scores(queries, rows)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        rows, scores = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
        if rows.shape[1] < k:
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return rows.astype(np.int64, copy=False), np.where(rows >= 0, scores, -np.inf).astype(np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k (entity ids int64 [q, k], scores float32 [q, k], found bool [q, k]); ``found`` is False where
        the result is padding (the index holds fewer than k): the id there is meaningless."""
        rows, scores = self.search_rows(queries, k)
        found = rows >= 0
        ids = self.ids[rows.clip(0)] if len(self) else np.zeros(rows.shape, np.int64)
        return np.where(found, ids, 0), scores, found

    def _exact_scores(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Re-rank: the exact inner product of each candidate's full vector (read from the mmap)."""
        flat = rows.reshape(-1)
        valid = flat >= 0
        gathered = np.zeros((flat.size, queries.shape[1]), np.float32)
        taken = np.unique(flat[valid])  # sorted reads from the memory map
        gathered[valid] = np.asarray(self.vectors[taken])[np.searchsorted(taken, flat[valid])]
        exact = np.einsum("qkd,qd->qk", gathered.reshape(*rows.shape, -1), queries)
        return np.where(rows >= 0, exact, -np.inf).astype(np.float32)


def write_user_vectors(folder: Path, users: Vectors) -> None:
    np.save(folder / f"{USER}.ids.npy", users.ids)
    np.save(folder / f"{USER}.vectors.npy", users.matrix)


class IndexFilesError(ValueError):
    """A file of an index folder that cannot be read (the message names it)."""


def _read(path: Path, reader):
    try:
        return reader(path)
    except (OSError, ValueError, RuntimeError, EOFError) as exc:  # FAISS raises RuntimeError
        raise IndexFilesError(f"{path}: cannot read it: {exc}") from exc


@dataclass(frozen=True)
class LoadedIndex:
    """One day's indexes as loaded by a reader (the CLI, the service): immutable, swapped as a whole."""

    path: Path
    manifest: dict
    types: dict[str, TypeIndex]
    users: Vectors | None

    @property
    def partition(self) -> str:
        return str(self.manifest["partition"])

    @property
    def model_version(self) -> str:
        return str(self.manifest.get("model_version", ""))

    @classmethod
    def open(cls, folder: Path) -> LoadedIndex:
        """Load ``folder`` (a published version or a staging directory): indexes into memory, vectors mmapped.
        A missing, truncated or unreadable file raises ``IndexFilesError`` naming it."""
        folder = Path(folder)
        manifest = _read(folder / MANIFEST, lambda p: json.loads(p.read_text()))
        try:
            entries = {t: (str(e["index_type"]), dict(e["params"])) for t, e in manifest["types"].items()}
            if "partition" not in manifest:
                raise KeyError("partition")
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise IndexFilesError(
                f"{folder / MANIFEST}: fields 'partition' and 'types' (each type's index_type and params) "
                f"expected ({exc!r})"
            ) from exc
        types = {}
        for t, (kind, params) in entries.items():
            index = _read(folder / f"{t}.faiss", lambda p: faiss.read_index(str(p)))
            apply_search_settings(index, kind, params)
            ids = _read(folder / f"{t}.ids.npy", np.load)
            vectors = _read(folder / f"{t}.vectors.npy", lambda p: np.load(p, mmap_mode="r"))
            if not (index.ntotal == len(ids) == len(vectors)):
                raise IndexFilesError(
                    f"{folder}: {t} index has {index.ntotal} rows, ids {len(ids)}, vectors {len(vectors)}"
                )
            types[t] = TypeIndex(t, kind, index, ids, vectors, params)
        users = None
        if (folder / f"{USER}.ids.npy").is_file():
            users = Vectors(
                _read(folder / f"{USER}.ids.npy", np.load),
                _read(folder / f"{USER}.vectors.npy", lambda p: np.load(p, mmap_mode="r")),
            )
        return cls(folder, manifest, types, users)


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
