"""The stateless held-out hash: same answer in numpy, DuckDB and Spark; order-free; near the asked fraction."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from graph_engine.holdout import TYPE_CODE, Holdout, held_out_pairs, held_out_users, pair_hash

rng = np.random.default_rng(0)
N = 5_000
PIN, BOARD = TYPE_CODE["pin"], TYPE_CODE["board"]
# Canonical edge rows (pin before board; smaller pin id first), as the engines hold them.
IS_PIN_PIN = rng.random(N) < 0.5
A = rng.integers(-(2**40), 2**62, N)
B = rng.integers(0, 10_000, N)
SRC_ID = np.where(IS_PIN_PIN, np.minimum(A, B), A)
DST_ID = np.where(IS_PIN_PIN, np.maximum(A, B), B)
DST_TYPE = np.where(IS_PIN_PIN, PIN, BOARD)
HOLDOUT = Holdout(fraction=0.25, seed=3)


def test_pair_hash_is_unordered_and_seeded():
    h1 = pair_hash(0, PIN, SRC_ID, DST_TYPE, DST_ID)
    assert np.array_equal(h1, pair_hash(0, DST_TYPE, DST_ID, PIN, SRC_ID))
    assert not np.array_equal(h1, pair_hash(1, PIN, SRC_ID, DST_TYPE, DST_ID))


def test_fractions_are_close_to_the_requested_share():
    ids = np.arange(100_000)
    share = held_out_pairs(0, 0.1, PIN, ids, BOARD, ids // 7).mean()
    assert abs(share - 0.1) < 0.01
    assert abs(held_out_users(0, 0.2, ids).mean() - 0.2) < 0.01
    assert held_out_users(0, 0.0, ids).sum() == 0


def _table() -> pa.Table:
    return pa.table(
        {
            "src_type": ["pin"] * N,
            "src_id": SRC_ID,
            "dst_type": np.where(IS_PIN_PIN, "pin", "board").tolist(),
            "dst_id": DST_ID,
        }
    )


def _expected() -> np.ndarray:
    return held_out_pairs(HOLDOUT.seed, HOLDOUT.fraction, PIN, SRC_ID, DST_TYPE, DST_ID)


def test_duckdb_flag_equals_numpy():
    rel = duckdb.from_arrow(_table())
    stages, flag = HOLDOUT.sql_stages("duckdb")
    for col, expr in stages:
        rel = rel.project(f"*, {expr} AS {col}")
    got = rel.project(flag).fetchnumpy()[flag]
    assert np.array_equal(got, _expected())
    assert 0.2 < got.mean() < 0.3


def test_spark_flag_equals_numpy(spark):
    df = spark.createDataFrame(_table().to_pylist())
    stages, flag = HOLDOUT.sql_stages("spark")
    for col, expr in stages:
        df = df.selectExpr("*", f"{expr} AS {col}")
    got = np.array([r[0] for r in df.select(flag).collect()])
    assert np.array_equal(got, _expected())
