"""The daily job, its fallback schedule and the freshness expected of the daily assets.

A day's chain is normally started by ``engagement_logs_arrival_sensor`` as soon as the day's input folder has
arrived (``omnisage_pipeline.sensors``). ``daily_pipeline_schedule`` (01:00 UTC, the day that just ended) is
the fallback: it skips a day that already has a queued, running or successful ``daily_pipeline`` run, so a
day the sensor started is not run twice, and runs a day nobody started (or whose run failed).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import dagster as dg

from omnisage_pipeline.partitions import SAFE_RETRY_POLICY, daily_partitions

DAILY_JOB_NAME = "daily_pipeline"
REEMBED_JOB_NAME = "champion_reembedding"
#: What a champion change re-materializes: the day's embeddings and everything downstream of them.
REEMBED_SELECTION = dg.AssetSelection.assets("entity_embeddings").downstream()
DAILY_SCHEDULE_CRON = "0 1 * * *"  # 01:00 UTC; the run's partition is the day that just ended
#: Freshness of every daily asset (Dagster's FreshnessPolicy, evaluated by the daemon; no run, no sensor): by
#: 06:00 UTC each day it has been materialized within the 24 hours before, i.e. the chain of the day that
#: ended at midnight ran (input at ~00:00, fallback schedule at 01:00, a few hours of work). The policy is
#: per asset, not per partition: a backfill of an old day also counts as an update (the partitions view
#: shows which days are missing).
DAILY_FRESHNESS = dg.FreshnessPolicy.cron(
    deadline_cron="0 6 * * *", lower_bound_delta=timedelta(hours=24), timezone="UTC"
)
#: Runs that count as "this day was started": not the failed or canceled ones (those leave the day to run).
_STARTED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.SUCCESS,
]


def is_daily(asset) -> bool:
    """A materializable asset on the daily partitions (all but ``omnisage_model``, contract "Asset keys")."""
    return (
        isinstance(asset, dg.AssetsDefinition) and asset.is_materializable and asset.partitions_def == daily_partitions
    )


def daily_asset_keys(asset_defs: Sequence) -> list[dg.AssetKey]:
    """Every daily asset's key (source assets, observed and never materialized, are not part of the job)."""
    return [key for a in asset_defs if is_daily(a) for key in a.keys]


def with_daily_freshness(asset_defs: Sequence) -> list:
    """``asset_defs`` with ``DAILY_FRESHNESS`` on every daily asset."""
    return [
        dg.map_asset_specs(lambda spec: dg.apply_freshness_policy(spec, DAILY_FRESHNESS), [a])[0] if is_daily(a) else a
        for a in asset_defs
    ]


def build_daily_pipeline(asset_defs: Sequence):
    return dg.define_asset_job(
        DAILY_JOB_NAME,
        selection=dg.AssetSelection.assets(*daily_asset_keys(asset_defs)),
        # One process for the whole day: a process per step costs 7-10 s of imports each here (a run took
        # ~2 min that way, ~40 s in process), and the steps are sequential anyway (each reads the last).
        executor_def=dg.in_process_executor,
        # Every step publishes atomically, so a transient failure is retried (partitions.SAFE_RETRY_POLICY).
        op_retry_policy=SAFE_RETRY_POLICY,
        description="Every daily asset of one day: ingest -> edges -> pruning -> snapshot -> features -> "
        "training examples -> embeddings -> recall report, index",
    )


#: The runs of champion_embeddings_sensor: one day's embeddings and what depends on them, retried like the
#: daily job (an ad-hoc materialization from the UI, Dagster's implicit asset job, runs once).
reembed_job = dg.define_asset_job(
    REEMBED_JOB_NAME,
    selection=REEMBED_SELECTION,
    executor_def=dg.in_process_executor,
    op_retry_policy=SAFE_RETRY_POLICY,
    description="entity_embeddings of one day and what depends on it (recall_report, ann_index), with the "
    "current champion: what champion_embeddings_sensor requests when the alias moves.",
)


def day_started(instance: dg.DagsterInstance, day: str) -> dg.DagsterRun | None:
    """The newest ``daily_pipeline`` run of ``day`` that is queued, running or succeeded (None: no such run)."""
    records = instance.get_run_records(
        dg.RunsFilter(job_name=DAILY_JOB_NAME, tags={"dagster/partition": day}, statuses=_STARTED), limit=1
    )
    return records[0].dagster_run if records else None


def build_daily_schedule(daily_pipeline) -> dg.ScheduleDefinition:
    """The fallback: at 01:00 UTC, the day that just ended, unless a run of that day was already started."""

    @dg.schedule(
        name=f"{DAILY_JOB_NAME}_schedule",
        cron_schedule=DAILY_SCHEDULE_CRON,
        execution_timezone="UTC",
        job=daily_pipeline,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Fallback for engagement_logs_arrival_sensor: the day that just ended, at 01:00 UTC, "
        "unless a daily_pipeline run of that day is already queued, running or done.",
    )
    def daily_pipeline_schedule(context: dg.ScheduleEvaluationContext):
        with dg.partition_loading_context(effective_dt=context.scheduled_execution_time):
            day = daily_partitions.get_last_partition_key()
        if day is None:
            return dg.SkipReason("no daily partition has ended yet")
        started = day_started(context.instance, day)
        if started is not None:
            return dg.SkipReason(f"dt={day} already started: run {started.run_id} ({started.status.value})")
        return dg.RunRequest(run_key=day, partition_key=day)

    return daily_pipeline_schedule
