"""The quality benchmark's scoring protocol (``benchmarks/quality.py``): ONE set of queries, positives and
negative pools that every system - the model, the PinSage-like model, every baseline - is scored on with
``ml.pair_scoring`` (per-row hits, one rule), the cold-start slice of it, and the paired comparison.

- entity_entity: the held-out pairs (MovieLens: the time split, each row with its user; synthetic: the
  evaluator's pairs, the pair's own edge kept out of both embeddings as the evaluator does), each positive
  against the evaluator's pool of its type. recall = the weighted mean of the hits whose weights make it the
  evaluator's mean of the graph-pair and engagement-pair recalls (all pairs weigh the same on MovieLens).
- user_entity: the evaluator's users (history -> next and future action), optionally with each user's
  already-engaged pins left out of their candidates (``exclude_history``; never the positive). recall = the
  mean of next and future.
- cold start: the entity-entity rows whose query or positive has no training interaction (``seen``: the ids
  of ``ml.item_baselines.TrainingSplit.seen``, the events the baselines were fitted on).
- comparison: the model minus the best other system on entity-entity, with a paired bootstrap over users
  (``ml.significance``; rows when the pairs carry no user).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ml.pair_scoring import PairHits, pair_hits, source_weights, user_hits
from ml.significance import paired_bootstrap

__all__ = ["EvaluationSets", "SystemScores", "compare", "score_system"]


@dataclass
class EvaluationSets:
    """What every system is scored on (module docstring)."""

    k: int
    pools: dict[str, np.ndarray]
    pairs: dict[str, np.ndarray]  # query_type, query_id, pos_type, pos_id
    pair_users: np.ndarray | None  # the user of each pair (None: unknown)
    pair_weights: np.ndarray
    exclude_pair_edge: bool
    cold: np.ndarray  # bool per pair
    histories: list[np.ndarray]
    user_ids: np.ndarray
    next_ids: np.ndarray
    future_ids: np.ndarray
    exclude_history: bool = False

    @classmethod
    def from_evaluator(
        cls,
        evaluator,
        seen: Mapping[str, np.ndarray],
        *,
        heldout: pa.Table | None = None,
        exclude_history: bool = False,
    ) -> EvaluationSets:
        """The evaluator's pools and users; entity-entity = ``heldout`` (pair columns and ``user_id``: the
        MovieLens time split, none of it in the graph) or else the evaluator's own pairs."""
        if heldout is not None:
            cols = ("query_type", "query_id", "pos_type", "pos_id")
            pairs = {c: np.asarray(heldout.column(c).to_numpy(zero_copy_only=False)) for c in cols}
            users = heldout.column("user_id").to_numpy() if "user_id" in heldout.column_names else None
            weights, exclude_edge = np.ones(heldout.num_rows), False
        else:
            p = evaluator.pairs
            pairs = {c: p[c] for c in ("query_type", "query_id", "pos_type", "pos_id")}
            users, weights, exclude_edge = None, source_weights(p["source"], p["query_id"].size), True
        pairs["query_type"], pairs["pos_type"] = (np.asarray(pairs[c]).astype(str) for c in ("query_type", "pos_type"))
        pairs["query_id"], pairs["pos_id"] = (np.asarray(pairs[c], np.int64) for c in ("query_id", "pos_id"))
        return cls(
            k=evaluator.k,
            pools=dict(evaluator.pools),
            pairs=pairs,
            pair_users=users,
            pair_weights=weights,
            exclude_pair_edge=exclude_edge,
            cold=cold_mask(pairs, seen),
            histories=list(evaluator.histories),
            user_ids=np.asarray(evaluator.user_ids),
            next_ids=np.asarray(evaluator.next_ids),
            future_ids=np.asarray(evaluator.future_ids),
            exclude_history=exclude_history,
        )

    def describe(self) -> dict:
        """Sizes of the sets (pairs, users, pools, cold-start pairs), for the benchmark's JSON."""
        return {
            "entity_entity_pairs": int(self.pairs["query_id"].size),
            "entity_entity_users": None if self.pair_users is None else int(np.unique(self.pair_users).size),
            "user_entity_users": len(self.histories),
            "pool_sizes": {t: int(v.size) for t, v in self.pools.items()},
            "user_entity_excludes_history": self.exclude_history,
            "cold_start_pairs": int(self.cold.sum()),
        }


