"""The ALS baseline of the recall report: implicit-feedback matrix factorisation (Hu, Koren, Volinsky 2008; the
``implicit`` library) of a users x (pins and boards) matrix of training interactions (``ml.interactions``).

The classic strong collaborative-filtering baseline, which sees the same engagement as the graph but no graph.
Entities are their item factors; a user is the least-squares user vector of their history against the item
factors (implicit's ``recalculate_user``: evaluation users are not rows of the training matrix).
``tune_als`` picks factors / regularisation / alpha / iterations / confidence weighting by recall@k on
validation pairs carved from training (``carve_validation_pairs``), and ``fit_als_baseline`` does the whole
protocol (tune on the split, refit on all training). implicit's own threads are set explicitly
(``num_threads``) and BLAS is held to one thread while it runs (implicit's advice: a BLAS thread pool inside
its solver threads oversubscribes the CPU).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from graph_engine.batch import NODE_TYPE_CODE
from ml.interactions import (
    PAIR_COLUMNS,
    InteractionMatrix,
    _rows_in,
    _table_pair_keys,
    build_interaction_matrix,
    engagement_pairs_from_logs,
    interactions_from_logs,
)

#: Searched by ``fit_als_baseline`` (every combination, 72 fits): the usual ranges for implicit ALS on data of
#: MovieLens-100k's size (thousands of items, ~100k interactions), and raw or unit-length item factors (dot
#: product or cosine between items: the cosine takes popularity out of item-item ranking).
DEFAULT_ALS_GRID: dict[str, list] = {
    "factors": [16, 32, 64, 128],
    "regularization": [0.1, 1.0, 10.0],
    "alpha": [1.0, 10.0, 40.0],
    "iterations": [15],
    "weighting": ["log"],
    "normalize": [False, True],
}
#: The daily recall report's smaller search (4 fits): a day's report should not spend minutes on a baseline.
REPORT_ALS_GRID: dict[str, list] = {
    "factors": [32, 64],
    "regularization": [0.1, 1.0],
    "alpha": [10.0],
    "iterations": [15],
}
WEIGHTINGS = ("count", "log", "binary")


def _confidence(matrix: sp.csr_matrix, weighting: str) -> sp.csr_matrix:
    """Counts -> implicit's r_ui (confidence 1 + alpha * r_ui): raw counts, log(1 + count) or 1."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"ALS weighting {weighting!r}: expected one of {WEIGHTINGS}")
    out = matrix.astype(np.float32, copy=True)
    if weighting == "log":
        out.data = np.log1p(out.data)
    elif weighting == "binary":
        out.data[:] = 1.0
    return out


def default_als_threads() -> int:
    """Two threads at most: the pipeline runs on small shared machines; pass num_threads to change it."""
    return max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class AlsParams:
    """One ALS fit's hyper-parameters (the keys of ``DEFAULT_ALS_GRID``). ``weighting``: counts -> r_ui as
    raw counts, log(1 + count) or 1; ``normalize``: unit-length item vectors (cosine between entities,
    popularity taken out of the ranking)."""

    factors: int = 64
    regularization: float = 0.1
    alpha: float = 10.0
    iterations: int = 15
    weighting: str = "log"
    normalize: bool = False


