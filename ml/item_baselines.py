"""The item-item baselines' shared protocol: one training split, one validation split, one tuning rule.

Every baseline is fitted on the same training data - the engagement logs less the events of the evaluation
pairs and every event of the evaluation users, exactly the events ``ml.baselines.interactions_from_logs``
keeps for ALS - and tuned on the SAME validation split: ``ml.baselines.carve_validation_pairs`` with the
``AlsFitConfig``'s fraction, cap, seed and types, the split ``fit_als_baseline`` carves from the same
arguments. For tuning, the validation pairs' events are removed too (so the pairs are unseen); each grid point
is scored by recall@k on them with ``ml.pair_scoring.pair_hits`` (the test's rule and pools); the best (ties:
the earlier grid point) is refitted on all of the training data. The test pairs are never looked at.

- ``window_cooccurrence`` (``ml.window_cooccurrence``): window w from ``DEFAULT_WINDOW_GRID``;
- ``ease`` (``ml.ease``): lambda from ``DEFAULT_EASE_GRID``;
- ALS keeps ``ml.baselines.fit_als_baseline`` (same split by construction).

``TrainingSplit.seen`` is the ids each type has in the training interactions: the cold-start slice of the
benchmark is the test pairs with an end outside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ml.baselines import (
    PAIR_COLUMNS,
    AlsFitConfig,
    build_interaction_matrix,
    carve_validation_pairs,
    interactions_from_logs,
)
from ml.ease import EASE_MAX_ITEMS, EaseScorer
from ml.interactions import _ids_and_mask, _rows_in, _table_pair_keys
from ml.pair_scoring import pair_hits
from ml.window_cooccurrence import WindowCooccurrenceScorer, pin_sequences, window_counts

__all__ = [
    "DEFAULT_EASE_GRID",
    "DEFAULT_WINDOW_GRID",
    "REPORT_EASE_GRID",
    "REPORT_EASE_MAX_ITEMS",
    "BaselineTuning",
    "TrainingSplit",
    "fit_als_on_split",
    "fit_ease_baseline",
    "fit_window_baseline",
    "time_validation_pairs",
    "training_event_rows",
]

DEFAULT_WINDOW_GRID = (1, 2, 5, 10, 20, 50)
DEFAULT_EASE_GRID = (10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 3000.0)
#: The daily recall report's EASE: 3 lambdas, and skipped above 2,500 items (each inverse ~1 s on one core).
REPORT_EASE_GRID = (50.0, 250.0, 1000.0)
REPORT_EASE_MAX_ITEMS = 2_500


def training_event_rows(logs: pa.Table, exclude_pairs: pa.Table | None = None, exclude_users=None) -> np.ndarray:
    """Sorted row indices of the events ``interactions_from_logs(logs, exclude_pairs, exclude_users)`` keeps:
    it is run with each event's row index in place of its user, so the rule stays ``ml.baselines``' own."""
    rows = np.arange(logs.num_rows, dtype=np.int64)
    user = logs.column("user_id").to_numpy(zero_copy_only=False).astype(np.int64)
    tagged = logs.set_column(logs.schema.get_field_index("user_id"), "user_id", pa.array(rows, pa.int64()))
    excluded = None
    if exclude_users is not None and len(exclude_users):
        excluded = rows[np.isin(user, np.asarray(exclude_users, dtype=np.int64))]
    kept = interactions_from_logs(tagged, exclude_pairs, excluded)
    pins = kept.filter(pc.equal(kept["entity_type"], "pin"))
    return np.unique(pins["user_id"].to_numpy(zero_copy_only=False).astype(np.int64))


def event_micros(logs: pa.Table) -> np.ndarray:
    """Each event's time in microseconds since the epoch (UTC)."""
    ts = logs.column("event_ts").cast(pa.timestamp("us", tz="UTC"))
    return ts.cast(pa.int64()).to_numpy(zero_copy_only=False)


