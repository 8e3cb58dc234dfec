"""Checks whose result belongs to a day are partitioned like their asset: each day's evaluation is recorded
for that day's partition (``assets.daily``), in a single-day run and in every day of a range, and targets the
day's newest materialization, so the UI shows each day's own result as current. Read back from the instance."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as Status
from test_daily_events import DAYS, _materialize_range

from omnisage_pipeline.storage.publish import published_path
from omnisage_pipeline.tools.synthetic import generate

LOG_CHECKS = ("rows_accounted", "quarantine_share", "no_empty_replacement")


@pytest.fixture
def data_root(omnisage_env, tmp_path, monkeypatch):
    root = tmp_path / "data"
    generate(root, start_date=DAYS[0], days=len(DAYS), scale="tiny", seed=0)
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(root))
    return root


def _history(instance, asset: str, check: str) -> dict[str | None, list]:
    """Every execution of a check, newest first, by partition."""
    records = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey(asset), check), limit=100
    )
    by_partition: dict[str | None, list] = {}
    for record in records:
        by_partition.setdefault(record.partition, []).append(record)
    return by_partition


def _newest_materialization_id(instance, asset: str, day: str) -> int:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[day]), limit=1
    ).records
    return records[0].storage_id


def _rows(folder) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(folder.rglob("*.parquet")))


def _run_day(assets, instance, day, **kwargs):
    from omnisage_pipeline.resources import StorageResource, lazy_pyspark
    from omnisage_pipeline.settings import Settings

    settings = Settings.from_env()
    return dg.materialize(
        assets,
        instance=instance,
        partition_key=day,
        resources={"storage": StorageResource.from_settings(settings), "pyspark": lazy_pyspark(settings)},
        **kwargs,
    )


def _assert_current_per_day(instance, asset: str, checks, days) -> None:
    """Each day: exactly one execution per check, succeeded, for that day, on the day's newest materialization;
    nothing recorded for no partition, nothing left planned."""
    for check in checks:
        history = _history(instance, asset, check)
        assert set(history) == set(days), (check, set(history))
        for day in days:
            (record,) = history[day]
            assert record.status == Status.SUCCEEDED, (check, day)
            evaluation = record.evaluation
            assert evaluation.partition == day and evaluation.passed
            target = evaluation.target_materialization_data
            assert target is not None and target.storage_id == _newest_materialization_id(instance, asset, day)
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [dg.AssetCheckKey(dg.AssetKey(asset), c) for c in checks]
    )
    assert {(i.check_key.name, i.partition_key) for i in infos} == {(c, d) for c in checks for d in days}
    assert all(i.is_current for i in infos)


def test_single_day_runs_record_each_check_for_its_day(data_root):
    from assets.ingest import engagement_logs
    from omnisage_pipeline.settings import Settings

    instance = dg.DagsterInstance.ephemeral()
    for day in DAYS[:2]:
        result = _run_day([engagement_logs], instance, day)
        assert result.success
        assert {(c.check_name, c.partition) for c in result.get_asset_check_evaluations()} == {
            (c, day) for c in LOG_CHECKS
        }
    _assert_current_per_day(instance, "engagement_logs", LOG_CHECKS, DAYS[:2])
    # each day's result holds that day's figures, not the last run's
    settings = Settings.from_env()
    for day in DAYS[:2]:
        (record,) = _history(instance, "engagement_logs", "rows_accounted")[day]
        published = _rows(published_path(settings.warehouse_dataset("engagement_logs"), day))
        published += _rows(published_path(settings.quarantine_dataset("engagement_logs"), day))
        assert record.evaluation.metadata["rows_published"].value == published


def test_a_range_run_records_each_day_for_its_partition(data_root):
    from assets.ingest import engagement_logs
    from omnisage_pipeline.settings import Settings

    instance = dg.DagsterInstance.ephemeral()
    result = _materialize_range([engagement_logs], instance)
    assert result.success
    assert sorted((c.check_name, c.partition) for c in result.get_asset_check_evaluations()) == sorted(
        (c, d) for c in LOG_CHECKS for d in DAYS
    )
    _assert_current_per_day(instance, "engagement_logs", LOG_CHECKS, DAYS)
    settings = Settings.from_env()
    seen = set()
    for day in DAYS:
        (record,) = _history(instance, "engagement_logs", "quarantine_share")[day]
        rows_read = _rows(published_path(settings.warehouse_dataset("engagement_logs"), day)) + _rows(
            published_path(settings.quarantine_dataset("engagement_logs"), day)
        )
        assert record.evaluation.metadata["rows_read"].value == rows_read  # the day's own figure
        assert "per_day" not in record.evaluation.metadata  # no merged result of the range
        seen.add(rows_read)
    assert len(seen) > 1  # the days differ, so a figure copied from another day would be caught


def _make_mostly_invalid(root, day: str, share: float) -> None:
    folder = root / "engagement_logs" / f"dt={day}"
    files = sorted(folder.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    for f in files:
        f.unlink()
    surface = np.array(table.column("surface").to_pylist(), dtype=object)
    surface[: round(share * table.num_rows)] = "nowhere"
    table = table.set_column(table.schema.get_field_index("surface"), "surface", pa.array(surface, pa.string()))
    pq.write_table(table, folder / "part-0.parquet")


def test_a_blocking_failure_mid_range_is_recorded_for_its_day_and_stops_the_step(data_root):
    from assets.ingest import engagement_logs
    from omnisage_pipeline.settings import Settings

    _make_mostly_invalid(data_root, DAYS[1], 0.6)
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize_range([engagement_logs], instance, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert f"quarantine_share failed for dt={DAYS[1]}" in failure.step_failure_data.error.message
    settings = Settings.from_env()
    assert published_path(settings.warehouse_dataset("engagement_logs"), DAYS[1]) is None  # nothing published

    history = _history(instance, "engagement_logs", "quarantine_share")
    assert None not in history
    (first,) = history[DAYS[0]]
    assert first.status == Status.SUCCEEDED and first.evaluation.partition == DAYS[0]
    (failed,) = history[DAYS[1]]
    assert failed.status == Status.FAILED and failed.evaluation.partition == DAYS[1]
    assert failed.evaluation.blocking and failed.evaluation.metadata["quarantined_share"].value == pytest.approx(
        0.6, abs=0.01
    )
    (never,) = history[DAYS[2]]  # the step stopped before the last day: planned, never evaluated
    assert never.status == Status.PLANNED


# ------------------------------------------------------------------------ the mechanism, on a small asset
PARTS = dg.DailyPartitionsDefinition(start_date=DAYS[0])


def _two_check_assets(fail_day: str | None = None):
    from assets.daily import DayResult, materialize_days

    @dg.asset(
        partitions_def=PARTS,
        backfill_policy=dg.BackfillPolicy.single_run(),
        check_specs=[
            dg.AssetCheckSpec("of_the_day", asset="daily", blocking=True, partitions_def=PARTS),
            dg.AssetCheckSpec("of_the_step", asset="daily"),  # not partitioned: one merged result per step
        ],
    )
    def daily(context):
        def one_day(day: str) -> DayResult:
            checks = [
                dg.AssetCheckResult(asset_key="daily", check_name=name, passed=day != fail_day, metadata={"day": day})
                for name in ("of_the_day", "of_the_step")
            ]
            if day == fail_day:
                from assets.daily import BlockingCheckFailed

                raise BlockingCheckFailed(day, checks)
            return DayResult({"day": day}, checks)

        yield from materialize_days(context, one_day)

    @dg.asset(partitions_def=PARTS, backfill_policy=dg.BackfillPolicy.single_run(), deps=[daily])
    def downstream() -> None:
        return None

    return [daily, downstream]


def _range(assets, instance, **kwargs):
    return dg.materialize(
        assets,
        instance=instance,
        tags={"dagster/asset_partition_range_start": DAYS[0], "dagster/asset_partition_range_end": DAYS[-1]},
        **kwargs,
    )


def test_partitioned_check_per_day_unpartitioned_check_merged_downstream_runs():
    instance = dg.DagsterInstance.ephemeral()
    result = _range(_two_check_assets(), instance)
    assert result.success
    # the blocking check's output was yielded: the asset downstream of it ran in the same run
    assert {m.partition for m in result.asset_materializations_for_node("downstream")} == set(DAYS)
    per_day = _history(instance, "daily", "of_the_day")
    assert set(per_day) == set(DAYS)
    for day in DAYS:
        (record,) = per_day[day]
        assert record.status == Status.SUCCEEDED and record.evaluation.metadata["day"].value == day
    (merged,) = _history(instance, "daily", "of_the_step")[None]
    assert merged.status == Status.SUCCEEDED
    assert sorted(merged.evaluation.metadata["per_day"].value) == DAYS


def test_a_failed_partitioned_blocking_check_skips_downstream():
    instance = dg.DagsterInstance.ephemeral()
    result = _range(_two_check_assets(fail_day=DAYS[1]), instance, raise_on_error=False)
    assert not result.success
    assert not result.asset_materializations_for_node("downstream")
    per_day = _history(instance, "daily", "of_the_day")
    assert [r.status for r in per_day[DAYS[0]]] == [Status.SUCCEEDED]
    assert [r.status for r in per_day[DAYS[1]]] == [Status.FAILED]
    assert [r.status for r in per_day[DAYS[2]]] == [Status.PLANNED]
    (merged,) = _history(instance, "daily", "of_the_step")[None]
    assert merged.status == Status.FAILED and merged.evaluation.metadata["failed_days"].value == [DAYS[1]]
