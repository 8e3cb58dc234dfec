"""The code location (workspace.yaml -> omnisage_pipeline.definitions:defs).

What the code declares and what the Dagster instance must add:

- Declared here: the daily chain's order within a run (the asset graph, one process per run, a range as one
  run in date order: ``partitions.DAILY_BACKFILL_POLICY``), runs requested one day at a time in date order
  (``engagement_logs_arrival_sensor``), and the pools on the assets (``omnisage_daily_chain`` on the
  chain, ``omnisage_model`` on training; ``omnisage_pipeline.partitions``).
- Needs the instance's ``dagster.yaml``: a pool's limit and its granularity are instance settings, not code.
  Runs touching the chain are serialised only by ``concurrency: pools: {granularity: run, default_limit: 1}``
  (and ``runs: max_concurrent_runs``), which the instance the project creates carries
  (``settings.DEFAULT_DAGSTER_YAML``); an instance of your own needs those blocks (or ``dagster instance
  concurrency set omnisage_daily_chain 1`` with run granularity), else runs of different days may overlap.
- Secrets: the MLflow tracking URI is a ``dg.EnvVar`` (resolved when a run or sensor starts; the UI shows
  the variable's name, not its value) when it comes from MLFLOW_TRACKING_URI (``build_resources`` below,
  ``resources.tracking_uri_field``).
"""

from __future__ import annotations

import dagster as dg

from omnisage_pipeline.settings import Settings, configure_process_scratch, load_settings

_settings = load_settings()  # read once: partitions, schedules and resources are built from this object
configure_process_scratch(_settings)

import assets
from omnisage_pipeline.jobs import (
    build_daily_pipeline,
    build_daily_schedule,
    reembed_job,
    with_daily_freshness,
)
from omnisage_pipeline.resources import MlflowResource, StorageResource, lazy_pyspark
from omnisage_pipeline.retention_job import retention_job, retention_schedule
from omnisage_pipeline.sensors import (
    champion_embeddings_sensor,
    engagement_logs_arrival_sensor,
    omnisage_run_failure_sensor,
)
from omnisage_pipeline.training_jobs import training_job, training_schedule

_asset_modules = assets.ASSET_MODULES


def build_resources(settings: Settings, *, secrets_from_env: bool = False) -> dict[str, object]:
    """The resources of ``settings``. ``secrets_from_env``: the fields that may carry credentials (the MLflow
    tracking URI) as ``dg.EnvVar`` when they came from the environment (the code location); without it
    every value is a literal (tests and tools that build resources for a Settings object of their own)."""
    return {
        "storage": StorageResource.from_settings(settings, secrets_from_env=secrets_from_env),
        "pyspark": lazy_pyspark(settings),
        "mlflow": MlflowResource.from_settings(settings, secrets_from_env=secrets_from_env),
    }


_assets = with_daily_freshness(dg.load_assets_from_modules(_asset_modules))
daily_pipeline = build_daily_pipeline(_assets)
daily_schedule = build_daily_schedule(daily_pipeline)

defs = dg.Definitions(
    assets=_assets,
    asset_checks=dg.load_asset_checks_from_modules(_asset_modules),
    jobs=[daily_pipeline, reembed_job, training_job, retention_job],
    schedules=[daily_schedule, training_schedule, retention_schedule],
    sensors=[champion_embeddings_sensor, engagement_logs_arrival_sensor, omnisage_run_failure_sensor],
    resources=build_resources(_settings, secrets_from_env=True),
)