def time_validation_pairs(
    logs: pa.Table,
    cutoff_us: int,
    exclude_pairs: pa.Table | None = None,
    exclude_users=None,
    types: Sequence[tuple[str, str]] | None = None,
    max_pairs: int = 3000,
    seed: int = 0,
) -> pa.Table:
    """Validation as the test, one period earlier: the directed engagement pairs (query pin -> engaged pin of
    related-pins saves/clicks, board -> saved pin) of the events at or after ``cutoff_us``, one row per event
    with its ``user_id``, less the evaluation's pairs and users; at most ``max_pairs`` (seeded sample)."""
    after = pa.array(event_micros(logs) >= cutoff_us)
    tail = logs.filter(after)
    if exclude_users is not None and len(exclude_users):
        users = tail.column("user_id").to_numpy(zero_copy_only=False)
        tail = tail.filter(pa.array(~np.isin(users, np.asarray(exclude_users, dtype=np.int64))))
    action = np.asarray(tail.column("action").to_numpy(zero_copy_only=False), dtype=object)
    surface = np.asarray(tail.column("surface").to_numpy(zero_copy_only=False), dtype=object)
    pin = tail.column("pin_id").to_numpy(zero_copy_only=False).astype(np.int64)
    query, query_ok = _ids_and_mask(tail.column("query_pin_id"))
    board, board_ok = _ids_and_mask(tail.column("board_id"))
    pp = (surface == "related_pins") & np.isin(action, ["save", "click"]) & query_ok & (query != pin)
    pb = (action == "save") & board_ok
    user = tail.column("user_id").to_numpy(zero_copy_only=False).astype(np.int64)
    pairs = pa.table(
        {
            "query_type": pa.array(["pin"] * int(pp.sum()) + ["board"] * int(pb.sum()), pa.string()),
            "query_id": pa.array(np.concatenate([query[pp], board[pb]]), pa.int64()),
            "pos_type": pa.array(["pin"] * int(pp.sum() + pb.sum()), pa.string()),
            "pos_id": pa.array(np.concatenate([pin[pp], pin[pb]]), pa.int64()),
            "user_id": pa.array(np.concatenate([user[pp], user[pb]]), pa.int64()),
        }
    )
    if types is not None:
        qt = np.asarray(pairs.column("query_type").to_numpy(zero_copy_only=False), dtype=object)
        keep = np.zeros(pairs.num_rows, dtype=bool)
        for q, p in types:
            keep |= (qt == q) & (p == "pin")
        pairs = pairs.filter(pa.array(keep))
    if exclude_pairs is not None and exclude_pairs.num_rows and pairs.num_rows:
        pairs = pairs.filter(pa.array(~_rows_in(_table_pair_keys(pairs), _table_pair_keys(exclude_pairs))))
    if pairs.num_rows > max_pairs:
        rows = np.sort(np.random.default_rng([seed, 37]).choice(pairs.num_rows, size=max_pairs, replace=False))
        pairs = pairs.take(pa.array(rows, pa.int64()))
    return pairs


