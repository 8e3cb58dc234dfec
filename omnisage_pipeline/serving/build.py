"""One day's index: read the published embeddings, build each type's index (tuning its search-time
parameter), stage the files, check the STAGED index against exact search, publish atomically.

The blocking check (``recall_at_10_vs_exact``): for ``queries`` entities sampled per type, recall@k of the
staged index -- loaded from the staged files exactly as a reader loads them, FAISS row -> id through the
staged id array, IVF-PQ re-ranked from the staged vectors -- against exact search over the SOURCE
embeddings (the Parquet just read, not the staged copy). A returned id counts as a hit when its true inner
product with the query reaches the exact k-th score (less ``tolerance``): entities with identical vectors
(e.g. no features and no neighbours) tie, and any of them is a correct answer. A failing check raises inside
``publish_partition``: the staging is removed and the previously published day stays as it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from omnisage_pipeline.serving.index import (
    METRIC,
    IndexParams,
    LoadedIndex,
    TypeIndex,
    apply_search_settings,
    build_faiss_index,
    plan_index_types,
    write_manifest,
    write_user_vectors,
)
from omnisage_pipeline.serving.vectors import (
    EmbeddingsError,
    Vectors,
    model_version_of,
    read_entity_vectors,
    read_user_vectors,
)
from omnisage_pipeline.storage.publish import publish_partition, published_path

CHECK_NAME = "recall_at_10_vs_exact"


class IndexCheckError(RuntimeError):
    """The staged index failed the recall check; nothing was published. ``recall``: per type."""

    def __init__(self, message: str, recall: dict[str, float] | None = None):
        super().__init__(message)
        self.recall = dict(recall or {})


@dataclass(frozen=True)
class CheckParams:
    queries: int = 1000  # sampled query entities per type
    k: int = 10
    min_recall: float = 0.95
    tune: bool = True  # raise ef_search / nprobe (doubling) until the tuning sample reaches the target
    tune_target: float | None = None  # recall the tuning aims at; None = min_recall
    max_ef_search: int = 1024
    max_rerank_factor: int = 32
    tolerance: float = 1e-4
    seed: int = 0


def sample_rows(n: int, count: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, count), replace=False))


def exact_kth_scores(source: Vectors, rows: np.ndarray, k: int) -> np.ndarray:
    """The exact k-th best inner product of each query row (k capped at the number of vectors)."""
    queries = np.ascontiguousarray(source.matrix[rows])
    exact, _ = faiss.knn(queries, source.matrix, min(k, len(source)), metric=faiss.METRIC_INNER_PRODUCT)
    return exact[:, -1:]


def recall_at_k(
    index: TypeIndex,
    source: Vectors,
    rows: np.ndarray,
    k: int,
    tolerance: float = 1e-4,
    kth: np.ndarray | None = None,
) -> float:
    """Tie-aware recall@k of ``index`` for the source vectors ``rows`` as queries (module docstring);
    ``kth``: ``exact_kth_scores`` of the same rows when already computed."""
    k = min(k, len(source))
    if k == 0 or len(rows) == 0:
        return 1.0
    queries = np.ascontiguousarray(source.matrix[rows])
    found_ids, _, found = index.search(queries, k)
    kth = exact_kth_scores(source, rows, k) if kth is None else kth
    pos = np.searchsorted(source.ids, found_ids).clip(0, len(source) - 1)
    known = found & (source.ids[pos] == found_ids)  # the mask, not an id value: any int64 is an id
    true_scores = np.einsum("qkd,qd->qk", source.matrix[pos], queries)
    hits = known & (true_scores >= kth - tolerance)
    # an id returned twice (a corrupted id array) counts once: hits first, then by id, within each query
    order = np.lexsort((found_ids, ~hits), axis=-1)
    ids, hit = np.take_along_axis(found_ids, order, 1), np.take_along_axis(hits, order, 1)
    repeats = (np.diff(ids, axis=1) == 0) & hit[:, 1:] & hit[:, :-1]
    return float((hits.sum() - repeats.sum()) / (len(rows) * k))


def tune_search(index: TypeIndex, source: Vectors, check: CheckParams) -> dict:
    """Double efSearch (hnsw), or nprobe and the re-ranked candidates (ivfpq), until the tuning sample (a
    different seed from the check's) reaches ``tune_target`` (default ``min_recall``) or every cap; returns
    the search settings."""
    settings = dict(index.settings)
    caps = {
        "hnsw": {"ef_search": check.max_ef_search},
        "ivfpq": {"nprobe": settings.get("nlist", 1), "rerank_factor": check.max_rerank_factor},
    }.get(index.kind, {})
    if not caps or not check.tune:
        return settings
    rows = sample_rows(len(source), check.queries, check.seed + 1)
    kth = exact_kth_scores(source, rows, check.k)
    while True:
        tuned = TypeIndex(index.entity_type, index.kind, index.index, index.ids, index.vectors, settings)
        apply_search_settings(index.index, index.kind, settings)
        recall = recall_at_k(tuned, source, rows, check.k, check.tolerance, kth)
        target = check.min_recall if check.tune_target is None else check.tune_target
        if recall >= target or all(settings[key] >= cap for key, cap in caps.items()):
            return {**settings, "tuning_recall": round(recall, 4)}
        settings.update({key: min(int(settings[key]) * 2, int(cap)) for key, cap in caps.items()})


def stage_type(
    folder: Path, entity_type: str, vectors: Vectors, kind: str, params: IndexParams, check: CheckParams
) -> dict:
    """Build, tune and write one type's index files into ``folder``; returns its manifest entry."""
    t0 = time.perf_counter()
    index, settings = build_faiss_index(kind, vectors.matrix, params)
    apply_search_settings(index, kind, settings)
    settings = tune_search(TypeIndex(entity_type, kind, index, vectors.ids, vectors.matrix, settings), vectors, check)
    faiss.write_index(index, str(folder / f"{entity_type}.faiss"))
    np.save(folder / f"{entity_type}.ids.npy", vectors.ids)
    np.save(folder / f"{entity_type}.vectors.npy", vectors.matrix)
    return {
        "index_type": kind,
        "count": len(vectors),
        "params": settings,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }


def staged_recall(staging: Path, source: dict[str, Vectors], check: CheckParams) -> dict[str, float]:
    """The check: recall@k of each type's STAGED index (loaded from the files) against exact search."""
    loaded = LoadedIndex.open(staging)
    out = {}
    for t, index in loaded.types.items():
        rows = sample_rows(len(source[t]), check.queries, check.seed)
        out[t] = round(recall_at_k(index, source[t], rows, check.k, check.tolerance), 4)
    return out


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def publish_index(
    indexes_dir: Path,
    day: str,
    source: dict[str, Vectors],
    users: Vectors | None,
    params: IndexParams,
    check: CheckParams,
    model_version: str,
    extra: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Stage, check and publish ``indexes/dt=day``; returns the manifest (plus size and timings)."""
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    counts = {t: len(v) for t, v in source.items() if len(v)}
    dims = {source[t].dim for t in counts} | ({users.dim} if users is not None and len(users) else set())
    if len(dims) != 1:
        raise EmbeddingsError(f"dt={day}: embeddings of dimensions {sorted(dims)} (none or several); cannot index")
    dim = dims.pop()
    plan = plan_index_types(counts, dim, params)
    log(f"dt={day}: index plan {plan} for {counts} vectors of dimension {dim}")
    with publish_partition(indexes_dir, day) as staging:
        entries = {t: stage_type(staging, t, source[t], plan[t], params, check) for t in plan}
        if users is not None and len(users):
            write_user_vectors(staging, users)
        manifest = {
            "partition": day,
            "model_version": model_version,
            "metric": METRIC,
            "dimension": dim,
            "counts": {**{t: len(v) for t, v in source.items()}, "user": len(users) if users is not None else 0},
            "types": entries,
            "config": asdict(params),
            **(extra or {}),
        }
        write_manifest(staging, manifest)
        recall = staged_recall(staging, source, check)
        manifest["check"] = {
            "name": CHECK_NAME,
            "recall": recall,
            "k": check.k,
            "min_recall": check.min_recall,
            "queries_per_type": check.queries,
            "passed": True,
        }
        failing = {t: r for t, r in recall.items() if r < check.min_recall}
        if failing:
            raise IndexCheckError(
                f"ann_index check {CHECK_NAME!r} failed for dt={day}: recall@{check.k} against exact search "
                + ", ".join(f"{t} {r:.4f}" for t, r in failing.items())
                + f" < {check.min_recall}; the staged index was not published",
                recall,
            )
        manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
        write_manifest(staging, manifest)
    manifest["size_bytes"] = _tree_bytes(published_path(indexes_dir, day))
    return manifest


def build_day_index(
    embeddings_dir: Path,
    user_embeddings_dir: Path,
    indexes_dir: Path,
    day: str,
    params: IndexParams,
    check: CheckParams,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Index the published embeddings (and user embeddings, when published) of ``day``. Reader leases keep
    retention from removing them while they are read."""
    from omnisage_pipeline.storage.retention import read_lease

    with read_lease(embeddings_dir, day) as path:
        source = read_entity_vectors(path)
        version = model_version_of(path)
        inputs = {"embeddings": os.fspath(path)}
    users = None
    if published_path(user_embeddings_dir, day) is not None:
        with read_lease(user_embeddings_dir, day) as path:
            user_version = model_version_of(path)
            if user_version == version:
                users = read_user_vectors(path)
                inputs["user_embeddings"] = os.fspath(path)
            elif log is not None:  # e.g. entities re-embedded with user_embeddings off: another model's space
                log(f"dt={day}: user embeddings are from model {user_version}, entities from {version}: no users")
    return publish_index(indexes_dir, day, source, users, params, check, version, {"inputs": inputs}, log)
