"""Degree-based pruning (paper appendix A.1, Algorithm 2) on both engines, against the numpy reference,
and the window sum of pruned_edges at asset level (DuckDB engine, dg.materialize)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graph_engine.edge_engine import EdgeInputError, get_engine
from graph_engine.pruning import (
    EDGE_COLUMNS,
    PruningParams,
    d_target,
    prune_reference,
    sampling_key_numpy,
    sampling_key_sql,
)
from graph_engine.spark_engine import SparkEdgeEngine

ENGINES = ["duckdb", "spark"]
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

HUB, D_MIN_PIN, SMALL_PIN, D11_PIN, BIG_BOARD, MIXED_PIN = 1, 2, 3, 4, 5000, 6


def crafted_edges() -> dict[str, list]:
    """Undirected edges (two 'days'); degrees: HUB 1000, D_MIN_PIN 10, SMALL_PIN 5, D11_PIN 11,
    BIG_BOARD 60, MIXED_PIN 60 (30 pin_board + 30 pin_pin); their neighbours have degree 1."""
    rows: list[tuple] = []
    rows += [("pin", HUB, "board", b, "pin_board", 1.0 + b % 3) for b in range(1, 1001)]
    rows += [("pin", D_MIN_PIN, "board", b, "pin_board", 1.0) for b in range(2001, 2011)]
    rows += [("pin", SMALL_PIN, "pin", p, "pin_pin", 2.0) for p in range(101, 106)]
    rows += [("pin", D11_PIN, "board", b, "pin_board", 1.0) for b in range(2101, 2112)]
    rows += [("pin", p, "board", BIG_BOARD, "pin_board", 1.0) for p in range(3001, 3061)]
    rows += [("pin", MIXED_PIN, "board", b, "pin_board", 1.0) for b in range(4001, 4031)]
    rows += [("pin", MIXED_PIN, "pin", p, "pin_pin", 1.0) for p in range(4001, 4031)]
    return {c: [r[i] for r in rows] for i, c in enumerate(EDGE_COLUMNS)}


def write_edges(directory: Path, cols: dict[str, list], name: str = "part-0.parquet") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=CONTRACT_SCHEMA), directory / name)


def rows_of(cols: dict) -> set[tuple]:
    return set(zip(*(np.asarray(cols[c]).tolist() for c in EDGE_COLUMNS)))


def read_rows(directory: Path) -> list[tuple]:
    table = pq.read_table(sorted(directory.glob("*.parquet")), schema=CONTRACT_SCHEMA)
    return [tuple(r.values()) for r in table.to_pylist()]


def kept_of(rows, node_type: str, node_id: int) -> list[tuple]:
    return [r for r in rows if r[0] == node_type and r[1] == node_id]


@pytest.fixture(scope="module")
def window_dirs(tmp_path_factory) -> list[Path]:
    """The crafted graph split over two daily partitions: the hub's edges appear on both days (weights
    must add), and one pin_pin edge of the second day is written in the non-canonical orientation."""
    base = tmp_path_factory.mktemp("window")
    cols = crafted_edges()
    n = len(cols["src_id"])
    day1 = {c: v[: n // 2] for c, v in cols.items()}
    day2 = {c: v[n // 2 :] for c, v in cols.items()}
    hub_again = {c: v[:1000] for c, v in cols.items()}
    day2 = {c: day2[c] + hub_again[c] for c in EDGE_COLUMNS}
    i = day2["src_id"].index(SMALL_PIN) if SMALL_PIN in day2["src_id"] else None
    flipped = dict(day2)
    if i is not None:
        for c in ("src_id", "dst_id"):
            flipped[c] = list(day2[c])
        flipped["src_id"][i], flipped["dst_id"][i] = day2["dst_id"][i], day2["src_id"][i]
    write_edges(base / "d1", day1)
    write_edges(base / "d2", flipped)
    return [base / "d1", base / "d2"]


def window_input(window_dirs) -> dict[str, list]:
    cols: dict[str, list] = {c: [] for c in EDGE_COLUMNS}
    for d in window_dirs:
        t = pq.read_table(sorted(d.glob("*.parquet")))
        for c in EDGE_COLUMNS:
            cols[c] += t.column(c).to_pylist()
    return cols


@pytest.fixture(scope="module")
def pruned(request, window_dirs, tmp_path_factory):
    """(engine, spark partitions, params) -> (rows, stats); each combination runs once."""
    cache: dict = {}
    base = tmp_path_factory.mktemp("pruned")

    def get(engine: str, params: PruningParams, partitions: int | None = None):
        key = (engine, partitions, params)
        if key not in cache:
            out = base / f"out{len(cache)}"
            out.mkdir()
            if engine == "spark":
                spark = request.getfixturevalue("spark")
                eng = SparkEdgeEngine(lambda: spark, partitions=partitions)
            else:
                eng = get_engine("duckdb", scratch_dir=base / "scratch")
            stats = eng.prune_window(window_dirs, out, params)
            cache[key] = (read_rows(out), stats)
        return cache[key]

    return get


# ---------------------------------------------------------------------- d_target and the sampling key


def test_d_target_formula():
    p = PruningParams()
    assert math.floor(1000**0.86) == 380
    assert d_target([1000], p).tolist() == [380]
    assert d_target([1, 5, 10, 11, 60], p).tolist() == [10, 10, 10, 10, 33]  # d_min binds below ~14.6
    assert d_target([10**6], p).tolist() == [10_000]  # d_max binds
    assert d_target([1000], PruningParams(d_max=50)).tolist() == [50]
    assert d_target([100], PruningParams(alpha=0.5, d_min=0)).tolist() == [10]  # exact power: no ulp slip


def test_params_are_validated():
    for bad in ({"alpha": 1.5}, {"alpha": -0.1}, {"d_min": -1}, {"d_max": 0}, {"seed": -1}, {"seed": 2**63}):
        with pytest.raises(ValueError):
            PruningParams(**bad)


def _extreme_ids(n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = np.concatenate(
        [
            np.array([0, 1, -1, 2**31 - 1, 2**31, 2**62, -(2**62), 2**63 - 1, -(2**63)], dtype=np.int64),
            rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64, endpoint=True),
        ]
    )
    dst = np.roll(ids, 1)
    types = np.array(["pin", "board", "user"])[rng.integers(0, 3, size=len(ids))]
    dtypes = np.roll(types, 2)
    return types, ids, dtypes, dst


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("seed", [0, 2**63 - 1])
def test_sampling_key_sql_equals_numpy_without_overflow(engine, seed, request):
    """Extreme int64 ids (Spark runs ANSI: an overflow would raise) give the reference key exactly."""
    types, ids, dtypes, dst = _extreme_ids()
    expected = sampling_key_numpy(seed, types, ids, dtypes, dst)
    assert expected.min() >= 0 and expected.max() < 2**31
    table = pa.table({"src_type": types, "src_id": ids, "dst_type": dtypes, "dst_id": dst, "i": np.arange(len(ids))})
    stages = sampling_key_sql(engine, seed, "src_type", "src_id", "dst_type", "dst_id")
    if engine == "duckdb":
        import duckdb

        con = duckdb.connect()
        con.register("t", table)
        sql = "t"
        for i, (col, expr) in enumerate(stages):
            sql = f"(SELECT *, {expr} AS {col} FROM {sql} AS s{i})"
        got = np.asarray([r[0] for r in con.execute(f"SELECT _k FROM {sql} ORDER BY i").fetchall()])
    else:
        from pyspark.sql import functions as F

        spark = request.getfixturevalue("spark")
        assert spark.conf.get("spark.sql.ansi.enabled") == "true"
        df = spark.createDataFrame(table.to_pandas())
        for col, expr in stages:
            df = df.withColumn(col, F.expr(expr))
        got = np.asarray([r[0] for r in df.orderBy("i").select("_k").collect()])
    np.testing.assert_array_equal(got, expected)


def test_sampling_key_depends_on_every_field():
    base = sampling_key_numpy(0, "pin", 1, "board", 2)
    for variant in (
        sampling_key_numpy(1, "pin", 1, "board", 2),
        sampling_key_numpy(0, "board", 1, "board", 2),
        sampling_key_numpy(0, "pin", 3, "board", 2),
        sampling_key_numpy(0, "pin", 1, "pin", 2),
        sampling_key_numpy(0, "pin", 1, "board", 2 + 2**31),
        sampling_key_numpy(0, "board", 2, "pin", 1),
    ):
        assert variant != base


def test_sampling_key_is_a_uniform_order():
    """Keys of consecutive ids look uniform: the kept 380 of 1000 consecutive neighbours are spread."""
    keys = sampling_key_numpy(
        0,
        np.full(1000, "pin"),
        np.ones(1000, np.int64),
        np.full(1000, "board"),
        np.arange(1000, dtype=np.int64),
    )
    kept = np.sort(np.argsort(keys, kind="stable")[:380])
    per_quarter = np.bincount(kept // 250, minlength=4)
    assert per_quarter.min() > 70 and per_quarter.max() < 120, per_quarter
    assert len(np.unique(keys)) == 1000


# --------------------------------------------------------------------------------- Algorithm 2, engines


@pytest.mark.parametrize("engine", ENGINES)
def test_pruning_matches_reference_with_paper_defaults(engine, pruned, window_dirs):
    rows, stats = pruned(engine, PruningParams(), partitions=1)
    assert len(rows) == len(set(rows))
    reference = prune_reference(window_input(window_dirs), PruningParams())
    assert set(rows) == rows_of(reference)
    # The hub of degree 1000 keeps exactly floor(1000 ** 0.86) = 380 entries; weights summed over days.
    hub = kept_of(rows, "pin", HUB)
    assert len(hub) == 380
    assert all(r[5] == 2 * (1.0 + r[3] % 3) for r in hub)
    # Lists at or below d_min keep everything; just above d_min, d_min binds (floor(11 ** 0.86) = 7).
    assert len(kept_of(rows, "pin", D_MIN_PIN)) == 10
    assert {r[3] for r in kept_of(rows, "pin", SMALL_PIN)} == set(range(101, 106))
    assert len(kept_of(rows, "pin", D11_PIN)) == 10
    assert len(kept_of(rows, "board", BIG_BOARD)) == 33 and len(kept_of(rows, "pin", MIXED_PIN)) == 33
    # Degree-1 neighbours keep their only entry (the non-canonical pin_pin input merged: pin 101 has one).
    assert len(kept_of(rows, "pin", 101)) == 1 and len(kept_of(rows, "board", 7)) == 1
    # Table 1 before/after.
    before, after = stats["before"], stats["after"]
    # pins: the 5 crafted pins + pin neighbours (5 of SMALL_PIN, 60 of BIG_BOARD, 30 of MIXED_PIN)
    assert before["node_types"]["pin"]["nodes"] == 5 + 5 + 60 + 30
    assert before["node_types"]["board"]["nodes"] == 1000 + 10 + 11 + 1 + 30
    assert before["edge_types"]["pin_board"]["edges"] == 1000 + 10 + 11 + 60 + 30
    assert before["edge_types"]["pin_pin"]["edges"] == 5 + 30
    assert before["total_entries"] == 2 * (1000 + 10 + 11 + 60 + 30 + 5 + 30)
    assert after["total_entries"] == len(rows)
    for t in ("pin", "board"):
        actual = [r for r in rows if r[0] == t]
        assert after["node_types"][t]["nodes"] == len({r[1] for r in actual})
        assert after["node_types"][t]["entries"] == len(actual)
    assert after["edge_types"]["pin_pin"]["entries"] == sum(r[4] == "pin_pin" for r in rows)
    assert stats["kept_fraction"] == pytest.approx(len(rows) / before["total_entries"], abs=1e-6)
    assert stats["checks"] == {"self_loops": 0, "unknown_edge_types": 0, "nonpositive_weights": 0}


@pytest.mark.parametrize("engine", ENGINES)
def test_d_max_cap_binds_and_seed_changes_the_kept_set(engine, pruned, window_dirs):
    params = PruningParams(d_max=50, seed=1)
    rows, _ = pruned(engine, params)
    edges = window_input(window_dirs)
    assert set(rows) == rows_of(prune_reference(edges, params))
    hub = {r[3] for r in kept_of(rows, "pin", HUB)}
    assert len(hub) == 50  # floor(1000 ** 0.86) = 380 capped by d_max
    assert len(kept_of(rows, "board", BIG_BOARD)) == 33  # below the cap: unchanged
    seed0 = prune_reference(edges, PruningParams(d_max=50, seed=0))
    hub0 = {int(i) for t, s, i in zip(seed0["src_type"], seed0["src_id"], seed0["dst_id"]) if t == "pin" and s == HUB}
    assert len(hub0) == 50 and hub0 != hub


def test_same_kept_set_on_1_and_4_spark_partitions_and_duckdb(pruned):
    one, _ = pruned("spark", PruningParams(), partitions=1)
    four, stats4 = pruned("spark", PruningParams(), partitions=4)
    duck, stats_duck = pruned("duckdb", PruningParams(), partitions=1)
    assert set(one) == set(four) == set(duck)
    assert stats4 == stats_duck  # Table 1 identical too


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_window_gives_an_empty_typed_table(engine, request, tmp_path):
    """No published day in the window (or only empty days): an empty, typed pruned table."""
    empty_day = tmp_path / "dt=2026-01-02"
    write_edges(empty_day, {c: [] for c in EDGE_COLUMNS})
    if engine == "spark":
        spark = request.getfixturevalue("spark")
        eng = get_engine("spark", lambda: spark)
    else:
        eng = get_engine("duckdb", scratch_dir=tmp_path)
    for i, dirs in enumerate(([], [empty_day])):
        out = tmp_path / f"out{i}"
        out.mkdir()
        stats = eng.prune_window(dirs, out, PruningParams())
        files = sorted(out.glob("*.parquet"))
        assert files
        table = pq.read_table(files)
        assert table.num_rows == 0 and [f.type for f in table.schema] == [f.type for f in CONTRACT_SCHEMA]
        assert stats["before"]["total_entries"] == stats["after"]["total_entries"] == 0
        assert stats["kept_fraction"] == 1.0


@pytest.mark.parametrize("engine", ENGINES)
def test_unknown_edge_type_fails_naming_the_input(engine, request, tmp_path):
    bad = tmp_path / "dt=2026-01-01"
    write_edges(
        bad,
        {
            "src_type": ["pin"],
            "src_id": [1],
            "dst_type": ["board"],
            "dst_id": [2],
            "edge_type": ["pin_user"],
            "weight": [1.0],
        },
    )
    out = tmp_path / "out"
    out.mkdir()
    if engine == "spark":
        spark = request.getfixturevalue("spark")
        eng = get_engine("spark", lambda: spark)
    else:
        eng = get_engine("duckdb", scratch_dir=tmp_path)
    with pytest.raises(EdgeInputError, match=r"dt=2026-01-01.*pin_user"):
        eng.prune_window([bad], out, PruningParams())


# ------------------------------------------------------------------------------------ asset level


def events_table(rows) -> pa.Table:
    """Validated engagement_logs layout (warehouse); rows are (action, surface, pin, board, query pin)."""
    n = len(rows)
    return pa.table(
        {
            "event_ts": pa.array([1_767_225_600_000_000] * n, pa.timestamp("us", tz="UTC")),
            "user_id": pa.array([7] * n, pa.int64()),
            "action": pa.array([r[0] for r in rows], pa.string()),
            "surface": pa.array([r[1] for r in rows], pa.string()),
            "pin_id": pa.array([r[2] for r in rows], pa.int64()),
            "board_id": pa.array([r[3] for r in rows], pa.int64()),
            "query_pin_id": pa.array([r[4] for r in rows], pa.int64()),
        }
    )


def _publish_events(settings, day: str, rows) -> None:
    from omnisage_pipeline.storage.publish import publish_partition

    with publish_partition(settings.warehouse_dataset("engagement_logs"), day) as staging:
        if rows is not None:
            pq.write_table(events_table(rows), staging / "part-0.parquet")


def test_window_sums_days_and_drops_days_outside(omnisage_env):
    import dagster as dg

    from assets.graph import daily_edges, pruned_edges
    from omnisage_pipeline.partitions import WINDOW_DAYS
    from omnisage_pipeline.resources import StorageResource, lazy_pyspark
    from omnisage_pipeline.settings import Settings
    from omnisage_pipeline.storage.publish import require_published

    settings = Settings.from_env()
    assert settings.engine == "duckdb" and WINDOW_DAYS == 30
    old, inside, empty, day = "2026-01-01", "2026-01-15", "2026-01-20", "2026-02-10"  # window: 01-12..02-10
    _publish_events(settings, old, [("save", "homefeed", 1, 1, None)] * 5 + [("save", "homefeed", 9, 9, None)])
    _publish_events(settings, inside, [("save", "homefeed", 1, 1, None)] * 2 + [("click", "related_pins", 3, None, 2)])
    _publish_events(settings, empty, None)  # a published, empty day
    _publish_events(settings, day, [("save", "homefeed", 1, 1, None)] * 3 + [("save", "board", 2, 1, None)])
    resources = {"storage": StorageResource.from_settings(settings), "pyspark": lazy_pyspark(settings)}
    for key in (old, inside, empty, day):
        result = dg.materialize(
            [daily_edges, pruned_edges], partition_key=key, resources=resources, selection=[daily_edges]
        )
        assert result.success
        assert not result.get_asset_check_evaluations()  # no check that could fail here (assets/graph.py)
    empty_dir = require_published(settings.warehouse_dataset("daily_edges"), empty)
    assert pq.read_table(sorted(empty_dir.glob("*.parquet"))).num_rows == 0

    # One run over the range 02-09..02-10 (single-run backfill): each day prunes its own window.
    result = dg.materialize(
        [daily_edges, pruned_edges],
        resources=resources,
        selection=[pruned_edges],
        tags={"dagster/asset_partition_range_start": "2026-02-09", "dagster/asset_partition_range_end": day},
    )
    assert result.success
    # 02-09's window is 01-11..02-09: the 02-10 day is not in it yet.
    assert set(read_rows(require_published(settings.warehouse_dataset("pruned_edges"), "2026-02-09"))) == {
        ("pin", 1, "board", 1, "pin_board", 2.0),
        ("board", 1, "pin", 1, "pin_board", 2.0),
        ("pin", 2, "pin", 3, "pin_pin", 1.0),
        ("pin", 3, "pin", 2, "pin_pin", 1.0),
    }
    rows = set(read_rows(require_published(settings.warehouse_dataset("pruned_edges"), day)))
    assert rows == {
        ("pin", 1, "board", 1, "pin_board", 5.0),
        ("board", 1, "pin", 1, "pin_board", 5.0),  # 2 + 3, not + 5
        ("pin", 2, "board", 1, "pin_board", 1.0),
        ("board", 1, "pin", 2, "pin_board", 1.0),
        ("pin", 2, "pin", 3, "pin_pin", 1.0),
        ("pin", 3, "pin", 2, "pin_pin", 1.0),
    }  # pin 9 / board 9 only on 01-01, outside the window
    per_day = {m.partition: m.metadata for m in result.asset_materializations_for_node("pruned_edges")}
    meta = per_day[day]
    assert meta["kept_fraction"].value == 1.0
    assert meta["window"].value["present"] == [inside, empty, day]  # each day its own figures
    assert per_day["2026-02-09"]["window"].value["present"] == [inside, empty]
    assert meta["dagster/row_count"].value == 6 and per_day["2026-02-09"]["dagster/row_count"].value == 4
    assert meta["table1_after"].value["node_types"]["board"] == {"nodes": 1, "entries": 2, "avg_degree": 2.0}
    assert "| pin_board |" in meta["table1"].value
