"""Baselines of the recall report (paper 4.2, Table 2), all scored by ``ml.evaluator.Evaluator`` on exactly
the model's evaluation sets and negative pools.

- ``random_baseline``: an independent Gaussian vector per entity and per user - the chance level,
  about k / (pool + 1).
- ``PopularityEmbedder``: every query ranks candidates by popularity, 1 + log(1 + degree) in the day's graph
  snapshot (the pruned graph keeps degree order: d_target = d^alpha is monotone, A.1). Scores are a product
  q.c = pop(q) * pop(c) with pop > 0, so for one query the ranking is by pop(c) alone.
- ``CooccurrenceEmbedder``: item co-occurrence on the same graph. Entity e is the sparse indicator of
  itself plus its neighbours, x_e = e + A_e, so x_q . x_c = |N(q) & N(c)| + [c in N(q)] + [q in N(c)] +
  [q = c]: the number of boards/pins both were engaged with (plus direct co-engagement). A user is the sum
  of the x of the pins in their history. ``exclude_neighbor_ids`` removes the evaluation pair's own edge.
  Vectors are ``scipy.sparse`` rows (the evaluator scores them exactly, ``ml.metrics.recall_at_k_sparse``).
- ``oracle_baseline``: the generator's planted latent vectors (``DIR/_truth``): pins and boards by their
  latent, users by their drifted interest on the evaluation day. The ceiling a model can approach on
  synthetic data; only defined when the input came from the generator.
- The PinSage-like model (Table 2: the same pipeline with mean-pooling aggregation and the entity-entity task
  only) is a trained ``OmniSageModel``; ``ml.training_run`` trains it beside the model and the report
  scores it through ``ml.evaluator.model_embedders``.
- ``AlsEmbedder``: implicit-feedback matrix factorisation (Hu, Koren, Volinsky 2008; the ``implicit`` library)
  of a users x (pins and boards) matrix of training interactions - the classic strong collaborative-filtering
  baseline, which sees the same engagement as the graph but no graph. Entities are their item factors; a user
  is the least-squares user vector of their history against the item factors (implicit's
  ``recalculate_user``: evaluation users are not rows of the training matrix). ``build_interaction_matrix``
  builds the matrix from ``interactions_from_logs`` (every event: user x pin; a save also user x board) or
  ``interactions_from_sequences``; an event that created an excluded (held-out) pair is dropped whole, as the
  graph drops the pair's edge. ``tune_als`` picks factors / regularisation / alpha / iterations / confidence
  weighting by recall@k on validation pairs carved from training (``carve_validation_pairs``), and
  ``fit_als_baseline`` does the whole protocol (tune on the split, refit on all training). implicit's own
  threads are set explicitly (``num_threads``) and BLAS is held to one thread while it runs (implicit's
  advice: a BLAS thread pool inside its solver threads oversubscribes the CPU).

Entity-feature queries need the model's g_x encoders; these baselines have none, so that task reports null
with n = 0 for them (contract: a task without examples is null, n = 0).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from graph_engine.batch import NODE_TYPE_CODE
from ml.evaluator import TableEmbedder

__all__ = [
    "DEFAULT_ALS_GRID",
    "REPORT_ALS_GRID",
    "AlsEmbedder",
    "AlsFitConfig",
    "AlsParams",
    "AlsTuning",
    "CooccurrenceEmbedder",
    "InteractionMatrix",
    "PopularityEmbedder",
    "RandomUserEmbedder",
    "TableUserEmbedder",
    "build_interaction_matrix",
    "carve_validation_pairs",
    "engagement_pairs_from_logs",
    "fit_als_baseline",
    "interactions_from_logs",
    "interactions_from_sequences",
    "oracle_baseline",
    "random_baseline",
    "tune_als",
]


class RandomUserEmbedder:
    """A fresh Gaussian vector per user, seeded by the user id (mod 2**64: negative ids are ids too), so the
    same user gets the same vector."""

    def __init__(self, dim: int = 32, seed: int = 0):
        self.dim, self.seed = dim, seed

    def embed_users(self, histories, user_ids=None) -> np.ndarray:
        ids = np.arange(len(histories)) if user_ids is None else np.asarray(user_ids, dtype=np.int64)
        return (
            np.stack(
                [np.random.default_rng([self.seed, int(u) % 2**64]).standard_normal(self.dim) for u in ids]
            ).astype(np.float32)
            if len(ids)
            else np.zeros((0, self.dim), np.float32)
        )


def random_baseline(universe: dict[str, np.ndarray], dim: int = 32, seed: int = 0):
    """(EntityEmbedder, UserEmbedder) of independent random vectors."""
    from ml.evaluator import random_embedder

    return random_embedder(universe, dim=dim, seed=seed), RandomUserEmbedder(dim=dim, seed=seed + 1)


class TableUserEmbedder:
    """Users looked up by id in a table (the oracle's planted interests); unknown users get zeros."""

    def __init__(self, user_ids: np.ndarray, vectors: np.ndarray):
        self.table = TableEmbedder({"user": (user_ids, vectors)})

    def embed_users(self, histories, user_ids=None) -> np.ndarray:
        if user_ids is None:
            raise ValueError("TableUserEmbedder needs the evaluation users' ids")
        return self.table.embed("user", user_ids)


def oracle_baseline(truth, day: str):
    """(EntityEmbedder, UserEmbedder) of the planted latent vectors (``ml.truth.Truth``)."""
    entities = TableEmbedder(
        {"pin": (truth.pin_id, truth.pin_latent), "board": (truth.board_id, truth.board_latent)}
    )
    return entities, TableUserEmbedder(truth.user_id, truth.user_latents_on_day(day))


class PopularityEmbedder:
    """1-d vectors pop(e) = 1 + log(1 + degree(e)); users are the constant 1 (module docstring)."""

    def __init__(self, snapshot):
        self.snapshot = snapshot
        self.pop = 1.0 + np.log1p(np.asarray(snapshot.degree(), dtype=np.float64))

    def embed(self, entity_type, ids, exclude_neighbor_ids=None) -> np.ndarray:
        rows = self.snapshot.lookup(NODE_TYPE_CODE[entity_type], np.asarray(ids, dtype=np.int64))
        out = np.ones((rows.size, 1), dtype=np.float32)  # not in the graph: degree 0
        found = rows >= 0
        out[found, 0] = self.pop[rows[found]]
        return out

    def embed_users(self, histories, user_ids=None) -> np.ndarray:
        return np.ones((len(histories), 1), dtype=np.float32)


class CooccurrenceEmbedder:
    """Sparse x_e = e + A_e over the snapshot's nodes, all relation subsets merged (module docstring)."""

    def __init__(self, snapshot):
        self.snapshot = snapshot
        n = snapshot.num_nodes
        merged = None
        for subset in snapshot.subsets:
            indptr, indices, _ = snapshot.csr(subset)
            a = sp.csr_matrix(
                (
                    np.ones(len(indices), dtype=np.float32),
                    np.asarray(indices, dtype=np.int64),
                    np.asarray(indptr),
                ),
                shape=(n, n),
            )
            merged = a if merged is None else merged.maximum(a)
        adjacency = merged if merged is not None else sp.csr_matrix((n, n), dtype=np.float32)
        adjacency = adjacency.maximum(adjacency.T)  # co-engagement is symmetric
        self.x = (adjacency + sp.identity(n, dtype=np.float32, format="csr")).tocsr()
        self.x.data[:] = 1.0  # indicators: a pair counts once however many relation subsets hold it
        self.x.sort_indices()

    def _rows(self, entity_type: str, ids) -> np.ndarray:
        return self.snapshot.lookup(NODE_TYPE_CODE[entity_type], np.asarray(ids, dtype=np.int64).reshape(-1))

    def embed(self, entity_type, ids, exclude_neighbor_ids=None) -> sp.csr_matrix:
        rows = self._rows(entity_type, ids)
        found = rows >= 0
        selector = sp.csr_matrix(
            (np.ones(int(found.sum()), np.float32), (np.flatnonzero(found), rows[found])),
            shape=(rows.size, self.snapshot.num_nodes),
        )
        out = (selector @ self.x).tocsr()
        if exclude_neighbor_ids is not None:
            # The pair's own edge: drop the other end from this row (both ends are pins or boards; the
            # excluded id's type is whichever of the two holds it, so look it up under both).
            ex = np.asarray(exclude_neighbor_ids, dtype=np.int64).reshape(-1)
            drop = np.full(ex.size, -1, dtype=np.int64)
            for t in ("pin", "board"):
                hit = self._rows(t, ex)
                drop = np.where((drop < 0) & (hit >= 0), hit, drop)
            drop = np.where(drop == rows, -1, drop)  # never the entity itself
            entry_row = np.repeat(np.arange(rows.size), np.diff(out.indptr))
            out.data[out.indices == drop[entry_row]] = 0.0
            out.eliminate_zeros()
        return out

    def embed_users(self, histories, user_ids=None) -> sp.csr_matrix:
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        flat = (
            np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
            if len(histories)
            else np.zeros(0, np.int64)
        )
        rows = self._rows("pin", flat)
        owner = np.repeat(np.arange(len(histories)), lengths)
        found = rows >= 0
        selector = sp.csr_matrix(
            (np.ones(int(found.sum()), np.float32), (owner[found], rows[found])),
            shape=(len(histories), self.snapshot.num_nodes),
        )
        return (selector @ self.x).tocsr()


# ---------------------------------------------------------------------------------------------------------- ALS
ALS_ITEM_TYPES = ("pin", "board")
INTERACTION_SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("entity_type", pa.string()), ("entity_id", pa.int64())]
)
PAIR_COLUMNS = ("query_type", "query_id", "pos_type", "pos_id")
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