@dataclass
class TrainingSplit:
    """The logs, what training leaves out, and the validation split carved once (module docstring).

    ``cutoff_us`` set (``by_time``): tuning fits on the training events before it and validates on the pairs
    of the events after it (the test protocol one period earlier); unset: the hashed carve above."""

    logs: pa.Table
    exclude_pairs: pa.Table | None
    exclude_users: np.ndarray | None
    validation: pa.Table
    config: AlsFitConfig = field(default_factory=AlsFitConfig)
    _cache: dict = field(default_factory=dict, repr=False)
    cutoff_us: int | None = None

    @classmethod
    def by_time(
        cls,
        logs: pa.Table,
        cutoff_us: int,
        exclude_pairs=None,
        exclude_users=None,
        types: Sequence[tuple[str, str]] | None = None,
        max_pairs: int = 3000,
    ) -> TrainingSplit:
        """Validation = ``time_validation_pairs`` after ``cutoff_us``; tuning fits on the events before it."""
        users = None if exclude_users is None else np.asarray(exclude_users, dtype=np.int64)
        validation = time_validation_pairs(logs, cutoff_us, exclude_pairs, users, types, max_pairs)
        return cls(logs, exclude_pairs, users, validation, AlsFitConfig(), cutoff_us=cutoff_us)

    def _before_cutoff(self) -> pa.Table:
        return self.logs.filter(pa.array(event_micros(self.logs) < self.cutoff_us))

    @classmethod
    def carve(cls, logs: pa.Table, exclude_pairs=None, exclude_users=None, config: AlsFitConfig | None = None):
        """Carve the validation split from ``logs`` as ``fit_als_baseline`` does with ``config``: the
        evaluation pairs left out of it; ``exclude_users``: the evaluation users (never fitted)."""
        c = config or AlsFitConfig()
        validation = carve_validation_pairs(
            logs, c.validation_fraction, c.max_validation_pairs, c.seed, exclude_pairs, c.validation_types
        )
        users = None if exclude_users is None else np.asarray(exclude_users, dtype=np.int64)
        return cls(logs, exclude_pairs, users, validation, c)

    def excluded(self, tuning: bool) -> pa.Table | None:
        """The pairs whose events are left out: the evaluation's, plus the validation split's when tuning
        (a time split leaves out the validation period instead)."""
        if not tuning or self.cutoff_us is not None:
            return self.exclude_pairs
        return pa.concat_tables(
            [
                t.select(list(PAIR_COLUMNS)).cast(self.validation.schema)
                for t in (self.exclude_pairs, self.validation)
                if t is not None
            ]
        )

    def rows(self, tuning: bool) -> np.ndarray:
        """Row indices of the training events (``tuning``: less the validation pairs' events)."""
        key = ("rows", tuning)
        if key not in self._cache:
            rows = training_event_rows(self.logs, self.excluded(tuning), self.exclude_users)
            if tuning and self.cutoff_us is not None:
                rows = rows[event_micros(self.logs)[rows] < self.cutoff_us]
            self._cache[key] = rows
        return self._cache[key]

    def interactions(self, tuning: bool) -> pa.Table:
        """``interactions_from_logs`` of the training events (``tuning``: less the validation pairs')."""
        key = ("interactions", tuning)
        if key not in self._cache:
            logs = self._before_cutoff() if tuning and self.cutoff_us is not None else self.logs
            self._cache[key] = interactions_from_logs(logs, self.excluded(tuning), self.exclude_users)
        return self._cache[key]

    def seen(self) -> dict[str, np.ndarray]:
        """{entity type: sorted ids} of the training interactions (all of training, not the tuning part)."""
        inter = self.interactions(False)
        types = np.asarray(inter["entity_type"].to_numpy(zero_copy_only=False), dtype=object)
        ids = inter["entity_id"].to_numpy(zero_copy_only=False).astype(np.int64)
        return {t: np.unique(ids[types == t]) for t in ("pin", "board")}


@dataclass
class BaselineTuning:
    """What a baseline's search tried: one row per grid point (value, validation recall@k)."""

    param: str
    best: Any
    best_recall: float | None
    results: list[dict]
    validation_pairs: int
    notes: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "best": {self.param: self.best},
            "validation_recall": self.best_recall,
            "validation_pairs": self.validation_pairs,
            "results": self.results,
            **self.notes,
        }


def _validation_recall(scorer, validation: pa.Table, pools: Mapping[str, np.ndarray], k: int) -> float | None:
    if validation.num_rows == 0:
        return None
    cols = [validation.column(c).to_numpy(zero_copy_only=False) for c in PAIR_COLUMNS]
    return pair_hits(scorer, *cols, pools, k).recall


