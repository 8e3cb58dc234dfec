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
    # Nothing was written into the working directory or outside OMNISAGE_HOME / DAGSTER_HOME.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dagster_home", "data", "home"]
