"""The training job and its weekly schedule.

``train_omnisage_model`` materializes the unpartitioned ``omnisage_model`` asset: it trains on the newest
published ``training_examples`` partition unless the run config names one, registers a new MLflow model
version and moves ``champion`` only when the gate says so. Launch it from the UI (Jobs ->
train_omnisage_model -> Launchpad, where the asset's config can be edited) or from the CLI::

    dagster job launch -m omnisage_pipeline.definitions -j train_omnisage_model \
        --config-json '{"ops": {"omnisage_model": {"config": {"steps": 300}}}}'

Runs of the job queue in the asset's pool ``omnisage_model`` (limit 1, ``partitions.MODEL_TRAINING_POOL``): a
launched training and the scheduled one never train side by side.

The schedule runs it weekly (default Monday 03:00 UTC, after the daily pipeline's 01:00 UTC run has
published the previous day's examples). ``OMNISAGE_TRAIN_CRON`` overrides the cron string; it is read when
the definitions load.
"""

from __future__ import annotations

import dagster as dg

from omnisage_pipeline.settings import load_settings

TRAINING_JOB_NAME = "train_omnisage_model"
DEFAULT_TRAIN_CRON = "0 3 * * 1"  # Monday 03:00 UTC
TRAIN_CRON_ENV = "OMNISAGE_TRAIN_CRON"

training_job = dg.define_asset_job(
    TRAINING_JOB_NAME,
    selection=dg.AssetSelection.assets("omnisage_model"),
    description="Train omnisage_model on the newest training_examples partition, log the MLflow run, register "
    "the version and apply the champion/challenger gate.",
)


def build_training_schedule(cron_schedule: str | None = None) -> dg.ScheduleDefinition:
    """Weekly by default; an invalid cron string fails here, when the definitions load (ScheduleDefinition
    validates it)."""
    cron = cron_schedule or load_settings().train_cron or DEFAULT_TRAIN_CRON
    return dg.ScheduleDefinition(
        name="weekly_training_schedule",
        job=training_job,
        cron_schedule=cron,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Weekly retraining of omnisage_model ({cron}, UTC); start it in the UI or with "
        "`dagster schedule start weekly_training_schedule`.",
    )


training_schedule = build_training_schedule()
