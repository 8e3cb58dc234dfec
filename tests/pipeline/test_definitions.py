"""The code location loads, validates with the real CLI, and its schedule targets the right day."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

REPO = Path(__file__).resolve().parents[2]

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
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Loading the definitions writes nothing into the working directory.
    assert not (REPO / "mlruns").exists()


def test_daily_schedule_tick_targets_the_day_that_just_ended():
    defs = _defs()
    schedule = defs.resolve_schedule_def("daily_pipeline_schedule")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 1 * * *", "UTC")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    tick_time = datetime(2026, 3, 5, 1, 0, tzinfo=UTC)
    # (The schedule reads the instance's runs: it skips a day already started, tests/test_input_arrival.py.)
    with (
        dg.instance_for_test() as instance,
        dg.build_schedule_context(
            instance=instance, scheduled_execution_time=tick_time, repository_def=defs.get_repository_def()
        ) as context,
    ):
        requests = schedule.evaluate_tick(context).run_requests
    assert [r.partition_key for r in requests] == ["2026-03-04"]


def test_settings_are_read_once_when_the_definitions_load(tmp_path):
    """One Settings object: the window mapping, the schedule and every resource come from the environment as
    it was when the definitions loaded; nothing re-reads it later."""
    script = """
import os, dagster as dg
from omnisage_pipeline.definitions import defs
from omnisage_pipeline import partitions
resources = defs.resources
os.environ.update(OMNISAGE_WINDOW_DAYS="9", OMNISAGE_ENGINE="spark", MLFLOW_TRACKING_URI="sqlite:////elsewhere.db",
                  OMNISAGE_HOME="/elsewhere", OMNISAGE_SPARK_MASTER="spark://elsewhere:7077")
settings = resources["storage"].settings
assert partitions.WINDOW_DAYS == 3 and len(partitions.window_keys("2026-02-10")) == 3
assert settings.window_days == 3 and settings.engine == "duckdb", settings
# The tracking URI alone is Dagster's to resolve when a run or sensor starts (it may carry credentials).
uri = dg.EnvVar("MLFLOW_TRACKING_URI")
assert resources["mlflow"].tracking_uri == uri and resources["storage"].mlflow_tracking_uri == uri
assert str(settings.home) == os.environ["HOME_AT_LOAD"] and settings.spark_master == "local[1]"
assert defs.resolve_schedule_def("weekly_training_schedule").cron_schedule == "0 4 * * 2"
print("ok")
"""
    home = tmp_path / "home"
    env = dict(
        os.environ,
        OMNISAGE_HOME=str(home),
        HOME_AT_LOAD=str(home),
        OMNISAGE_WINDOW_DAYS="3",
        OMNISAGE_ENGINE="duckdb",
        MLFLOW_TRACKING_URI=f"sqlite:///{home / 'm.db'}",
        OMNISAGE_SPARK_MASTER="local[1]",
        OMNISAGE_TRAIN_CRON="0 4 * * 2",
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_daily_chain_is_one_pool_and_the_instance_runs_it_one_run_at_a_time(tmp_path):
    """The chain's assets share a pool enforced per run with limit 1 (runs touching it are serialised);
    shard workers (entity_embeddings) are outside it and run beside it; training (omnisage_model) has a pool
    of its own (one training at a time, beside the chain)."""
    from omnisage_pipeline.partitions import DAILY_CHAIN_POOL, MODEL_TRAINING_POOL
    from omnisage_pipeline.settings import prepare_dagster_home

    graph = _defs().resolve_asset_graph()
    pools = {
        k.to_user_string(): graph.get(k).pools for k in graph.get_all_asset_keys() if graph.get(k).is_materializable
    }
    outside = {"entity_embeddings", "ann_index"}  # read one day of their inputs: beside the chain
    assert pools.pop("omnisage_model") == {MODEL_TRAINING_POOL}
    for name, asset_pools in pools.items():
        assert asset_pools == (set() if name in outside else {DAILY_CHAIN_POOL}), (name, asset_pools)
    with dg.DagsterInstance.from_config(str(prepare_dagster_home(tmp_path / "dagster"))) as instance:
        config = instance.get_concurrency_config()
        assert config.pool_config.pool_granularity.value == "run"
        assert config.pool_config.default_pool_limit == 1
        assert config.run_queue_config.max_concurrent_runs > 1  # shard runs and training beside the chain


def test_retention_job_and_its_daily_schedule_after_the_daily_pipeline():
    """`retention_job` is registered with a daily schedule that runs after the daily pipeline's (01:00 UTC),
    and every asset it notes removals on is one of the code location's."""
    from omnisage_pipeline.storage.retention import HEAVY_DATASETS
    from omnisage_pipeline.storage.retention_home import DATASET_ASSETS

    defs = _defs()
    job = defs.resolve_job_def("retention_job")
    assert [node.name for node in job.nodes] == ["apply_retention_pass"]
    schedule = defs.resolve_schedule_def("retention_schedule")
    assert schedule.job_name == "retention_job" and schedule.cron_schedule == "0 5 * * *"
    assert schedule.execution_timezone == "UTC"
    tick_time = datetime(2026, 3, 5, 5, 0, tzinfo=UTC)
    with dg.build_schedule_context(scheduled_execution_time=tick_time) as context:
        (request,) = schedule.evaluate_tick(context).run_requests
    assert request.partition_key is None  # the whole home, not one day
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert set(DATASET_ASSETS) == set(HEAVY_DATASETS) and set(DATASET_ASSETS.values()) <= keys


