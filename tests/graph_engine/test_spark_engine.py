"""Spark engine on a cluster's terms: paths reach Spark as file:// URIs, the committer writes straight into
the staging directory, shuffle partitions come from config or the data size; output equals DuckDB's."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_edges import EVENTS, events_table, read_rows

from graph_engine import spark_engine
from graph_engine.edge_engine import get_engine
from graph_engine.pruning import PruningParams
from graph_engine.spark_engine import SparkEdgeEngine, local_path, shuffle_partitions_for, spark_uri

pytestmark = pytest.mark.slow


@pytest.fixture
def recorded(monkeypatch, spark) -> dict[str, list]:
    """Every path handed to Spark's reader and writer, and the shuffle partitions in force at each write."""
    seen: dict[str, list] = {"read": [], "write": [], "shuffle_at_write": []}
    read, write = spark_engine.read_parquet, spark_engine.write_parquet

    def read_parquet(session, uris, schema):
        seen["read"] += list(uris)
        return read(session, uris, schema)

    def write_parquet(df, uri):
        seen["write"].append(uri)
        seen["shuffle_at_write"].append(spark.conf.get("spark.sql.shuffle.partitions"))
        return write(df, uri)

    monkeypatch.setattr(spark_engine, "read_parquet", read_parquet)
    monkeypatch.setattr(spark_engine, "write_parquet", write_parquet)
    return seen


def _events(tmp_path: Path) -> Path:
    events = tmp_path / "dt=2026-01-01"  # "=" must reach Hadoop unescaped
    events.mkdir()
    pq.write_table(events_table(EVENTS[:7]), events / "part-0.parquet")
    pq.write_table(events_table(EVENTS[7:]), events / "part-1.parquet")
    return events


def test_uri_helpers():
    assert spark_uri("/data/dt=2026-01-01/x.parquet") == "file:///data/dt=2026-01-01/x.parquet"
    assert spark_uri("file:///data/dt=D") == "file:///data/dt=D"
    assert spark_uri(Path("rel")).startswith("file:///") and spark_uri(Path("rel")).endswith("/rel")
    assert local_path("file:///data/dt=D") == Path("/data/dt=D")
    with pytest.raises(ValueError, match="only local paths and file:// URIs"):
        local_path("hdfs://nn/data")


def test_shuffle_partitions_follow_the_data_size():
    assert shuffle_partitions_for(0, parallelism=4) == 4  # at least one per core
    assert shuffle_partitions_for(10, parallelism=2, rows_per_partition=3) == 4
    assert shuffle_partitions_for(10**9, parallelism=16) == 500
    with pytest.raises(ValueError):
        shuffle_partitions_for(10, 2, rows_per_partition=0)


def test_file_uris_in_and_out_and_the_same_edges_as_duckdb(spark, recorded, tmp_path):
    events = _events(tmp_path)
    out_spark, out_duck = tmp_path / "spark", tmp_path / "duck"
    out_spark.mkdir()
    out_duck.mkdir()
    engine = get_engine("spark", spark_session_factory=lambda: spark)
    stats = engine.extract_daily_edges(spark_uri(events), spark_uri(out_spark))
    duck_stats = get_engine("duckdb", scratch_dir=tmp_path / "scratch").extract_daily_edges(events, out_duck)
    assert sorted(read_rows(out_spark)) == sorted(read_rows(out_duck))
    assert stats == duck_stats
    assert recorded["read"] and recorded["write"]
    assert all(u.startswith("file:///") for u in recorded["read"] + recorded["write"]), recorded
    assert recorded["write"] == [f"file://{out_spark}"]
    # The committer wrote the part files straight into the staging directory: no marker, no sub-folder.
    visible = sorted(p.name for p in out_spark.iterdir() if not p.name.startswith("."))
    assert visible and all(n.startswith("part-") and n.endswith(".parquet") for n in visible), visible


def test_shuffle_partitions_from_engine_config_then_launch_config(spark, recorded, tmp_path):
    """Explicit engine setting first, else the session's launch setting (the suite's session sets 4); the
    session's runtime value is restored after the job (it may be shared)."""
    events = _events(tmp_path)
    before = spark.conf.get("spark.sql.shuffle.partitions")
    for i, (engine, expected) in enumerate(
        ((SparkEdgeEngine(lambda: spark, shuffle_partitions=3), "3"), (SparkEdgeEngine(lambda: spark), "4"))
    ):
        out = tmp_path / f"out{i}"
        out.mkdir()
        engine.extract_daily_edges(events, out)
        assert recorded["shuffle_at_write"][-1] == expected
        assert spark.conf.get("spark.sql.shuffle.partitions") == before
    with pytest.raises(ValueError, match="shuffle_partitions"):
        SparkEdgeEngine(lambda: spark, shuffle_partitions=0)


def test_pruning_from_uris_equals_duckdb(spark, recorded, tmp_path):
    events = _events(tmp_path)
    daily = tmp_path / "daily"
    daily.mkdir()
    get_engine("duckdb", scratch_dir=tmp_path / "scratch").extract_daily_edges(events, daily)
    params = PruningParams(alpha=0.5, d_min=1, d_max=2, seed=3)  # small lists are cut too
    out_spark, out_duck = tmp_path / "pruned-spark", tmp_path / "pruned-duck"
    out_spark.mkdir()
    out_duck.mkdir()
    stats = SparkEdgeEngine(lambda: spark).prune_window([spark_uri(daily)], spark_uri(out_spark), params)
    duck = get_engine("duckdb", scratch_dir=tmp_path / "scratch").prune_window([daily], out_duck, params)
    assert sorted(read_rows(out_spark)) == sorted(read_rows(out_duck))
    assert stats == duck
    assert stats["after"]["total_entries"] < stats["before"]["total_entries"]
    assert all(u.startswith("file:///") for u in recorded["read"] + recorded["write"]), recorded
