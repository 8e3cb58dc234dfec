"""The Dagster code location (workspace.yaml -> omnisage_pipeline.definitions:defs)."""

from __future__ import annotations

import dagster as dg

from omnisage_pipeline.settings import Settings, configure_process_scratch, load_settings

_settings = load_settings()  # read once: partitions, schedules and resources are built from this object
configure_process_scratch(_settings)

import assets
from omnisage_pipeline.jobs import build_daily_pipeline, build_daily_schedule
from omnisage_pipeline.resources import MlflowResource, StorageResource, lazy_pyspark
from omnisage_pipeline.retention_job import retention_job, retention_schedule
from omnisage_pipeline.sensors import champion_embeddings_sensor
from omnisage_pipeline.training_jobs import training_job, training_schedule

_asset_modules = assets.ASSET_MODULES


def build_resources(settings: Settings) -> dict[str, object]:
    return {
        "storage": StorageResource.from_settings(settings),
        "pyspark": lazy_pyspark(settings),
        "mlflow": MlflowResource.from_settings(settings),
    }


_assets = dg.load_assets_from_modules(_asset_modules)
daily_pipeline = build_daily_pipeline(_assets)
daily_schedule = build_daily_schedule(daily_pipeline)

defs = dg.Definitions(
    assets=_assets,
    asset_checks=dg.load_asset_checks_from_modules(_asset_modules),
    jobs=[daily_pipeline, training_job, retention_job],
    schedules=[daily_schedule, training_schedule, retention_schedule],
    sensors=[champion_embeddings_sensor],
    resources=build_resources(_settings),
)