def _pair_keys(types_a, ids_a, types_b, ids_b) -> np.ndarray:
    """[n, 4] int64 unordered pair keys (type code, id) of the smaller end first, so {a, b} == {b, a}."""
    ca = np.array([NODE_TYPE_CODE[t] for t in np.asarray(types_a, dtype=object)], dtype=np.int64).reshape(-1)
    cb = np.array([NODE_TYPE_CODE[t] for t in np.asarray(types_b, dtype=object)], dtype=np.int64).reshape(-1)
    ia, ib = np.asarray(ids_a, np.int64).reshape(-1), np.asarray(ids_b, np.int64).reshape(-1)
    a_first = (ca < cb) | ((ca == cb) & (ia <= ib))
    return np.stack([np.where(a_first, ca, cb), np.where(a_first, ia, ib),
                     np.where(a_first, cb, ca), np.where(a_first, ib, ia)], axis=1)  # fmt: skip


def _rows_in(keys: np.ndarray, of: np.ndarray) -> np.ndarray:
    """bool [len(keys)]: the row of ``keys`` is a row of ``of`` (both [n, 4] int64)."""
    if keys.shape[0] == 0 or of.shape[0] == 0:
        return np.zeros(keys.shape[0], dtype=bool)
    _, inverse = np.unique(np.concatenate([of, keys]), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    return np.isin(inverse[of.shape[0] :], inverse[: of.shape[0]])


def _table_pair_keys(pairs) -> np.ndarray:
    """Pair keys of a table with ``query_type, query_id, pos_type, pos_id`` (``ml.training_examples``' pairs,
    ``eval_pairs``, the MovieLens importer's ``heldout_pairs``)."""
    if pairs is None or pairs.num_rows == 0:
        return np.zeros((0, 4), dtype=np.int64)
    cols = [pairs.column(c).to_numpy(zero_copy_only=False) for c in PAIR_COLUMNS]
    return _pair_keys(*cols)


def _ids_and_mask(column) -> tuple[np.ndarray, np.ndarray]:
    """(int64 ids, bool valid) of a nullable id column: a mask, not a sentinel (any int64 is an id)."""
    ids = pc.fill_null(column, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return ids, pc.is_valid(column).to_numpy(zero_copy_only=False)


def _event_pairs(logs: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The contract's edges of each event (README "Edges"): (pin-pin key, has one, pin-board key, has one)."""
    n = logs.num_rows
    action = np.asarray(logs.column("action").to_numpy(zero_copy_only=False), dtype=object)
    surface = np.asarray(logs.column("surface").to_numpy(zero_copy_only=False), dtype=object)
    pin = logs.column("pin_id").to_numpy(zero_copy_only=False).astype(np.int64)
    query, has_query = _ids_and_mask(logs.column("query_pin_id"))
    board, has_board = _ids_and_mask(logs.column("board_id"))
    pp = (surface == "related_pins") & np.isin(action, ["save", "click"]) & has_query & (query != pin)
    pb = (action == "save") & has_board
    pins = np.full(n, "pin", dtype=object)
    return (_pair_keys(pins, query, pins, pin), pp,
            _pair_keys(np.full(n, "board", dtype=object), board, pins, pin), pb)  # fmt: skip


def engagement_pairs_from_logs(logs: pa.Table) -> pa.Table:
    """The distinct engagement pairs of the logs in the pair columns, one row per unordered pair: pin -> pin
    (related-pins saves/clicks; the smaller id is the query) and board -> pin (saves). A validation split is
    carved from these, as the evaluation's engagement pairs are."""
    pp_key, pp, pb_key, pb = _event_pairs(logs)
    pin_pin = np.unique(pp_key[pp], axis=0) if pp.any() else np.zeros((0, 4), np.int64)
    board_pin = np.unique(pb_key[pb], axis=0) if pb.any() else np.zeros((0, 4), np.int64)
    # canonical keys put the pin (code 0) first: a board -> pin pair is (board = end 2, pin = end 1)
    n_pp, n_pb = pin_pin.shape[0], board_pin.shape[0]
    return pa.table(
        {
            "query_type": pa.array(["pin"] * n_pp + ["board"] * n_pb, pa.string()),
            "query_id": pa.array(np.concatenate([pin_pin[:, 1], board_pin[:, 3]]), pa.int64()),
            "pos_type": pa.array(["pin"] * (n_pp + n_pb), pa.string()),
            "pos_id": pa.array(np.concatenate([pin_pin[:, 3], board_pin[:, 1]]), pa.int64()),
        }
    )


def interactions_from_logs(
    logs: pa.Table,
    exclude_pairs: pa.Table | None = None,
    exclude_users: Sequence[int] | np.ndarray | None = None,
) -> pa.Table:
    """(user_id, entity_type, entity_id) rows: each event's pin, and its board when it is a save. An event whose
    pin-pin or pin-board edge is an excluded pair is dropped whole (its user row then holds the two ends only
    through other events), and so is every event of an excluded user (evaluation users are embedded from their
    history, never fitted)."""
    keep = np.ones(logs.num_rows, dtype=bool)
    excluded = _table_pair_keys(exclude_pairs)
    if excluded.shape[0]:
        pp_key, pp, pb_key, pb = _event_pairs(logs)
        keep &= ~(pp & _rows_in(pp_key, excluded)) & ~(pb & _rows_in(pb_key, excluded))
    user = logs.column("user_id").to_numpy(zero_copy_only=False).astype(np.int64)
    if exclude_users is not None and len(exclude_users):
        keep &= ~np.isin(user, np.asarray(exclude_users, dtype=np.int64))
    pin = logs.column("pin_id").to_numpy(zero_copy_only=False).astype(np.int64)[keep]
    board, has_board = (a[keep] for a in _ids_and_mask(logs.column("board_id")))
    is_save = np.asarray(logs.column("action").to_numpy(zero_copy_only=False), dtype=object)[keep] == "save"
    user = user[keep]
    saved = is_save & has_board
    return pa.table({
        "user_id": pa.array(np.concatenate([user, user[saved]]), pa.int64()),
        "entity_type": pa.array(["pin"] * user.size + ["board"] * int(saved.sum()), pa.string()),
        "entity_id": pa.array(np.concatenate([pin, board[saved]]), pa.int64()),
    })  # fmt: skip


def interactions_from_sequences(sequences: pa.Table) -> pa.Table:
    """(user_id, "pin", pin) rows of ``ml.training_examples`` sequences (history and future of training users)."""
    from ml.example_loader import list_column

    rows_user, rows_pin = [], []
    for name in ("history", "future"):
        offsets, values = list_column(sequences, name)
        rows_user.append(np.repeat(sequences.column("user_id").to_numpy().astype(np.int64), np.diff(offsets)))
        rows_pin.append(np.asarray(values, np.int64))
    user, pin = np.concatenate(rows_user), np.concatenate(rows_pin)
    return pa.table({"user_id": pa.array(user, pa.int64()), "entity_type": pa.array(["pin"] * user.size, pa.string()),
                     "entity_id": pa.array(pin, pa.int64())})  # fmt: skip


@dataclass
class InteractionMatrix:
    """users x items counts (float32 CSR); columns are the pins, then the boards, each type sorted by id."""

    matrix: sp.csr_matrix
    user_ids: np.ndarray
    item_ids: dict[str, np.ndarray]

    @property
    def offsets(self) -> dict[str, int]:
        return {"pin": 0, "board": int(self.item_ids["pin"].size)}

    def columns(self, entity_type: str, ids) -> np.ndarray:
        """Column of each (entity_type, id); -1 when the entity has no column."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        known = self.item_ids.get(entity_type, np.zeros(0, np.int64))
        if known.size == 0:
            return np.full(ids.size, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(known, ids), 0, known.size - 1)
        return np.where(known[pos] == ids, pos + self.offsets[entity_type], -1).astype(np.int64)

    def item_rows(self, entity_type: str, ids) -> sp.csr_matrix:
        """[len(ids) is one row] a single row of counts over the columns (for a user's history)."""
        cols = self.columns(entity_type, ids)
        cols = cols[cols >= 0]
        return sp.csr_matrix((np.ones(cols.size, np.float32), (np.zeros(cols.size, np.int64), cols)),
                             shape=(1, self.matrix.shape[1]))  # fmt: skip


def build_interaction_matrix(
    interactions: pa.Table, universe: Mapping[str, np.ndarray] | None = None
) -> InteractionMatrix:
    """Count matrix of ``interactions`` (INTERACTION_SCHEMA rows; repeats add up). ``universe``: extra pin and
    board ids that get a column even without interactions (they embed to the zero-interaction solution)."""
    types = np.asarray(interactions.column("entity_type").to_numpy(zero_copy_only=False), dtype=object)
    ids = interactions.column("entity_id").to_numpy(zero_copy_only=False).astype(np.int64)
    users = interactions.column("user_id").to_numpy(zero_copy_only=False).astype(np.int64)
    unknown = set(np.unique(types).tolist()) - set(ALS_ITEM_TYPES)
    if unknown:
        raise ValueError(
            f"build_interaction_matrix: entity types {sorted(unknown)}; expected {ALS_ITEM_TYPES}"
        )
    item_ids = {}
    for t in ALS_ITEM_TYPES:
        extra = np.asarray((universe or {}).get(t, np.zeros(0)), dtype=np.int64)
        item_ids[t] = np.unique(np.concatenate([ids[types == t], extra]))
    user_ids = np.unique(users)
    index = InteractionMatrix(sp.csr_matrix((user_ids.size, 0), dtype=np.float32), user_ids, item_ids)
    cols = np.zeros(ids.size, dtype=np.int64)
    for t in ALS_ITEM_TYPES:
        sel = types == t
        cols[sel] = index.columns(t, ids[sel])
    n_items = sum(v.size for v in item_ids.values())
    matrix = sp.coo_matrix((np.ones(ids.size, np.float32), (np.searchsorted(user_ids, users), cols)),
                           shape=(user_ids.size, n_items)).tocsr()  # fmt: skip
    matrix.sum_duplicates()
    matrix.sort_indices()
    index.matrix = matrix
    return index


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
                factors=p.factors, regularization=p.regularization, alpha=p.alpha, iterations=p.iterations,
                num_threads=threads, random_state=seed, calculate_training_loss=False,
            )  # fmt: skip
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


def pair_recall(
    embedder, pairs: pa.Table, k: int = 10, pools: Mapping[str, np.ndarray] | None = None
) -> float | None:
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
        pool = np.array(
            pools[t] if pools is not None else embedder.index.item_ids[t], dtype=np.int64
        )  # writable
        neg = embedder.embed(t, pool)
        for q_type in np.unique(qt[pt == t]):
            rows = np.flatnonzero((pt == t) & (qt == q_type))
            q_ids, p_ids = qid[rows].astype(np.int64), pid[rows].astype(np.int64)
            query, positive = embedder.embed(str(q_type), q_ids), embedder.embed(str(t), p_ids)
            sparse = sp.issparse(query)  # count-valued baselines (co-occurrence)
            r = (recall_at_k_sparse if sparse else recall_at_k)(
                query if sparse else torch.as_tensor(query), positive if sparse else torch.as_tensor(positive),
                neg if sparse else torch.as_tensor(neg), k=k,
                query_keys=entity_key(NODE_TYPE_CODE[str(q_type)], torch.as_tensor(q_ids)),
                positive_keys=entity_key(NODE_TYPE_CODE[str(t)], torch.as_tensor(p_ids)),
                negative_keys=entity_key(NODE_TYPE_CODE[str(t)], torch.as_tensor(pool)),
            )  # fmt: skip
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
    rows = (
        np.sort(np.random.default_rng([seed, 31]).choice(pairs.num_rows, size=n, replace=False)) if n else []
    )
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
    both = pa.concat_tables([t.select(list(PAIR_COLUMNS)).cast(validation.schema)
                             for t in (exclude_pairs, validation) if t is not None])  # fmt: skip
    tuning_matrix = build_interaction_matrix(interactions_from_logs(logs, both, exclude_users), universe)
    tuning = tune_als(tuning_matrix, validation, c.grid, k=c.k, seed=c.seed, num_threads=c.num_threads)
    matrix = build_interaction_matrix(interactions_from_logs(logs, exclude_pairs, exclude_users), universe)
    als = AlsEmbedder(matrix, AlsParams(**tuning.best), num_threads=c.num_threads, seed=c.seed)
    return als, tuning