def test_a_tracking_uri_with_credentials_is_an_env_var_the_ui_never_shows(tmp_path):
    """MLFLOW_TRACKING_URI set: both resources hold dg.EnvVar("MLFLOW_TRACKING_URI"), so the code location's
    snapshot (what the webserver shows: resource config, run config defaults) names the variable and holds
    no trace of its value; Dagster resolves it to the value when a run starts."""
    script = """
import dagster as dg
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster._serdes import serialize_value
from omnisage_pipeline.definitions import defs
snap = serialize_value(RepositorySnap.from_def(defs.get_repository_def()))
assert "s3cr3t-token" not in snap and "MLFLOW_TRACKING_URI" in snap
with dg.build_resources({"mlflow": defs.resources["mlflow"], "storage": defs.resources["storage"]}) as res:
    assert res.mlflow.tracking_uri == "https://omnisage:s3cr3t-token@mlflow.example:5000"
    assert res.storage.settings.mlflow_tracking_uri == res.mlflow.tracking_uri
print("ok")
"""
    env = dict(
        os.environ,
        OMNISAGE_HOME=str(tmp_path / "home"),
        MLFLOW_TRACKING_URI="https://omnisage:s3cr3t-token@mlflow.example:5000",
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_the_sqlite_default_tracking_store_stays_a_literal(omnisage_env, monkeypatch):
    """Without MLFLOW_TRACKING_URI the store is a path under OMNISAGE_HOME (no credentials): a literal."""
    from omnisage_pipeline.definitions import build_resources
    from omnisage_pipeline.settings import Settings

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    settings = Settings.from_env()
    resources = build_resources(settings, secrets_from_env=True)
    assert resources["mlflow"].tracking_uri == settings.mlflow_tracking_uri
    assert not isinstance(resources["mlflow"].tracking_uri, dg.EnvVar)


def test_lineage_reads_what_the_code_reads():
    """omnisage_model reads ONE partition of its inputs (the newest: LastPartitionMapping, not all of them);
    the ingest assets sit below the contract's input folders (source assets, never materialized)."""
    graph = _defs().resolve_asset_graph()
    model = dg.AssetKey("omnisage_model")
    for name in ("training_examples", "graph_snapshot", "feature_store"):
        mapping = graph.get_partition_mapping(model, dg.AssetKey(name))
        assert isinstance(mapping, dg.LastPartitionMapping), (name, mapping)
    sources = {"engagement_logs": "raw_engagement_logs", "entity_metadata": "raw_entity_metadata"}
    for asset, source in sources.items():
        assert graph.get(dg.AssetKey(asset)).parent_keys == {dg.AssetKey(source)}
        node = graph.get(dg.AssetKey(source))
        assert node.is_observable and not node.is_materializable
        assert node.partitions_def == graph.get(dg.AssetKey(asset)).partitions_def  # day D reads day D


def test_daily_steps_retry_and_carry_a_freshness_policy_training_does_neither():
    """Every daily step publishes atomically: daily_pipeline and the champion re-embedding job retry a
    failed step; training (registration and the gate) is never retried. Every daily asset carries the
    daily FreshnessPolicy (evaluated by the daemon, no sensor needed)."""
    from dagster._core.definitions.dependency import NodeHandle

    from omnisage_pipeline.jobs import DAILY_FRESHNESS
    from omnisage_pipeline.partitions import SAFE_RETRY_POLICY

    defs = _defs()
    for name in ("daily_pipeline", "champion_reembedding"):
        job = defs.resolve_job_def(name)
        assert job.nodes and all(
            job.get_retry_policy_for_handle(NodeHandle(n.name, None)) == SAFE_RETRY_POLICY for n in job.nodes
        ), name
    training = defs.resolve_job_def("train_omnisage_model")
    assert [training.get_retry_policy_for_handle(NodeHandle(n.name, None)) for n in training.nodes] == [None]
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        daily = node.is_materializable and isinstance(node.partitions_def, dg.DailyPartitionsDefinition)
        assert node.freshness_policy == (DAILY_FRESHNESS if daily else None), key