class AlsEmbedder:
    """Item factors for entities, least-squares user vectors of histories for users (module docstring),
    fitted with ``params`` (an ``AlsParams``; default its defaults).
    ``exclude_neighbor_ids`` is ignored: held-out pairs were removed from the matrix before fitting."""

    def __init__(
        self,
        interactions: InteractionMatrix,
        params: AlsParams | None = None,
        *,
        num_threads: int | None = None,
        seed: int = 0,
    ):
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        p = params or AlsParams()
        self.index, self.weighting = interactions, p.weighting
        self.params = asdict(p)
        threads = default_als_threads() if num_threads is None else int(num_threads)
        with threadpool_limits(1, "blas"):
            self.model = AlternatingLeastSquares(
                factors=p.factors,
                regularization=p.regularization,
                alpha=p.alpha,
                iterations=p.iterations,
                num_threads=threads,
                random_state=seed,
                calculate_training_loss=False,
            )
            self.model.fit(_confidence(interactions.matrix, p.weighting), show_progress=False)
        items = np.asarray(self.model.item_factors, dtype=np.float32)
        if p.normalize:
            items = items / np.maximum(np.linalg.norm(items, axis=1, keepdims=True), 1e-12)
        self.item_vectors = items
        self.dim = items.shape[1]

    def embed(self, entity_type, ids, exclude_neighbor_ids=None) -> np.ndarray:
        cols = self.index.columns(entity_type, ids)
        out = np.zeros((cols.size, self.dim), dtype=np.float32)  # not in the training matrix: zero
        found = cols >= 0
        out[found] = self.item_vectors[cols[found]]
        return out

    def embed_users(self, histories, user_ids=None) -> np.ndarray:
        """implicit's ``recalculate_user`` on each history's pins (counted like the training matrix)."""
        if len(histories) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = sp.vstack([self.index.item_rows("pin", h) for h in histories]).tocsr()
        rows.sum_duplicates()
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, "blas"):
            users = self.model.recalculate_user(np.arange(len(histories)), _confidence(rows, self.weighting))
        return np.asarray(users, dtype=np.float32).reshape(len(histories), self.dim)


def pair_recall(embedder, pairs: pa.Table, k: int = 10, pools: Mapping[str, np.ndarray] | None = None) -> float | None:
    """recall@k of ``pairs`` (pair columns) with ``ml.metrics.recall_at_k``, the evaluator's own rule: each
    positive against ``pools[pos_type]`` (default: every column of that type), query and positive left out."""
    import torch

    from ml.losses import entity_key
    from ml.metrics import recall_at_k, recall_at_k_sparse

    if pairs.num_rows == 0:
        return None
    qt, qid, pt, pid = (np.asarray(pairs.column(c).to_numpy(zero_copy_only=False)) for c in PAIR_COLUMNS)
    hits = []
    for t in np.unique(pt):
        pool = np.array(pools[t] if pools is not None else embedder.index.item_ids[t], dtype=np.int64)  # writable
        neg = embedder.embed(t, pool)
        for q_type in np.unique(qt[pt == t]):
            rows = np.flatnonzero((pt == t) & (qt == q_type))
            q_ids, p_ids = qid[rows].astype(np.int64), pid[rows].astype(np.int64)
            query, positive = embedder.embed(str(q_type), q_ids), embedder.embed(str(t), p_ids)
            sparse = sp.issparse(query)  # count-valued baselines (co-occurrence)
            r = (recall_at_k_sparse if sparse else recall_at_k)(
                query if sparse else torch.as_tensor(query),
                positive if sparse else torch.as_tensor(positive),
                neg if sparse else torch.as_tensor(neg),
                k=k,
                query_keys=entity_key(NODE_TYPE_CODE[str(q_type)], torch.as_tensor(q_ids)),
                positive_keys=entity_key(NODE_TYPE_CODE[str(t)], torch.as_tensor(p_ids)),
                negative_keys=entity_key(NODE_TYPE_CODE[str(t)], torch.as_tensor(pool)),
            )
            hits.append(r.hits.numpy())
    return float(np.concatenate(hits).mean())


@dataclass
class AlsTuning:
    """What ``tune_als`` tried: one row per grid point (params, validation recall@k, fit seconds)."""

    best: dict
    best_recall: float | None
    results: list[dict] = field(default_factory=list)
    validation_pairs: int = 0


def _grid_points(grid: Mapping[str, Sequence]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(list(grid[k]) for k in keys))]


def tune_als(
    train_matrix: InteractionMatrix,
    validation_pairs: pa.Table,
    grid: Mapping[str, Sequence] | None = None,
    *,
    k: int = 10,
    seed: int = 0,
    num_threads: int | None = None,
) -> AlsTuning:
    """Fit one ALS per grid point (every combination of ``grid``'s values; keys are ``AlsParams``
    parameters) on ``train_matrix`` and keep the best recall@k on ``validation_pairs`` - pairs whose events
    are NOT in ``train_matrix`` (``carve_validation_pairs``), so the choice is made on unseen pairs, never on the
    test set. Ties keep the earlier grid point."""
    points = _grid_points(DEFAULT_ALS_GRID if grid is None else grid)
    if not points:
        raise ValueError("tune_als: empty grid")
    results, best, best_recall = [], points[0], None
    for params in points:
        t0 = time.perf_counter()
        recall = pair_recall(
            AlsEmbedder(train_matrix, AlsParams(**params), num_threads=num_threads, seed=seed),
            validation_pairs,
            k,
        )
        results.append({**params, f"recall@{k}": recall, "seconds": round(time.perf_counter() - t0, 3)})
        if recall is not None and (best_recall is None or recall > best_recall):
            best, best_recall = params, recall
    return AlsTuning(dict(best), best_recall, results, validation_pairs.num_rows)


