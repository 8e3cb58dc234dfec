"""One scoring rule for every system of the quality benchmark and the recall report: embedders (dot products)
and item-item scorers (co-occurrence windows, EASE, TF-IDF) ranked on the same queries, the same negative
pools and by the same recall@k rule, with per-row hits (what a paired bootstrap needs), not only the mean.

The rule is ``ml.metrics.recall_at_k``'s (paper 4.2.1): row i is a hit when fewer than k pool entities n score
s(q_i, n) >= s(q_i, p_i) - tol_i (ties count against the positive); the pool entity that IS the query or the
positive (same type and id) is left out of row i's count, and so, with ``exclude`` (user-entity: the user's
already-engaged items), is every listed id of row i - never the positive itself. ``negatives`` records how
many pool entities each row was ranked against, so two systems can be checked to have faced the same pools.

Systems:

- ``ItemScorer``: ``score(query_type, query_ids, cand_type, cand_ids)`` -> dense or ``scipy.sparse``
  [n_q, n_c] (or a ``Scores``, which carries a per-row tie tolerance); optional ``score_users(histories,
  cand_type, cand_ids, user_ids=None)`` -> [n_u, n_c] for the user-entity task (absent: the task is null).
- embedders (``ml.evaluator.EntityEmbedder`` and ``UserEmbedder``): ``EmbeddingScorer`` turns them into an
  ``ItemScorer``: s = f(q).f(c) in float64 with recall_at_k's tolerance tol = 2 d 2^-53 |q| max|c| (exact
  ties count whatever the summation order; sparse count vectors are exact, tol 0). With
  ``exclude_pair_edge`` (the evaluator's held-out graph pairs) it embeds each query without its positive in
  its neighbourhood and each positive without its query (``pair_scores``), as ``ml.evaluator.Evaluator``
  does; item scorers are fitted without the evaluation pairs' events, so they have no edge to drop.

Scores come from one matrix per block of rows whose columns are the pool and then the block's positives, so a
positive's score and its negatives' are one computation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

__all__ = [
    "EmbeddingScorer",
    "ItemScorer",
    "PairHits",
    "Scores",
    "as_scorer",
    "evaluate_on",
    "pair_hits",
    "user_hits",
]

_BLOCK_ELEMS = 1 << 22  # float64 scores per block of rows: 32 MiB
_U = 2.0**-53


@runtime_checkable
class ItemScorer(Protocol):
    def score(self, query_type: str, query_ids: np.ndarray, cand_type: str, cand_ids: np.ndarray) -> Any:
        """[len(query_ids), len(cand_ids)] scores: dense, ``scipy.sparse`` or ``Scores``."""
        ...


@dataclass
class Scores:
    """Scores with a per-row slack: a candidate within ``tol`` of the positive's score counts as a tie."""

    values: np.ndarray  # float64 [n_q, n_c]
    tol: np.ndarray | float = 0.0


@dataclass
class PairHits:
    """Per-row outcome of one system on one query set."""

    hits: np.ndarray  # bool [n]
    outscored: np.ndarray  # int64 [n]: pool entities scoring >= the positive
    negatives: np.ndarray  # int64 [n]: pool entities the row was ranked against (after leaving out)

    @property
    def recall(self) -> float | None:
        return float(self.hits.mean()) if self.hits.size else None

    @property
    def n(self) -> int:
        return int(self.hits.size)


def _as_scores(x, n_rows: int) -> Scores:
    if isinstance(x, Scores):
        tol = x.tol if np.isscalar(x.tol) else np.asarray(x.tol, np.float64).reshape(-1)
        return Scores(np.asarray(x.values, dtype=np.float64), tol)
    values = x.toarray() if sp.issparse(x) else np.asarray(x)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != n_rows:
        raise ValueError(f"a scorer returned shape {values.shape}; expected [{n_rows}, n_candidates]")
    return Scores(values, 0.0)


def _rows_tol(tol, index: np.ndarray | None = None) -> np.ndarray | float:
    if np.isscalar(tol):
        return float(tol)
    return tol if index is None else tol[index]


