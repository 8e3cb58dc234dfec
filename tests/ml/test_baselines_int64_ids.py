"""The recall report's baselines (ml.baselines) over the contract's whole int64 id range: negative pin, board
and user ids (int64 min and max included) are ids like any other, and only a null means "no board" or "no
query pin" - in the engagement pairs, the interactions and the ALS matrix built from the logs, in the
co-occurrence and popularity embedders over a graph snapshot, and in the random users' seeds."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
from test_snapshot import write_edges

from graph_engine.snapshot import GraphSnapshot, build_snapshot
from ml.baselines import (
    CooccurrenceEmbedder,
    PopularityEmbedder,
    RandomUserEmbedder,
    build_interaction_matrix,
    engagement_pairs_from_logs,
    interactions_from_logs,
)
from omnisage_pipeline.contract.validation import LOG_SCHEMA

I64 = np.iinfo(np.int64)
MIN, MAX = int(I64.min), int(I64.max)


def logs_table(rows: list[tuple]) -> pa.Table:
    """(user, action, surface, pin, board, query pin) rows -> contract logs."""
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    keys = ("user_id", "action", "surface", "pin_id", "board_id", "query_pin_id")
    return pa.Table.from_pylist([{"event_ts": ts, **dict(zip(keys, r))} for r in rows], schema=LOG_SCHEMA)


LOGS = logs_table(
    [
        (-3, "save", "related_pins", -5, -2, -1),  # pin -> pin (-5, -1) and board -2 -> pin -5
        (-3, "click", "related_pins", MAX, None, MIN),  # pin -> pin (MIN, MAX); no board
        (MIN, "save", "homefeed", -1, MIN, None),  # board MIN -> pin -1; no query pin
        (7, "save", "related_pins", 4, None, None),  # neither: nulls are the only "missing"
    ]
)


def test_engagement_pairs_keep_negative_and_extreme_ids():
    pairs = engagement_pairs_from_logs(LOGS).to_pylist()
    got = {(p["query_type"], p["query_id"], p["pos_type"], p["pos_id"]) for p in pairs}
    assert got == {
        ("pin", -5, "pin", -1),
        ("pin", MIN, "pin", MAX),
        ("board", -2, "pin", -5),
        ("board", MIN, "pin", -1),
    }


def test_interactions_and_the_als_matrix_keep_negative_boards():
    rows = interactions_from_logs(LOGS).to_pylist()
    got = sorted((r["user_id"], r["entity_type"], r["entity_id"]) for r in rows)
    assert got == sorted(
        [(-3, "pin", -5), (-3, "pin", MAX), (MIN, "pin", -1), (7, "pin", 4), (-3, "board", -2), (MIN, "board", MIN)]
    )
    matrix = build_interaction_matrix(interactions_from_logs(LOGS))
    cols = matrix.columns("board", [-2, MIN, -1])
    assert cols[0] >= 0 and cols[1] >= 0 and cols[2] == -1  # -1 is no board of these logs
    user = int(np.searchsorted(matrix.user_ids, MIN))
    assert matrix.matrix[user, cols[1]] == 1
    # a held-out negative pair drops its event (and only it)
    excluded = pa.table({"query_type": ["board"], "query_id": [-2], "pos_type": ["pin"], "pos_id": [-5]})
    assert len(rows) - interactions_from_logs(LOGS, exclude_pairs=excluded).num_rows == 2


@pytest.fixture
def snapshot(tmp_path) -> GraphSnapshot:
    """pins MIN, -5, -1, 0, MAX and boards MIN, -2: -5 and -1 share boards -2 and MIN; MAX - MIN (pin-pin)."""
    edges = [
        ("pin", -5, "board", -2),
        ("pin", -1, "board", -2),
        ("pin", -5, "board", MIN),
        ("pin", -1, "board", MIN),
        ("pin", 0, "board", MIN),
        ("pin", MAX, "pin", MIN),
    ]
    cols = {k: [] for k in ("src_type", "src_id", "dst_type", "dst_id", "edge_type", "weight")}
    for st, si, dt, di in edges:
        for a, b, c, d in ((st, si, dt, di), (dt, di, st, si)):
            for key, value in zip(cols, (a, b, c, d, "pin_pin" if st == dt else "pin_board", 1.0)):
                cols[key].append(value)
    write_edges(tmp_path / "edges", cols, parts=1)
    build_snapshot(tmp_path / "edges", tmp_path / "snap", None, "2026-01-01")
    return GraphSnapshot.open(tmp_path / "snap")


def test_cooccurrence_counts_common_neighbours_of_negative_ids(snapshot):
    co = CooccurrenceEmbedder(snapshot)
    pins = np.array([-5, -1, 0, MIN, MAX, 12345], dtype=np.int64)  # 12345: not in the graph
    x = co.embed("pin", pins).toarray()
    scores = x @ x.T
    assert scores[0, 1] == 2  # -5 and -1 share the boards -2 and MIN
    assert scores[1, 2] == 1  # -1 and 0 share board MIN
    assert scores[3, 4] == 2  # MIN and MAX: a direct pin-pin edge, counted from both ends
    assert scores[0, 0] == 3 and not x[5].any()  # itself + 2 boards; an unknown id is the zero vector
    boards = co.embed("board", np.array([-2, MIN], dtype=np.int64)).toarray()
    assert (boards @ boards.T)[0, 1] == 2  # pins -5 and -1 are on both boards
    # the pair's own edge is excluded by the (negative) id of the other end
    kept = co.embed("pin", [-5], exclude_neighbor_ids=[-2]).toarray()[0]
    assert kept.sum() == x[0].sum() - 1 and kept @ x[1] == 1
    user = co.embed_users([np.array([-5, MIN], dtype=np.int64)]).toarray()[0]
    assert user @ x[1] == 2 and user @ x[4] == 2
    pop = PopularityEmbedder(snapshot).embed("pin", pins)[:, 0]
    assert pop[0] == pop[1] > pop[2] == pop[3] == pop[4] > pop[5] == 1.0  # degree 2, 2, 1, 1, 1, unknown


def test_random_users_of_negative_ids_get_their_own_vectors():
    emb = RandomUserEmbedder(dim=8, seed=0)
    ids = np.array([-5, MAX - 4, -5, 5, MIN], dtype=np.int64)  # -5 and 2**63 - 5 once shared a seed
    out = emb.embed_users([[]] * ids.size, user_ids=ids)
    assert not np.allclose(out[0], out[1]) and np.array_equal(out[0], out[2])
    # a non-negative id keeps its seed: the vectors of existing reports do not change
    assert np.array_equal(out[3], np.random.default_rng([0, 5]).standard_normal(8).astype(np.float32))
    assert np.isfinite(out[4]).all() and not np.allclose(out[4], out[0])
