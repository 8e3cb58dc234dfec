"""Jobs and schedules."""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from omnisage_pipeline.partitions import daily_partitions


def daily_asset_keys(asset_defs: Sequence[dg.AssetsDefinition]) -> list[dg.AssetKey]:
    """Every daily-partitioned asset (all but ``omnisage_model``, contract "Asset keys")."""
    return [key for a in asset_defs if a.partitions_def == daily_partitions for key in a.keys]


def build_daily_pipeline(asset_defs: Sequence[dg.AssetsDefinition]):
    return dg.define_asset_job(
        "daily_pipeline",
        selection=dg.AssetSelection.assets(*daily_asset_keys(asset_defs)),
        partitions_def=daily_partitions,
        # One process for the whole day: a process per step costs 7-10 s of imports each here (a run took
        # ~2 min that way, ~40 s in process), and the steps are sequential anyway (each reads the last).
        executor_def=dg.in_process_executor,
        description="Every daily asset of one day: ingest -> edges -> pruning -> snapshot -> features -> "
        "training examples -> embeddings -> recall report",
    )


def build_daily_schedule(daily_pipeline) -> dg.ScheduleDefinition:
    # Runs at 01:00 UTC; the schedule's partition is the last complete day.
    return dg.build_schedule_from_partitioned_job(daily_pipeline, hour_of_day=1, minute_of_hour=0)