# ---------------------------------------------------------------------------------------------- embedders
class EmbeddingScorer:
    """``ItemScorer`` of an (EntityEmbedder, UserEmbedder | None) pair (module docstring). Entities embedded
    without exclusions are cached by id, so a pool is embedded once however many blocks score against it."""

    def __init__(self, entity, user=None):
        self.entity, self.user = entity, user
        self._tables: dict[str, tuple[np.ndarray, Any]] = {}

    def _lookup(self, entity_type: str, ids) -> Any:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        known, table = self._tables.get(entity_type, (np.zeros(0, np.int64), None))
        missing = np.setdiff1d(ids, known)
        if missing.size:
            new = _matrix(self.entity.embed(entity_type, missing))
            merged_ids = np.concatenate([known, missing])
            merged = (
                new
                if table is None
                else (sp.vstack([table, new]).tocsr() if sp.issparse(new) else np.concatenate([table, new]))
            )
            order = np.argsort(merged_ids, kind="stable")
            known, table = merged_ids[order], merged[order]
            self._tables[entity_type] = (known, table)
        return table[np.searchsorted(known, ids)]

    def score(self, query_type, query_ids, cand_type, cand_ids) -> Scores:
        """[n_q, n_c] f(q).f(c), with the tie tolerance of dense vectors."""
        return _dot(self._lookup(query_type, query_ids), self._lookup(cand_type, cand_ids))

    def score_users(self, histories, cand_type, cand_ids, user_ids=None) -> Scores | None:
        """[n_u, n_c] U.f(c) of the user embedder's vectors; None without a user embedder."""
        if self.user is None:
            return None
        users = _matrix(self.user.embed_users(list(histories), user_ids=user_ids))
        return _dot(users, self._lookup(cand_type, cand_ids))

    def pair_scores(self, query_type, query_ids, pos_type, pos_ids, pool) -> tuple[Scores, np.ndarray]:
        """(scores against ``pool``, the positives' scores): each query embedded without its positive in its
        neighbourhood and each positive without its query (``exclude_neighbor_ids``)."""
        q = _matrix(self.entity.embed(query_type, query_ids, exclude_neighbor_ids=pos_ids))
        p = _matrix(self.entity.embed(pos_type, pos_ids, exclude_neighbor_ids=query_ids))
        pool_emb = self._lookup(pos_type, pool)
        scores = _dot(q, pool_emb)
        if sp.issparse(q):
            pos = np.asarray(q.multiply(p).sum(axis=1), dtype=np.float64).reshape(-1)
            return scores, pos
        q64, p64 = q.astype(np.float64), p.astype(np.float64)
        pos = (q64 * p64).sum(axis=1)
        # recall_at_k's bound uses max(|p|, max |n|): the pool's maximum alone may be below |p|
        d = q.shape[1]
        tol = 2.0 * d * _U * np.linalg.norm(q64, axis=1) * np.maximum(np.linalg.norm(p64, axis=1), _max_norm(pool_emb))
        return Scores(scores.values, tol), pos


def _matrix(x):
    return x.tocsr() if sp.issparse(x) else np.asarray(x, dtype=np.float32)


def _max_norm(m) -> float:
    if m.shape[0] == 0:
        return 0.0
    if sp.issparse(m):
        return float(np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).max()))
    return float(np.linalg.norm(m.astype(np.float64), axis=1).max())


def _dot(a, b) -> Scores:
    if sp.issparse(a) or sp.issparse(b):
        values = sp.csr_matrix(a) @ sp.csr_matrix(b).T
        return Scores(np.asarray(values.toarray(), dtype=np.float64), 0.0)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    tol = 2.0 * a.shape[1] * _U * np.linalg.norm(a64, axis=1) * _max_norm(b)
    return Scores(a64 @ b64.T, tol)


def as_scorer(system) -> Any:
    """An ``ItemScorer``: an item scorer as is; an embedder, or an (entity, user) pair, wrapped."""
    if isinstance(system, tuple):
        entity, user = system
        return entity if isinstance(entity, ItemScorer) else EmbeddingScorer(entity, user)
    return system if isinstance(system, ItemScorer) else EmbeddingScorer(system)


# ------------------------------------------------------------------------------------------------- the rule
def _count(scores: Scores, pos, tol, pool, same_q, q_ids, p_ids, left_out=None) -> tuple[np.ndarray, ...]:
    """(outscored, negatives) of a block: the rule of the module docstring."""
    beats = scores.values >= (pos - tol)[:, None]
    out = pool[None, :] == p_ids[:, None]
    if same_q:
        out |= pool[None, :] == q_ids[:, None]
    if left_out is not None:
        out |= left_out
    beats &= ~out
    return beats.sum(axis=1).astype(np.int64), (~out).sum(axis=1).astype(np.int64)


