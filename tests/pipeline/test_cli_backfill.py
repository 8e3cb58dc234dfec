"""A backfill of three days through the real `dagster` CLI, in a subprocess with its own DAGSTER_HOME.

Every daily asset has a single-run backfill policy, so `dagster asset materialize --partition-range` builds the
whole range in one run, each asset handling its days in date order (pruned_edges of a day reads the daily
edges of the days before it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from omnisage_pipeline.storage.publish import list_published, published_path
from omnisage_pipeline.tools.synthetic import generate

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
DAILY_DATA_ASSETS = [
    "engagement_logs",
    "entity_metadata",
    "daily_edges",
    "pruned_edges",
    "graph_snapshot",
    "feature_store",
    "training_examples",
]

#: The checks of those assets: each one's result belongs to a day (a partitioned check).
DAILY_CHECKS = {
    "engagement_logs": ["rows_accounted", "quarantine_share", "no_empty_replacement"],
    "entity_metadata": ["rows_accounted", "no_empty_replacement"],
    "graph_snapshot": ["graph_coverage"],
    "feature_store": ["every_entity_has_features"],
    "training_examples": ["examples_for_every_task"],
}


def test_cli_backfill_of_three_partitions(tmp_path):
    data_root = tmp_path / "data"
    generate(data_root, start_date=DAYS[0], days=3, scale="tiny", seed=0)
    home, dagster_home = tmp_path / "home", tmp_path / "dagster_home"
    dagster_home.mkdir()
    env = dict(
        os.environ,
        OMNISAGE_HOME=str(home),
        OMNISAGE_DATA_ROOT=str(data_root),
        OMNISAGE_ENGINE="duckdb",
        OMNISAGE_START_DATE=DAYS[0],
        OMNISAGE_WINDOW_DAYS="2",
        DAGSTER_HOME=str(dagster_home),
        MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
    )
    cmd = [
        sys.executable,
        "-m",
        "dagster",
        "asset",
        "materialize",
        "-m",
        "omnisage_pipeline.definitions",
        "--select",
        ",".join(DAILY_DATA_ASSETS),
        "--partition-range",
        f"{DAYS[0]}...{DAYS[-1]}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    for dataset in ("engagement_logs", "daily_edges", "pruned_edges", "training_examples"):
        assert list_published(home / "warehouse" / dataset) == DAYS, dataset
    for folder in ("graph", "features"):
        assert list_published(home / folder) == DAYS, folder

    for day in DAYS:
        assert pq.read_table(published_path(home / "warehouse" / "pruned_edges", day)).num_rows > 0, day

    # The instance records one materialization per day for every asset of the range.
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    for asset in DAILY_DATA_ASSETS:
        keys = instance.get_materialized_partitions(dg.AssetKey(asset))
        assert set(keys) == set(DAYS), (asset, keys)
    # Every check of those assets was evaluated for each day's own partition, on that day's newest
    # materialization (what the UI shows as the day's current result), and no result went to no partition.
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [dg.AssetCheckKey(dg.AssetKey(asset), name) for asset, names in DAILY_CHECKS.items() for name in names]
    )
    evaluated = {(i.check_key.asset_key.path[-1], i.check_key.name, i.partition_key) for i in infos}
    assert evaluated == {(a, n, d) for a, names in DAILY_CHECKS.items() for n in names for d in DAYS}
    assert all(i.is_current and i.latest_execution_status.value != "PLANNED" for i in infos)
    # Nothing was written into the working directory or outside OMNISAGE_HOME / DAGSTER_HOME.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dagster_home", "data", "home"]
