"""Edge rules of paper 4.1 / contract "Edges", on both engines (one Spark session for the suite).

All rule cases live in one tiny events table extracted once per engine; each test asserts one rule on
that output, so a Spark job is not paid per rule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graph_engine.edge_engine import EdgeEngine, EdgeInputError, get_engine

ENGINES = ["duckdb", "spark"]
BIG = 2**40  # ids beyond 32 bits must survive (int64 everywhere)

# (action, surface, pin_id, board_id, query_pin_id)
EVENTS = [
    ("save", "homefeed", 1, 100, None),  # pin_board (1, 100) ...
    ("save", "search", 1, 100, None),  # ... twice in the day: weight 2
    ("save", "board", 2, 100, None),  # pin_board (2, 100)
    ("click", "homefeed", 3, None, None),  # a click on homefeed: no edge
    ("closeup", "related_pins", 4, None, 5),  # a closeup on related_pins: no edge
    ("click", "related_pins", 6, None, 7),  # pin_pin {6, 7} ...
    ("click", "related_pins", 7, None, 6),  # ... the other orientation merges: weight 2
    ("save", "related_pins", 8, 101, 9),  # a related-pins save: pin_board (8, 101) AND pin_pin {8, 9}
    ("click", "related_pins", 10, None, 10),  # query pin == engaged pin: no edge
    ("click", "related_pins", 11, None, None),  # no query pin: no edge
    ("click", "search", 12, None, 13),  # a query pin off related_pins: no pin_pin edge
    ("save", "homefeed", 14, None, None),  # a save without a board: no edge
    ("closeup", "board", 15, 102, None),  # a board id on a non-save: no edge
    ("click", "related_pins", BIG + 1, None, BIG),  # canonical orientation: src_id < dst_id
]

EXPECTED = {
    ("pin", 1, "board", 100, "pin_board", 2.0),
    ("pin", 2, "board", 100, "pin_board", 1.0),
    ("pin", 6, "pin", 7, "pin_pin", 2.0),
    ("pin", 8, "board", 101, "pin_board", 1.0),
    ("pin", 8, "pin", 9, "pin_pin", 1.0),
    ("pin", BIG, "pin", BIG + 1, "pin_pin", 1.0),
}

CONTRACT_SCHEMA = pa.schema(
    [
        ("src_type", pa.string()),
        ("src_id", pa.int64()),
        ("dst_type", pa.string()),
        ("dst_id", pa.int64()),
        ("edge_type", pa.string()),
        ("weight", pa.float64()),
    ]
)


def events_table(rows) -> pa.Table:
    """Validated engagement_logs layout (warehouse)."""
    n = len(rows)
    return pa.table(
        {
            "event_ts": pa.array([1_767_225_600_000_000 + i for i in range(n)], pa.timestamp("us", tz="UTC")),
            "user_id": pa.array([7] * n, pa.int64()),
            "action": pa.array([r[0] for r in rows], pa.string()),
            "surface": pa.array([r[1] for r in rows], pa.string()),
            "pin_id": pa.array([r[2] for r in rows], pa.int64()),
            "board_id": pa.array([r[3] for r in rows], pa.int64()),
            "query_pin_id": pa.array([r[4] for r in rows], pa.int64()),
        }
    )


def make_engine(name: str, request, scratch: Path) -> EdgeEngine:
    if name == "spark":
        spark = request.getfixturevalue("spark")
        return get_engine("spark", spark_session_factory=lambda: spark)
    return get_engine("duckdb", scratch_dir=scratch)


def read_rows(directory: Path) -> list[tuple]:
    table = (
        pq.read_table(sorted(directory.glob("*.parquet")), schema=CONTRACT_SCHEMA)
        if list(directory.glob("*.parquet"))
        else CONTRACT_SCHEMA.empty_table()
    )
    return [tuple(r.values()) for r in table.to_pylist()]


@pytest.fixture(scope="module")
def extracted(request, tmp_path_factory):
    """engine name -> (rows, stats, out_dir), each engine run once on the rule events."""
    cache: dict[str, tuple] = {}
    base = tmp_path_factory.mktemp("edges")
    events = base / "events"
    events.mkdir()
    # Two files: a day's events may be split; both must be read.
    pq.write_table(events_table(EVENTS[:7]), events / "part-0.parquet")
    pq.write_table(events_table(EVENTS[7:]), events / "part-1.parquet")

    def get(name: str):
        if name not in cache:
            out = base / f"out-{name}"
            out.mkdir()
            stats = make_engine(name, request, base / "scratch").extract_daily_edges(events, out)
            cache[name] = (read_rows(out), stats, out)
        return cache[name]

    return get


@pytest.mark.parametrize("engine", ENGINES)
def test_edge_rules_give_exactly_the_expected_edges(engine, extracted):
    rows, stats, _ = extracted(engine)
    assert len(rows) == len(set(rows)), "one row per undirected edge"
    assert set(rows) == EXPECTED
    assert stats["events"] == len(EVENTS)


@pytest.mark.parametrize("engine", ENGINES)
def test_output_columns_and_types_are_the_contract(engine, extracted):
    _, _, out = extracted(engine)
    files = sorted(out.glob("*.parquet"))
    assert files
    for f in files:
        schema = pq.read_schema(f)
        assert schema.names == CONTRACT_SCHEMA.names
        assert [fld.type for fld in schema] == [fld.type for fld in CONTRACT_SCHEMA], f


@pytest.mark.parametrize("engine", ENGINES)
def test_closeup_on_related_pins_is_no_edge(engine, extracted):
    rows, _, _ = extracted(engine)
    assert not [r for r in rows if {r[1], r[3]} & {4, 5}]


@pytest.mark.parametrize("engine", ENGINES)
def test_query_pin_equal_to_pin_is_no_edge(engine, extracted):
    rows, _, _ = extracted(engine)
    assert not [r for r in rows if 10 in (r[1], r[3])]
    assert all(not (r[0] == r[2] and r[1] == r[3]) for r in rows)


@pytest.mark.parametrize("engine", ENGINES)
def test_both_orientations_of_a_pin_pair_merge(engine, extracted):
    rows, _, _ = extracted(engine)
    pin_pin = [r for r in rows if r[4] == "pin_pin"]
    assert [r for r in pin_pin if {r[1], r[3]} == {6, 7}] == [("pin", 6, "pin", 7, "pin_pin", 2.0)]
    assert all(r[1] < r[3] for r in pin_pin), "canonical orientation src_id < dst_id"


@pytest.mark.parametrize("engine", ENGINES)
def test_saves_need_a_board_and_only_saves_make_pin_board(engine, extracted):
    rows, _, _ = extracted(engine)
    pin_board = {(r[1], r[3]) for r in rows if r[4] == "pin_board"}
    assert pin_board == {(1, 100), (2, 100), (8, 101)}  # not 14 (no board), not (15, 102) (a closeup)
    assert all(r[0] == "pin" and r[2] == "board" for r in rows if r[4] == "pin_board")


@pytest.mark.parametrize("engine", ENGINES)
def test_clicks_off_related_pins_give_no_edge(engine, extracted):
    rows, _, _ = extracted(engine)
    touched = {r[1] for r in rows} | {r[3] for r in rows}
    assert not touched & {3, 11, 12, 13}


@pytest.mark.parametrize("engine", ENGINES)
def test_table1_stats_and_checks(engine, extracted):
    _, stats, _ = extracted(engine)
    t = stats["table1"]
    # pins 1, 2, 6, 7, 8, 9, BIG, BIG+1; boards 100, 101
    assert t["node_types"]["pin"]["nodes"] == 8
    assert t["node_types"]["board"]["nodes"] == 2
    assert t["node_types"]["pin"]["entries"] == 9  # 3 pin_board + 2 * 3 pin_pin
    assert t["node_types"]["board"]["avg_degree"] == 1.5
    assert t["edge_types"]["pin_board"]["edges"] == 3
    assert t["edge_types"]["pin_pin"] == {"edges": 3, "entries": 6, "weight": 4.0}
    assert stats["checks"] == {"self_loops": 0, "unknown_edge_types": 0, "nonpositive_weights": 0}


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_day_publishes_an_empty_typed_table(engine, request, tmp_path):
    events = tmp_path / "events"
    events.mkdir()  # a validated, empty partition (no files)
    empty_file = tmp_path / "events_empty"
    empty_file.mkdir()
    pq.write_table(events_table([]), empty_file / "part-0.parquet")  # or a zero-row file
    for i, src in enumerate((events, empty_file)):
        out = tmp_path / f"out{i}"
        out.mkdir()
        stats = make_engine(engine, request, tmp_path / "scratch").extract_daily_edges(src, out)
        files = sorted(out.glob("*.parquet"))
        assert files, "an empty day still publishes a typed file"
        table = pq.read_table(files, schema=None)
        assert table.num_rows == 0
        assert [f.type for f in table.schema] == [f.type for f in CONTRACT_SCHEMA]
        assert stats["events"] == 0 and stats["table1"]["total_nodes"] == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_missing_column_names_file_and_column(engine, request, tmp_path):
    events = tmp_path / "events"
    events.mkdir()
    pq.write_table(events_table(EVENTS).drop(["query_pin_id"]), events / "bad.parquet")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EdgeInputError, match=r"bad\.parquet.*query_pin_id"):
        make_engine(engine, request, tmp_path / "scratch").extract_daily_edges(events, out)


@pytest.mark.parametrize("engine", ENGINES)
def test_held_out_users_make_no_edges(engine, request, tmp_path):
    """The user-entity evaluation's held-out users never put engagement into the graph that embeds them:
    their saves and related-pins clicks are left out, everyone else's stay, and the count is reported."""
    from graph_engine.holdout import Holdout, held_out_users

    holdout = Holdout(fraction=0.3, seed=5)
    users = np.arange(1, 61, dtype=np.int64) + BIG  # beyond 32 bits: the hash must read the whole id
    held = held_out_users(holdout.seed, holdout.fraction, users)
    assert 0 < held.sum() < users.size
    rows = [("save", "homefeed", 1000 + i, 5000 + i, None) for i in range(users.size)]
    rows += [("click", "related_pins", 1000 + i, None, 2000 + i) for i in range(users.size)]
    table = events_table(rows).set_column(1, "user_id", pa.array(np.tile(users, 2), pa.int64()))
    events = tmp_path / "events"
    events.mkdir()
    pq.write_table(table, events / "part-0.parquet")
    out = tmp_path / "out"
    out.mkdir()
    stats = make_engine(engine, request, tmp_path / "scratch").extract_daily_edges(events, out, held_out_users=holdout)
    kept = {i for i in range(users.size) if not held[i]}
    expected = {("pin", 1000 + i, "board", 5000 + i, "pin_board", 1.0) for i in kept}
    expected |= {("pin", 1000 + i, "pin", 2000 + i, "pin_pin", 1.0) for i in kept}
    assert set(read_rows(out)) == expected
    assert stats["held_out_user_events"] == 2 * int(held.sum())