def cold_mask(pairs: Mapping[str, np.ndarray], seen: Mapping[str, np.ndarray]) -> np.ndarray:
    """bool per pair: its query or its positive has no id in ``seen`` of its type."""
    out = np.zeros(np.asarray(pairs["query_id"]).size, dtype=bool)
    for end in ("query", "pos"):
        types, ids = np.asarray(pairs[f"{end}_type"]).astype(str), np.asarray(pairs[f"{end}_id"], np.int64)
        for t in np.unique(types):
            rows = types == t
            out[rows] |= ~np.isin(ids[rows], np.asarray(seen.get(t, np.zeros(0)), dtype=np.int64))
    return out


@dataclass
class SystemScores:
    """One system's per-row outcome on the sets (None: a task it cannot do)."""

    entity_entity: PairHits | None = None
    user_next: PairHits | None = None
    user_future: PairHits | None = None


def score_system(sets: EvaluationSets, system, tasks: Sequence[str] = ("entity_entity", "user_entity")) -> SystemScores:
    """Per-row hits of ``system`` (``ml.pair_scoring.as_scorer``'s input) on the sets."""
    out = SystemScores()
    if "entity_entity" in tasks and sets.pairs["query_id"].size:
        p = sets.pairs
        out.entity_entity = pair_hits(
            system,
            p["query_type"],
            p["query_id"],
            p["pos_type"],
            p["pos_id"],
            sets.pools,
            sets.k,
            exclude_pair_edge=sets.exclude_pair_edge,
        )
    if "user_entity" in tasks and sets.histories and sets.pools.get("pin", np.zeros(0)).size:
        for name, ids in (("user_next", sets.next_ids), ("user_future", sets.future_ids)):
            setattr(
                out,
                name,
                user_hits(
                    system,
                    sets.histories,
                    ids,
                    sets.pools["pin"],
                    sets.k,
                    user_ids=sets.user_ids,
                    exclude_history=sets.exclude_history,
                ),
            )
    return out


def entity_entity_recall(sets: EvaluationSets, hits) -> float | None:
    """The weighted mean of per-pair hits (booleans or per-seed fractions)."""
    if hits is None:
        return None
    h = np.asarray(hits, dtype=np.float64)
    return float((h * sets.pair_weights).sum() / sets.pair_weights.sum()) if h.size else None


def recalls(sets: EvaluationSets, scores: SystemScores) -> dict[str, float | None]:
    """{"entity_entity", "user_entity"} of one system's scores."""
    ee = None if scores.entity_entity is None else entity_entity_recall(sets, scores.entity_entity.hits)
    parts = [s.recall for s in (scores.user_next, scores.user_future) if s is not None and s.recall is not None]
    return {"entity_entity": ee, "user_entity": float(np.mean(parts)) if parts else None}


def cold_recall(sets: EvaluationSets, hits) -> float | None:
    """Pooled recall of the cold-start rows (None without any)."""
    if hits is None or not sets.cold.any():
        return None
    return float(np.asarray(hits, dtype=np.float64)[sets.cold].mean())


def compare(
    sets: EvaluationSets, model_hits, others: Mapping[str, np.ndarray], *, n_boot: int = 2000, seed: int = 0
) -> dict:
    """Entity-entity: the model minus the other system with the best recall, with a paired bootstrap
    interval (``ml.significance``) over the pairs' users (or the pairs)."""
    scored = {name: entity_entity_recall(sets, h) for name, h in others.items() if h is not None}
    if not scored:
        raise ValueError("compare: no other system has entity-entity hits")
    best = max(scored, key=lambda name: (scored[name], name))
    boot = paired_bootstrap(
        model_hits, others[best], sets.pair_users, weights=sets.pair_weights, n_boot=n_boot, seed=seed
    )
    return {
        "task": "entity_entity",
        "best_baseline": best,
        "best_baseline_recall": scored[best],
        **boot.to_json(),
    }
