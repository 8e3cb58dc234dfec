"""One helper for every daily asset: run the asset's per-day function for each day of the invocation
(one for a scheduled run, a whole range for a single-run backfill; see
``omnisage_pipeline.partitions.DAILY_BACKFILL_POLICY``), in date order, and merge what each day reports."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dagster as dg

from omnisage_pipeline.partitions import partition_keys


@dataclass
class DayResult:
    metadata: dict = field(default_factory=dict)
    check_results: list[dg.AssetCheckResult] = field(default_factory=list)


def _plain(value):
    return value.value if isinstance(value, dg.MetadataValue) else value


def materialize_days(
    context: dg.AssetExecutionContext,
    run_day: Callable[[str], DayResult],
    *,
    settings=None,
    retain: Sequence[str] = (),
) -> dg.MaterializeResult:
    """``retain``: the heavy datasets this asset publishes (``graph``, ``features``, ``embeddings``,
    ``user_embeddings``: folders under ``settings.home``); once every day is published, OMNISAGE_RETENTION_DAYS
    retention (omnisage_pipeline.retention) removes their expired partitions, never one that a reader leased
    or a running job reads, and reports what it removed in the metadata."""
    if retain and settings is None:
        raise ValueError("materialize_days: retain= needs settings= (OMNISAGE_RETENTION_DAYS, the dataset folders)")
    days = partition_keys(context)
    results = {}
    for day in days:
        context.log.info(f"{context.asset_key.to_user_string()}: dt={day}")
        results[day] = run_day(day)
    last = results[days[-1]]
    retention = {}
    if retain:
        from omnisage_pipeline.retention import retention_metadata

        retention = retention_metadata(context, settings, retain, days)
    if len(days) == 1:
        return dg.MaterializeResult(metadata={**last.metadata, **retention}, check_results=last.check_results)

    # A range: the last day's figures as they are, and every day's under "partitions".
    metadata = dict(last.metadata)
    metadata.update(retention)
    metadata["partitions"] = dg.MetadataValue.json(
        {day: {k: _plain(v) for k, v in r.metadata.items()} for day, r in results.items()}
    )
    merged: dict[tuple, list[tuple[str, dg.AssetCheckResult]]] = {}
    for day, r in results.items():
        for check in r.check_results:
            merged.setdefault((check.asset_key, check.check_name), []).append((day, check))
    checks = []
    for (asset_key, name), per_day in merged.items():
        failed = [day for day, c in per_day if not c.passed]
        checks.append(
            dg.AssetCheckResult(
                asset_key=asset_key,
                check_name=name,
                passed=not failed,
                severity=per_day[0][1].severity,
                metadata={
                    "failed_days": dg.MetadataValue.json(failed),
                    "per_day": dg.MetadataValue.json(
                        {day: {k: _plain(v) for k, v in c.metadata.items()} for day, c in per_day}
                    ),
                },
                description=per_day[0][1].description,
            )
        )
    return dg.MaterializeResult(metadata=metadata, check_results=checks)
