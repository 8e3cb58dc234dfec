"""One helper for every daily asset: run the asset's per-day function for each day of the invocation
(one for a scheduled run, a whole range for a single-run backfill; see
``omnisage_pipeline.partitions.DAILY_BACKFILL_POLICY``), in date order, and record each day on its own.

Events (what the Dagster UI and the instance's event log show):

- in a range, each day is recorded as materialized (``AssetMaterialization`` with ``partition=day`` and that
  day's metadata) as soon as it is published, so a failure on day k leaves days before k recorded;
- the step's own end-of-step materializations carry each day's own metadata
  (``context.add_asset_metadata(md, partition_key=day)``; the ``MaterializeResult`` itself carries none,
  since Dagster copies its metadata onto every partition of the range), so the newest materialization of
  every day holds that day's figures only;
- blocking checks run on the staged output before it is published (``assets.checks``): a failure leaves
  the previous published version in place, records the failed check result and fails the step with
  a message naming the check, the day and the figure;
- a check whose spec has the asset's ``partitions_def`` (a result that belongs to one day) is recorded once
  per day, as an ``AssetCheckEvaluation`` for that day's partition that targets the day's newest
  materialization, in a single-day run and in a range alike (Dagster would record an ``AssetCheckResult``
  of a range run for no partition); a check without one reports one result per step
  (``merge_check_results``).

A single-day run emits only the end-of-step materialization (nothing to record early: one day is all or
nothing). A day the step did not publish (``DayResult.published=False``: a sharded ``entity_embeddings``
worker whose shard waits for the others) is recorded as an ``AssetObservation`` with its figures, never as a
materialization; a step that published none or only some of its days yields no output (the assets that can
do this have ``output_required=False``), so Dagster skips what depends on it in the same run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import dagster as dg

# Not exported by dagster 1.13: the record an AssetCheckEvaluation points at its materialization with.
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData as TargetMaterialization,
)

from omnisage_pipeline.partitions import partition_keys

#: Dagster's standard metadata key for the rows of a table; the UI shows it as the asset's row count.
ROW_COUNT = "dagster/row_count"


@dataclass
class DayResult:
    metadata: dict = field(default_factory=dict)
    check_results: list[dg.AssetCheckResult] = field(default_factory=list)
    published: bool = True  # False: this step published nothing of the day (a shard waiting for others)


class BlockingCheckFailed(Exception):
    """A blocking check failed on a day's staged output (raised before publishing, so nothing was swapped).

    ``results``: every check evaluated on that day (the failed ones included), recorded before the step
    fails."""

    def __init__(self, day: str, results: Sequence[dg.AssetCheckResult]):
        self.day = day
        self.results = list(results)
        failed = [r for r in self.results if not r.passed and r.severity == dg.AssetCheckSeverity.ERROR]
        self.failed = failed
        super().__init__("; ".join(f"{r.check_name} failed for dt={day}: {r.description}" for r in failed))


def _plain(value):
    return value.value if isinstance(value, dg.MetadataValue) else value


def materialize_days(
    context: dg.AssetExecutionContext,
    run_day: Callable[[str], DayResult],
    *,
    settings=None,
    retain: Sequence[str] = (),
) -> Iterator:
    """Generator: ``yield from materialize_days(...)`` in the asset body.

    ``retain``: the heavy datasets this asset publishes (``graph``, ``features``, ``embeddings``,
    ``user_embeddings``: folders under ``settings.home``). A day already outside their retention horizon
    is refused before anything runs (``omnisage_pipeline.storage.retention.refuse_expired_days``); once every day
    is published, OMNISAGE_RETENTION_DAYS retention removes their expired partitions, never one that a
    reader leased or a running job reads, and reports what it removed in the last day's metadata."""
    if retain and settings is None:
        raise ValueError("materialize_days: retain= needs settings= (OMNISAGE_RETENTION_DAYS, the dataset folders)")
    days = partition_keys(context)
    if retain:
        from omnisage_pipeline.storage.retention import refuse_expired_days

        refuse_expired_days(settings, retain, days, log=context.log.warning)
    results: dict[str, DayResult] = {}
    for day in days:
        context.log.info(f"{context.asset_key.to_user_string()}: dt={day}")
        try:
            results[day] = run_day(day)
        except BlockingCheckFailed as exc:
            yield from check_events(context, {**results, day: DayResult(check_results=exc.results)})
            # a refused check fails the same way on a retry: never retried
            raise dg.Failure(description=f"{context.asset_key.to_user_string()}: {exc}", allow_retries=False) from exc
        result = results[day]
        if not result.published:
            yield dg.AssetObservation(asset_key=context.asset_key, partition=day, metadata=result.metadata)
        elif len(days) > 1:
            yield dg.AssetMaterialization(asset_key=context.asset_key, partition=day, metadata=result.metadata)
    if retain:
        from omnisage_pipeline.storage.retention_home import retention_metadata

        results[days[-1]].metadata.update(retention_metadata(context, settings, retain, days))
    unpublished = [day for day, r in results.items() if not r.published]
    if unpublished:
        context.log.info(f"not materialized (nothing published by this step): dt={', dt='.join(unpublished)}")
        yield from check_events(context, results)
        return
    for day, result in results.items():
        context.add_asset_metadata(result.metadata, partition_key=day)
    per_day, per_step = _split_by_partitioning(context, results)
    yield dg.MaterializeResult(check_results=merge_check_results(per_step))
    # after the materializations, so that each day's evaluation targets the day's newest one
    yield from day_check_evaluations(context, per_day)


