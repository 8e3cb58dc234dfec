"""The code location loads, validates with the real CLI, and its schedule targets the right day."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

REPO = Path(__file__).resolve().parents[1]

CONTRACT_ASSET_KEYS = {
    "engagement_logs",
    "entity_metadata",
    "daily_edges",
    "pruned_edges",
    "graph_snapshot",
    "feature_store",
    "training_examples",
    "omnisage_model",
    "entity_embeddings",
    "recall_report",
    "ann_index",
}


def _defs():
    from omnisage_pipeline.definitions import defs

    return defs


def test_definitions_load_and_every_asset_is_daily_but_the_model():
    defs = _defs()
    graph = defs.resolve_asset_graph()
    materializable = [k for k in graph.get_all_asset_keys() if graph.get(k).is_materializable]
    keys = {k.to_user_string() for k in materializable}
    assert keys, "no assets loaded"
    assert keys <= CONTRACT_ASSET_KEYS, keys - CONTRACT_ASSET_KEYS
    for key in materializable:
        partitions = graph.get(key).partitions_def
        if key.to_user_string() == "omnisage_model":
            assert partitions is None
        else:
            assert isinstance(partitions, dg.DailyPartitionsDefinition), key
            assert graph.get(key).backfill_policy == dg.BackfillPolicy.single_run(), key
    job = defs.resolve_job_def("daily_pipeline")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == keys - {"omnisage_model"}


def test_dagster_definitions_validate_cli(tmp_path):
    env = dict(os.environ, OMNISAGE_HOME=str(tmp_path / "home"), DAGSTER_HOME=str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Loading the definitions writes nothing into the working directory.
    assert not (REPO / "mlruns").exists()


def test_daily_schedule_tick_targets_the_day_that_just_ended():
    defs = _defs()
    schedule = defs.resolve_schedule_def("daily_pipeline_schedule")
    tick_time = datetime(2026, 3, 5, 1, 0, tzinfo=timezone.utc)
    with dg.build_schedule_context(scheduled_execution_time=tick_time) as context:
        requests = schedule.evaluate_tick(context).run_requests
    assert [r.partition_key for r in requests] == ["2026-03-04"]