def _block_step(pool_size: int, cap: int = 512) -> int:
    """Rows per block: a block scores its rows against the pool and at most ``cap`` positives."""
    return max(1, min(cap, _BLOCK_ELEMS // (pool_size + cap)))


def pair_hits(
    system,
    query_type: Sequence[str] | np.ndarray,
    query_id: np.ndarray,
    pos_type: Sequence[str] | np.ndarray,
    pos_id: np.ndarray,
    pools: Mapping[str, np.ndarray],
    k: int = 10,
    *,
    exclude_pair_edge: bool = False,
) -> PairHits:
    """Entity-entity hits of ``system`` (anything ``as_scorer`` takes) on the rows (q, p): each positive
    against ``pools[pos_type]``, query and positive left out (module docstring)."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"pair_hits: k must be a positive int, got {k!r}")
    scorer = as_scorer(system)
    qt, pt = np.asarray(query_type).astype(str), np.asarray(pos_type).astype(str)
    qid, pid = np.asarray(query_id, np.int64).reshape(-1), np.asarray(pos_id, np.int64).reshape(-1)
    n = qid.size
    if not (qt.size == pt.size == pid.size == n):
        raise ValueError(f"pair_hits: column lengths differ ({qt.size}, {n}, {pt.size}, {pid.size})")
    outscored, negatives = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for t in np.unique(pt):
        if t not in pools or np.asarray(pools[t]).size == 0:
            raise ValueError(f"pair_hits: no {t!r} entities in the negative pools")
        pool = np.unique(np.asarray(pools[t], dtype=np.int64))
        for q_type in np.unique(qt[pt == t]):
            rows = np.flatnonzero((pt == t) & (qt == q_type))
            step = _block_step(pool.size)
            for lo in range(0, rows.size, step):
                r = rows[lo : lo + step]
                scores, pos = _pair_block(scorer, str(q_type), qid[r], str(t), pid[r], pool, exclude_pair_edge)
                outscored[r], negatives[r] = _count(
                    scores, pos, _rows_tol(scores.tol), pool, q_type == t, qid[r], pid[r]
                )
    return PairHits(outscored < k, outscored, negatives)


def _pair_block(scorer, q_type, q_ids, p_type, p_ids, pool, exclude_pair_edge) -> tuple[Scores, np.ndarray]:
    if exclude_pair_edge and hasattr(scorer, "pair_scores"):
        return scorer.pair_scores(q_type, q_ids, p_type, p_ids, pool)
    uq, q_inv = np.unique(q_ids, return_inverse=True)
    up, p_inv = np.unique(p_ids, return_inverse=True)
    s = _as_scores(scorer.score(q_type, uq, p_type, np.concatenate([pool, up])), uq.size)
    values = s.values[q_inv.reshape(-1)]
    pos = values[np.arange(q_ids.size), pool.size + p_inv.reshape(-1)]
    return Scores(values[:, : pool.size], _rows_tol(s.tol, q_inv.reshape(-1))), pos


def user_hits(
    system,
    histories: Sequence[np.ndarray],
    positives: np.ndarray,
    pool: np.ndarray,
    k: int = 10,
    *,
    user_ids: np.ndarray | None = None,
    exclude_history: bool = False,
) -> PairHits | None:
    """User-entity hits: user i's history as the query, ``positives[i]`` (a pin) against ``pool`` (pins),
    the positive left out of the pool; ``exclude_history``: the history's pins are left out too (never the
    positive). None when the system scores no users."""
    scorer = as_scorer(system)
    if not hasattr(scorer, "score_users"):
        return None
    positives = np.asarray(positives, dtype=np.int64).reshape(-1)
    pool = np.unique(np.asarray(pool, dtype=np.int64))
    n = positives.size
    if len(histories) != n:
        raise ValueError(f"user_hits: {len(histories)} histories but {n} positives")
    outscored, negatives = np.zeros(n, np.int64), np.zeros(n, np.int64)
    step = _block_step(pool.size)
    for lo in range(0, n, step):
        r = np.arange(lo, min(n, lo + step))
        hist = [np.asarray(histories[i], dtype=np.int64) for i in r]
        up, p_inv = np.unique(positives[r], return_inverse=True)
        uids = None if user_ids is None else np.asarray(user_ids)[r]
        raw = scorer.score_users(hist, "pin", np.concatenate([pool, up]), user_ids=uids)
        if raw is None:
            return None
        s = _as_scores(raw, r.size)
        pos = s.values[np.arange(r.size), pool.size + p_inv.reshape(-1)]
        left_out = _history_mask(hist, positives[r], pool) if exclude_history else None
        outscored[r], negatives[r] = _count(
            Scores(s.values[:, : pool.size]),
            pos,
            _rows_tol(s.tol),
            pool,
            False,
            positives[r],
            positives[r],
            left_out,
        )
    return PairHits(outscored < k, outscored, negatives)


def _history_mask(histories: list[np.ndarray], positives: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """bool [n, |pool|]: row i's history pins other than its positive."""
    mask = np.zeros((len(histories), pool.size), dtype=bool)
    lengths = np.array([h.size for h in histories], dtype=np.int64)
    if lengths.sum() == 0 or pool.size == 0:
        return mask
    flat = np.concatenate(histories)
    owner = np.repeat(np.arange(len(histories)), lengths)
    col = np.clip(np.searchsorted(pool, flat), 0, pool.size - 1)
    keep = (pool[col] == flat) & (flat != positives[owner])
    mask[owner[keep], col[keep]] = True
    return mask


# ----------------------------------------------------------------------------------------- evaluator sets
def evaluate_on(evaluator, system, tasks: Sequence[str]):
    """``ml.evaluator.EvaluationReport`` of ``system`` on ``evaluator``'s own query sets and pools, with the
    evaluator's summaries (entity-entity: the mean of the graph-pair and engagement-pair recalls, breakdowns
    alongside; user-entity: the mean of next and future). For item scorers, which the evaluator's dot
    products cannot score; entity-feature needs g_x encoders, so it is null with n = 0."""
    from ml.evaluator import EvaluationReport, TaskResult, _mean_of, _summary

    out: dict[str, TaskResult] = {}
    if "entity_entity" in tasks:
        p = evaluator.pairs
        h = pair_hits(
            system,
            p["query_type"],
            p["query_id"],
            p["pos_type"],
            p["pos_id"],
            evaluator.pools,
            evaluator.k,
            exclude_pair_edge=True,
        )
        out["entity_entity"] = entity_entity_result(h.hits, p["source"], p["segment"])
    if "entity_feature" in tasks:
        out["entity_feature"] = TaskResult(None, 0, {"reason": "no g_x encoders"})
    if "user_entity" in tasks:
        parts = {}
        for name, ids in (("next", evaluator.next_ids), ("future", evaluator.future_ids)):
            h = None
            if len(evaluator.histories):
                h = user_hits(
                    system,
                    evaluator.histories,
                    ids,
                    evaluator.pools["pin"],
                    evaluator.k,
                    user_ids=evaluator.user_ids,
                )
            parts[name] = None if h is None else _summary(h.hits)
        if any(v is None for v in parts.values()):
            reason = "no user scorer" if len(evaluator.histories) else "no evaluation users"
            out["user_entity"] = TaskResult(None, 0, {"reason": reason})
        else:
            out["user_entity"] = TaskResult(
                _mean_of([v["recall"] for v in parts.values()]), len(evaluator.histories), parts
            )
    return EvaluationReport(evaluator.k, {t: int(v.size) for t, v in evaluator.pools.items()}, out)


def entity_entity_result(hits: np.ndarray, source: np.ndarray, segment: np.ndarray):
    """``ml.evaluator``'s entity-entity ``TaskResult`` of per-pair hits: recall = the mean of the graph-pair
    and engagement-pair recalls (4.2.1; another source family counts as its own group)."""
    from ml.evaluator import ENGAGEMENT_PREFIX, GRAPH_PREFIX, TaskResult, _mean_of, _summary

    if hits.size == 0:
        return TaskResult(None, 0)
    src, seg = np.asarray(source).astype(str), np.asarray(segment).astype(str)
    is_graph, is_eng = np.char.startswith(src, GRAPH_PREFIX), np.char.startswith(src, ENGAGEMENT_PREFIX)
    graph, engagement = _summary(hits[is_graph]), _summary(hits[is_eng])
    other = ~(is_graph | is_eng)
    parts = [graph["recall"], engagement["recall"]] + ([float(hits[other].mean())] if other.any() else [])
    details = {
        "graph": graph,
        "engagement": engagement,
        "pooled": _summary(hits),
        "per_source": {s: _summary(hits[src == s]) for s in np.unique(src)},
        "per_segment": {s: _summary(hits[seg == s]) for s in np.unique(seg) if s},
    }
    return TaskResult(_mean_of(parts), int(hits.size), details)


def source_weights(source: np.ndarray | None, n: int) -> np.ndarray:
    """Per-pair weights whose weighted mean of hits is ``entity_entity_result``'s recall: each source family
    (graph, engagement, other) weighs the same, its pairs equally (all 1 without sources)."""
    from ml.evaluator import ENGAGEMENT_PREFIX, GRAPH_PREFIX

    if source is None:
        return np.ones(n, dtype=np.float64)
    src = np.asarray(source).astype(str)
    is_graph, is_eng = np.char.startswith(src, GRAPH_PREFIX), np.char.startswith(src, ENGAGEMENT_PREFIX)
    family = np.where(is_graph, 0, np.where(is_eng, 1, 2))
    counts = np.bincount(family, minlength=3).astype(np.float64)
    groups = int((counts > 0).sum())
    return 1.0 / (groups * counts[family]) * n
