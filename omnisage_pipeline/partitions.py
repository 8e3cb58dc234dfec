"""Daily partitions (contract: daily from OMNISAGE_START_DATE) and the graph window mapping."""

from __future__ import annotations

import dagster as dg

from omnisage_pipeline.settings import Settings

_settings = Settings.from_env()

#: Every daily asset shares these partitions; the start date is read when the definitions load.
daily_partitions = dg.DailyPartitionsDefinition(start_date=_settings.start_date, timezone="UTC")

#: OMNISAGE_WINDOW_DAYS, read when the definitions load, so the partition mapping and the code agree.
WINDOW_DAYS = _settings.window_days


def window_mapping(window_days: int = WINDOW_DAYS) -> dg.TimeWindowPartitionMapping:
    """Day D depends on the ``window_days`` days ending at D; days before the first partition are simply
    absent (allow_nonexistent_upstream_partitions)."""
    return dg.TimeWindowPartitionMapping(
        start_offset=-(window_days - 1), end_offset=0, allow_nonexistent_upstream_partitions=True
    )