def carve_validation_pairs(
    logs: pa.Table,
    fraction: float = 0.1,
    max_pairs: int = 2000,
    seed: int = 0,
    exclude_pairs: pa.Table | None = None,
    types: Sequence[tuple[str, str]] | None = None,
) -> pa.Table:
    """A seeded ``fraction`` (at most ``max_pairs``) of the logs' distinct engagement pairs, excluded pairs
    (the evaluation's) left out: the validation split that ALS is tuned on, carved from training data.
    ``types``: keep only these (query type, positive type) pairs, to validate on the kind the test holds (the
    MovieLens benchmark's pairs are all pin -> pin)."""
    pairs = engagement_pairs_from_logs(logs)
    if types is not None:
        qt = np.asarray(pairs.column("query_type").to_numpy(zero_copy_only=False), dtype=object)
        pt = np.asarray(pairs.column("pos_type").to_numpy(zero_copy_only=False), dtype=object)
        keep = np.zeros(pairs.num_rows, dtype=bool)
        for q, p in types:
            keep |= (qt == q) & (pt == p)
        pairs = pairs.filter(pa.array(keep))
    excluded = _table_pair_keys(exclude_pairs)
    if excluded.shape[0] and pairs.num_rows:
        pairs = pairs.filter(pa.array(~_rows_in(_table_pair_keys(pairs), excluded)))
    n = min(round(fraction * pairs.num_rows), max_pairs)
    rows = np.sort(np.random.default_rng([seed, 31]).choice(pairs.num_rows, size=n, replace=False)) if n else []
    return pairs.take(pa.array(rows, pa.int64()))


@dataclass(frozen=True)
class AlsFitConfig:
    """How ``fit_als_baseline`` tunes: the ``grid`` searched (default ``DEFAULT_ALS_GRID``), the validation
    split carved from the training pairs (``carve_validation_pairs``), recall@``k``, seed and BLAS threads."""

    grid: Mapping[str, Sequence] | None = None
    validation_fraction: float = 0.1
    max_validation_pairs: int = 2000
    validation_types: Sequence[tuple[str, str]] | None = None
    k: int = 10
    seed: int = 0
    num_threads: int | None = None


def fit_als_baseline(
    logs: pa.Table,
    *,
    exclude_pairs: pa.Table | None = None,
    exclude_users=None,
    universe: Mapping[str, np.ndarray] | None = None,
    config: AlsFitConfig | None = None,
) -> tuple[AlsEmbedder, AlsTuning]:
    """The ALS baseline of the recall report and the benchmark: training interactions = ``logs`` less the events
    of ``exclude_pairs`` and ``exclude_users`` (the evaluation's pairs and users); tuned on a validation split
    carved from them (its events removed too), then refitted with the best parameters on all of them."""
    c = config or AlsFitConfig()
    validation = carve_validation_pairs(
        logs, c.validation_fraction, c.max_validation_pairs, c.seed, exclude_pairs, c.validation_types
    )
    both = pa.concat_tables(
        [t.select(list(PAIR_COLUMNS)).cast(validation.schema) for t in (exclude_pairs, validation) if t is not None]
    )
    tuning_matrix = build_interaction_matrix(interactions_from_logs(logs, both, exclude_users), universe)
    tuning = tune_als(tuning_matrix, validation, c.grid, k=c.k, seed=c.seed, num_threads=c.num_threads)
    matrix = build_interaction_matrix(interactions_from_logs(logs, exclude_pairs, exclude_users), universe)
    als = AlsEmbedder(matrix, AlsParams(**tuning.best), num_threads=c.num_threads, seed=c.seed)
    return als, tuning
