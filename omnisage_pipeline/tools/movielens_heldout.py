"""The held-out side of a MovieLens-100k import (``DIR/_eval/``): the pin-pin pairs and ratings of the last
weeks, split by time, and the evaluation sets read back from them (``omnisage_pipeline.tools.movielens``
explains the split).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from omnisage_pipeline.contract.validation import TS_TYPE
from omnisage_pipeline.tools.movielens_mapping import Events, Timeline
from omnisage_pipeline.tools.movielens_sources import MovieLensError

EVAL_DIR = "_eval"

HELDOUT_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("query_type", pa.string()),
        ("query_id", pa.int64()),
        ("pos_type", pa.string()),
        ("pos_id", pa.int64()),
        ("rating", pa.int8()),
        ("real_ts", TS_TYPE),
        ("event_ts", TS_TYPE),
    ]
)
TEST_RATINGS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("pin_id", pa.int64()),
        ("rating", pa.int8()),
        ("real_ts", TS_TYPE),
        ("event_ts", TS_TYPE),
    ]
)


def heldout_tables(ev: Events, timeline: Timeline) -> tuple[pa.Table, pa.Table]:
    """(held-out pin-pin pairs, all test-period ratings): the evaluation side files of ``_eval/``."""
    test = np.flatnonzero(ev.test)
    pairs = test[ev.query_pin[test] >= 0]

    def ts(rows, real):
        return pa.array(ev.ts[rows] * 1_000_000 if real else timeline.to_us(ev.ts[rows]), pa.int64()).view(TS_TYPE)

    n = pairs.size
    heldout = pa.Table.from_arrays(
        [
            pa.array(ev.user[pairs]),
            pa.array(["pin"] * n, pa.string()),
            pa.array(ev.query_pin[pairs]),
            pa.array(["pin"] * n, pa.string()),
            pa.array(ev.pin[pairs]),
            pa.array(ev.rating[pairs].astype(np.int8)),
            ts(pairs, True),
            ts(pairs, False),
        ],
        schema=HELDOUT_SCHEMA,
    )
    ratings = pa.Table.from_arrays(
        [
            pa.array(ev.user[test]),
            pa.array(ev.pin[test]),
            pa.array(ev.rating[test].astype(np.int8)),
            ts(test, True),
            ts(test, False),
        ],
        schema=TEST_RATINGS_SCHEMA,
    )
    return heldout, ratings


def read_heldout_pairs(data_root: str | Path, unique: bool = False) -> pa.Table:
    """``_eval/heldout_pairs.parquet`` of an import (HELDOUT_SCHEMA); ``unique``: one row per directed
    (query, positive) pair, the first occurrence in time, for an evaluator that scores pairs, not events."""
    path = Path(data_root) / EVAL_DIR / "heldout_pairs.parquet"
    if not path.is_file():
        raise MovieLensError(f"{path} not found: {data_root} is not a MovieLens import")
    table = pq.read_table(path).cast(HELDOUT_SCHEMA)
    if not unique or table.num_rows == 0:
        return table
    order = np.lexsort(
        (table["real_ts"].cast(pa.int64()).to_numpy(), table["pos_id"].to_numpy(), table["query_id"].to_numpy())
    )
    q, p = table["query_id"].to_numpy()[order], table["pos_id"].to_numpy()[order]
    keep = np.ones(order.size, dtype=bool)
    keep[1:] = (q[1:] != q[:-1]) | (p[1:] != p[:-1])
    return table.take(pa.array(np.sort(order[keep])))


def heldout_sequences(data_root: str | Path, t_max: int = 32, future: int = 8) -> pa.Table:
    """User-entity queries of the time split (``ml.training_examples.SEQUENCE_SCHEMA``): every user with a
    rating in the held-out last days and one before them; history = the user's last ``t_max`` logged
    engagements, future = the first ``future`` held-out ratings in time. Neither the graph nor training saw
    the held-out ratings (``--test-period drop``), so no user needs to be held out entirely."""
    root = Path(data_root)
    test_path = root / EVAL_DIR / "test_ratings.parquet"
    if not test_path.is_file():
        raise MovieLensError(f"{test_path} not found: {data_root} is not a MovieLens import")
    logs = pq.read_table(root / "engagement_logs", columns=["user_id", "pin_id", "event_ts"]).sort_by(
        [("user_id", "ascending"), ("event_ts", "ascending")]
    )
    test = pq.read_table(test_path, columns=["user_id", "pin_id", "event_ts"]).sort_by(
        [("user_id", "ascending"), ("event_ts", "ascending")]
    )
    users, rows = [], {"history": [], "future": []}
    for name, table, take in (("history", logs, -t_max), ("future", test, future)):
        uid, pin = table["user_id"].to_numpy(), table["pin_id"].to_numpy()
        starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
        ends = np.r_[starts[1:], uid.size]
        rows[name] = {int(uid[s]): (pin[s:e][take:] if take < 0 else pin[s:e][:take]) for s, e in zip(starts, ends)}
    users = sorted(set(rows["history"]) & set(rows["future"]))
    return pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "history": pa.array([rows["history"][u].tolist() for u in users], pa.list_(pa.int64())),
            "future": pa.array([rows["future"][u].tolist() for u in users], pa.list_(pa.int64())),
        }
    )
