"""Stateless held-out selection (contract "Evaluation protocol", paper 4.2.1).

An entity pair, a user or a node is held out when its hash bucket falls below ``fraction``. The hash is
the pruning sampling key (graph_engine.pruning: portable integer arithmetic, identical in numpy, DuckDB and
Spark's ANSI mode) of the item with the holdout seed, so it depends only on the item, never on the day or
the data: an item held out on one day is held out on every day. The training set never contains held-out
items, and ``pruned_edges`` drops held-out pairs (``Holdout.sql_stages``), so the graph that embeds an
evaluation query never holds the pair's own edge.

A pair is unordered: its two ends are put in (type code, id) order first, which is the contract's
canonical edge orientation (pin before board; the smaller id first for two pins).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graph_engine.pruning import KEY_TYPE_CODE, sampling_key_numpy, sampling_key_sql

#: Entity type codes of the key (pin 1, board 2, user 3).
TYPE_CODE = dict(KEY_TYPE_CODE)
#: Buckets of the hash used for fractions: held out when bucket < fraction * BUCKETS.
BUCKETS = 1_000_000
#: The pipeline's defaults; the graph (pruned_edges) and the training examples must use the same ones.
DEFAULT_EVAL_FRACTION = 0.1
DEFAULT_HOLDOUT_SEED = 17

_NAMES = np.array([""] + [n for n, _ in sorted(KEY_TYPE_CODE.items(), key=lambda kv: kv[1])], dtype=object)


def _names(codes) -> np.ndarray:
    return _NAMES[np.asarray(codes, dtype=np.int64)]


def _threshold(fraction: float) -> int:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction {fraction} must be in [0, 1)")
    return round(fraction * BUCKETS)


def entity_hash(seed: int, type_codes, ids) -> np.ndarray:
    """int64 hash in [0, 2^31) of (seed, entity type code, id)."""
    names = _names(np.broadcast_to(np.asarray(type_codes, dtype=np.int64), np.shape(ids)))
    return sampling_key_numpy(seed, names, ids, names, ids)


def pair_hash(seed: int, type_a, ids_a, type_b, ids_b) -> np.ndarray:
    """Hash of an UNORDERED entity pair (type codes + ids)."""
    ids_a = np.asarray(ids_a, dtype=np.int64)
    ids_b = np.asarray(ids_b, dtype=np.int64)
    type_a = np.broadcast_to(np.asarray(type_a, dtype=np.int64), ids_a.shape)
    type_b = np.broadcast_to(np.asarray(type_b, dtype=np.int64), ids_b.shape)
    swap = (type_a > type_b) | ((type_a == type_b) & (ids_a > ids_b))
    t1, i1 = np.where(swap, type_b, type_a), np.where(swap, ids_b, ids_a)
    t2, i2 = np.where(swap, type_a, type_b), np.where(swap, ids_a, ids_b)
    return sampling_key_numpy(seed, _names(t1), i1, _names(t2), i2)


def held_out_pairs(seed: int, fraction: float, type_a, ids_a, type_b, ids_b) -> np.ndarray:
    return (pair_hash(seed, type_a, ids_a, type_b, ids_b) % BUCKETS) < _threshold(fraction)


def held_out_users(seed: int, fraction: float, user_ids) -> np.ndarray:
    return (entity_hash(seed, TYPE_CODE["user"], user_ids) % BUCKETS) < _threshold(fraction)


def held_out_entities(seed: int, fraction: float, type_codes, ids) -> np.ndarray:
    return (entity_hash(seed, type_codes, ids) % BUCKETS) < _threshold(fraction)


@dataclass(frozen=True)
class Holdout:
    """Which pairs the graph leaves out (the evaluation pairs of training_examples)."""

    fraction: float = DEFAULT_EVAL_FRACTION
    seed: int = DEFAULT_HOLDOUT_SEED

    def sql_stages(self, dialect: str, prefix: str = "_h") -> tuple[list[tuple[str, str]], str]:
        """Projections computing the held-out flag of canonical edge rows (columns src_type, src_id,
        dst_type, dst_id), and the name of the boolean flag column (the last projection)."""
        stages = sampling_key_sql(dialect, self.seed, "src_type", "src_id", "dst_type", "dst_id", prefix=prefix)
        flag = f"{prefix}_held_out"
        stages.append((flag, f"(({stages[-1][0]} % {BUCKETS}) < {_threshold(self.fraction)})"))
        return stages, flag

    def user_sql_stages(
        self, dialect: str, type_col: str, id_col: str, prefix: str = "_u"
    ) -> tuple[list[tuple[str, str]], str]:
        """Projections flagging rows of held-out users (``held_out_users``): ``type_col`` must hold the
        text 'user', ``id_col`` the user id. -> (projections, flag column); the flag is NULL for a NULL id."""
        stages = sampling_key_sql(dialect, self.seed, type_col, id_col, type_col, id_col, prefix=prefix)
        flag = f"{prefix}_held_out"
        stages.append((flag, f"(({stages[-1][0]} % {BUCKETS}) < {_threshold(self.fraction)})"))
        return stages, flag