def check_events(context: dg.AssetExecutionContext, results: dict[str, DayResult]) -> Iterator:
    """The check events of a step that yields no MaterializeResult: the per-step results of the checks
    without a partitions_def, then one evaluation per day of the partitioned ones (``day_check_evaluations``)."""
    per_day, per_step = _split_by_partitioning(context, results)
    yield from merge_check_results(per_step)
    yield from day_check_evaluations(context, per_day)


def _check_key(context: dg.AssetExecutionContext, result: dg.AssetCheckResult) -> dg.AssetCheckKey:
    if result.check_name is None:
        raise ValueError(f"{context.asset_key.to_user_string()}: an AssetCheckResult without check_name: {result}")
    return dg.AssetCheckKey(result.asset_key or context.asset_key, result.check_name)


def _split_by_partitioning(
    context: dg.AssetExecutionContext, results: dict[str, DayResult]
) -> tuple[dict[str, list[dg.AssetCheckResult]], dict[str, DayResult]]:
    """(each day's results of the checks with a partitions_def, each day's results of those without)."""
    spec = context.assets_def.get_spec_for_check_key
    per_day: dict[str, list[dg.AssetCheckResult]] = {}
    per_step: dict[str, DayResult] = {}
    for day, r in results.items():
        partitioned = [spec(_check_key(context, c)).partitions_def is not None for c in r.check_results]
        per_day[day] = [c for c, p in zip(r.check_results, partitioned) if p]
        per_step[day] = DayResult(check_results=[c for c, p in zip(r.check_results, partitioned) if not p])
    return per_day, per_step


def day_check_evaluations(context: dg.AssetExecutionContext, per_day: dict[str, list[dg.AssetCheckResult]]) -> Iterator:
    """One ``AssetCheckEvaluation`` per day and check, for the day's partition, targeting the day's newest
    materialization (as Dagster does for a single-partition step), then one output per selected check: what
    Dagster yields for an ``AssetCheckResult``, and what the assets downstream of a blocking check wait for.
    A failed blocking evaluation fails the step like a failed ``AssetCheckResult``."""
    evaluated: set[dg.AssetCheckKey] = set()
    for day, checks in per_day.items():
        targets: dict[dg.AssetKey, TargetMaterialization | None] = {}
        for c in checks:
            key = _check_key(context, c)
            if key.asset_key not in targets:
                targets[key.asset_key] = _newest_materialization(context, key.asset_key, day)
            yield dg.AssetCheckEvaluation(
                asset_key=key.asset_key,
                check_name=key.name,
                passed=c.passed,
                metadata=c.metadata,
                target_materialization_data=targets[key.asset_key],
                severity=c.severity,
                description=c.description,
                blocking=context.assets_def.get_spec_for_check_key(key).blocking,
                partition=day,
            )
            evaluated.add(key)
    for key in sorted(evaluated & set(context.selected_asset_check_keys), key=lambda k: k.to_user_string()):
        yield dg.Output(None, output_name=context.assets_def.get_output_name_for_asset_check_key(key))


def _newest_materialization(
    context: dg.AssetExecutionContext, asset_key: dg.AssetKey, day: str
) -> TargetMaterialization | None:
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[day]), limit=1
    ).records
    if not records:
        return None
    return TargetMaterialization(
        storage_id=records[0].storage_id, run_id=records[0].run_id, timestamp=records[0].timestamp
    )


def merge_check_results(results: dict[str, DayResult]) -> list[dg.AssetCheckResult]:
    """One result per check (Dagster takes one AssetCheckResult per check and step), for the checks without
    a partitions_def: a single day's as it is; over a range, failed if any day failed, with the failed days
    and every day's figures in the metadata."""
    per_check: dict[tuple, list[tuple[str, dg.AssetCheckResult]]] = {}
    for day, r in results.items():
        for check in r.check_results:
            per_check.setdefault((check.asset_key, check.check_name), []).append((day, check))
    merged = []
    for per_day in per_check.values():
        if len(per_day) == 1:
            merged.append(per_day[0][1])
            continue
        failed = [(day, c) for day, c in per_day if not c.passed]
        first = (failed or per_day)[0][1]
        merged.append(
            dg.AssetCheckResult(
                asset_key=first.asset_key,
                check_name=first.check_name,
                passed=not failed,
                severity=first.severity,
                metadata={
                    "failed_days": dg.MetadataValue.json([day for day, _ in failed]),
                    "per_day": dg.MetadataValue.json(
                        {day: {k: _plain(v) for k, v in c.metadata.items()} for day, c in per_day}
                    ),
                },
                description=first.description,
            )
        )
    return merged