def _search(param: str, grid: Sequence, build: Callable[[Any], Any], split: TrainingSplit, pools, k: int):
    """(best value, BaselineTuning): each grid point's scorer (``build(value)``, fitted without the
    validation events) scored on the validation pairs; ties keep the earlier point."""
    if not len(grid):
        raise ValueError(f"{param}: empty grid")
    results, best, best_recall = [], grid[0], None
    for value in grid:
        recall = _validation_recall(build(value), split.validation, pools, k)
        results.append({param: value, f"recall@{k}": recall})
        if recall is not None and (best_recall is None or recall > best_recall):
            best, best_recall = value, recall
    return best, BaselineTuning(param, best, best_recall, results, split.validation.num_rows)


def fit_window_baseline(
    split: TrainingSplit,
    pools: Mapping[str, np.ndarray],
    grid: Sequence[int] = DEFAULT_WINDOW_GRID,
    k: int = 10,
) -> tuple[WindowCooccurrenceScorer, BaselineTuning]:
    """Window co-occurrence tuned on the split's validation pairs (one counting pass for the whole grid),
    then counted on all of training with the chosen window."""
    grid = [int(w) for w in grid]
    users, pins = pin_sequences(split.logs, split.rows(True))
    items, col = np.unique(pins, return_inverse=True)
    counts = window_counts(users, col.reshape(-1), items.size, grid)
    best, tuning = _search(
        "window", grid, lambda w: WindowCooccurrenceScorer(users, pins, w, counts[w]), split, pools, k
    )
    users, pins = pin_sequences(split.logs, split.rows(False))
    return WindowCooccurrenceScorer(users, pins, best), tuning


def fit_ease_baseline(
    split: TrainingSplit,
    pools: Mapping[str, np.ndarray],
    grid: Sequence[float] = DEFAULT_EASE_GRID,
    k: int = 10,
    *,
    item_types: Sequence[str] = ("pin", "board"),
    max_items: int = EASE_MAX_ITEMS,
    restrict: bool = False,
) -> tuple[EaseScorer, BaselineTuning]:
    """EASE tuned on the split's validation pairs, refitted on all of training with the chosen lambda
    (``ml.ease``: above ``max_items`` an error, or with ``restrict`` the top items by degree)."""
    grid = [float(x) for x in grid]
    tuning_matrix = build_interaction_matrix(split.interactions(True))
    opts = {"item_types": item_types, "max_items": max_items, "restrict": restrict}
    best, tuning = _search("lambda", grid, lambda lam: EaseScorer(tuning_matrix, lam, **opts), split, pools, k)
    ease = EaseScorer(build_interaction_matrix(split.interactions(False)), best, **opts)
    tuning.notes = {"items": ease.n_items, "item_types": list(item_types)}
    if ease.restricted_from is not None:
        tuning.notes["restricted_from"] = ease.restricted_from
    return ease, tuning


def ease_item_count(split: TrainingSplit, item_types: Sequence[str] = ("pin", "board")) -> int:
    """Items EASE would invert on all of training (those of ``item_types`` with an interaction)."""
    inter = split.interactions(False)
    types = np.asarray(inter["entity_type"].to_numpy(zero_copy_only=False), dtype=object)
    ids = inter["entity_id"].to_numpy(zero_copy_only=False)
    return int(sum(np.unique(ids[types == t]).size for t in item_types))


def fit_als_on_split(
    split: TrainingSplit,
    universe: Mapping[str, np.ndarray] | None,
    grid: Mapping[str, Sequence] | None = None,
    k: int = 10,
    seed: int = 0,
    num_threads: int | None = None,
):
    """ALS tuned like the other baselines on ``split`` (fitted on its tuning events, scored on its validation
    pairs; ``ml.baselines.tune_als``), then refitted on all of training. -> (AlsEmbedder, AlsTuning)."""
    from ml.baselines import AlsEmbedder, AlsParams, tune_als

    tuning_matrix = build_interaction_matrix(split.interactions(True), universe)
    tuning = tune_als(tuning_matrix, split.validation, grid, k=k, seed=seed, num_threads=num_threads)
    matrix = build_interaction_matrix(split.interactions(False), universe)
    return AlsEmbedder(matrix, AlsParams(**tuning.best), num_threads=num_threads, seed=seed), tuning
