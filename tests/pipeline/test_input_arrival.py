"""Input arrival: the contract's folders are observable source assets, a new ``engagement_logs/dt=D`` folder
starts day D's chain through ``engagement_logs_arrival_sensor`` (one run per day, run key per day, cursor =
the last day handled), a day that never arrives is never requested, and the 01:00 schedule is a fallback that
leaves a day the sensor already started alone."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from assets.sources import DATA_VERSION_TAG, RAW_ENGAGEMENT_LOGS, RAW_ENTITY_METADATA, latest_data_version
from omnisage_pipeline import sensors
from omnisage_pipeline.partitions import daily_partitions
from omnisage_pipeline.resources import StorageResource
from omnisage_pipeline.settings import Settings

OLD = time.time() - 3600  # an hour ago: a folder that stopped changing long before the tick


def _deliver(root: Path, day: str, files: int = 2, mtime: float | None = OLD) -> Path:
    folder = root / "engagement_logs" / f"dt={day}"
    folder.mkdir(parents=True)
    for i in range(files):
        (folder / f"part-{i}.parquet").write_bytes(b"x" * (100 + i))
    (folder / "_SUCCESS").write_text("")  # a hidden marker: not a contract file
    if mtime is not None:
        for path in (*folder.iterdir(), folder):
            os.utime(path, (mtime, mtime))
    return folder


@pytest.fixture
def data_root(omnisage_env, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    for name in ("pins", "boards"):
        (root / name).mkdir(parents=True)
        (root / name / "part-0.parquet").write_bytes(b"m" * 10)
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(root))
    return root


def _tick(instance, cursor: str | None) -> dg.SensorResult:
    storage = StorageResource.from_settings(Settings.from_env())
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage}) as context:
        return sensors.engagement_logs_arrival_sensor(context)


def _run(instance, day: str, status: dg.DagsterRunStatus) -> None:
    instance.add_run(
        dg.DagsterRun(
            job_name="daily_pipeline", run_id=str(uuid.uuid4()), status=status, tags={"dagster/partition": day}
        )
    )


def test_a_new_day_folder_starts_that_days_chain_once(data_root):
    instance = dg.DagsterInstance.ephemeral()
    _deliver(data_root, "2026-03-01")
    _deliver(data_root, "2026-03-02", files=3)

    result = _tick(instance, cursor="2026-03-01")
    (request,) = result.run_requests
    assert (request.partition_key, request.run_key) == ("2026-03-02", "engagement_logs/dt=2026-03-02")
    assert result.cursor == "2026-03-02"
    observed = {(e.asset_key, e.partition): e for e in result.asset_events}
    day = observed[(RAW_ENGAGEMENT_LOGS, "2026-03-02")]
    assert day.metadata["present"].value is True and day.metadata["files"].value == 3
    assert day.metadata["bytes"].value == 100 + 101 + 102 and day.tags[DATA_VERSION_TAG]
    assert observed[(RAW_ENTITY_METADATA, "2026-03-02")].metadata["pins.files"].value == 1  # what D reads
    # The next tick has nothing new: the day is not requested twice.
    again = _tick(instance, cursor=result.cursor)
    assert not again.run_requests and again.cursor == "2026-03-02"

    from omnisage_pipeline.definitions import defs

    sensor = defs.resolve_sensor_def(sensors.ARRIVAL_SENSOR_NAME)
    assert sensor.job_name == "daily_pipeline" and sensor.default_status == dg.DefaultSensorStatus.STOPPED


def test_a_missing_day_is_never_requested_and_stays_missing(data_root):
    instance = dg.DagsterInstance.ephemeral()
    _deliver(data_root, "2026-03-01")
    skipped = _tick(instance, cursor="2026-03-01")  # dt=2026-03-02 has not arrived
    assert not skipped.run_requests and "after 2026-03-01" in skipped.skip_reason.skip_message
    _deliver(data_root, "2026-03-03")
    result = _tick(instance, cursor="2026-03-01")
    assert [r.partition_key for r in result.run_requests] == ["2026-03-03"]  # never the missing day
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    assert latest_data_version(instance, RAW_ENGAGEMENT_LOGS, "2026-03-03")
    assert latest_data_version(instance, RAW_ENGAGEMENT_LOGS, "2026-03-02") is None  # shows as missing


def test_a_folder_still_being_written_waits_and_the_first_tick_takes_the_newest_day(data_root):
    instance = dg.DagsterInstance.ephemeral()
    _deliver(data_root, "2026-03-01")
    folder = _deliver(data_root, "2026-03-02", mtime=None)  # written just now
    waiting = _tick(instance, cursor=None)
    assert not waiting.run_requests and waiting.cursor is None
    assert "dt=2026-03-02 changed" in waiting.skip_reason.skip_message
    for path in (*folder.iterdir(), folder):
        os.utime(path, (OLD, OLD))
    result = _tick(instance, cursor=None)  # no cursor yet: only the newest day, older days are a backfill's
    assert [r.partition_key for r in result.run_requests] == ["2026-03-02"]


def test_a_day_already_started_is_passed_over_and_a_stray_entry_is_reported(data_root):
    instance = dg.DagsterInstance.ephemeral()
    _deliver(data_root, "2026-03-01")
    _deliver(data_root, "2026-03-02")
    (data_root / "engagement_logs" / "dt=2026-13-40").mkdir()
    _run(instance, "2026-03-02", dg.DagsterRunStatus.SUCCESS)
    storage = StorageResource.from_settings(Settings.from_env())
    with dg.build_sensor_context(instance=instance, cursor="2026-03-01", resources={"storage": storage}) as ctx:
        plan = sensors.plan_arrivals(
            storage.settings.data_root,
            ctx.cursor,
            time.time(),
            lambda day: sensors.day_started(instance, day) is not None,
        )
    assert plan.start == [] and plan.already_started == ["2026-03-02"] and plan.cursor == "2026-03-02"
    assert [p.name for p in plan.unexpected] == ["dt=2026-13-40"]


def test_the_schedule_is_a_fallback_for_days_the_sensor_did_not_start():
    from omnisage_pipeline.definitions import defs

    schedule = defs.resolve_schedule_def("daily_pipeline_schedule")

    def tick(instance, day_after: str):
        when = datetime.fromisoformat(day_after).replace(hour=1, tzinfo=UTC)
        with dg.build_schedule_context(
            instance=instance, scheduled_execution_time=when, repository_def=defs.get_repository_def()
        ) as context:
            return schedule.evaluate_tick(context)

    with dg.instance_for_test() as instance:  # a schedule context needs a persistent instance
        _run(instance, "2026-03-04", dg.DagsterRunStatus.STARTED)  # the sensor's run of the day
        started = tick(instance, "2026-03-05")
        assert not started.run_requests and "dt=2026-03-04 already started" in started.skip_message
        _run(instance, "2026-03-05", dg.DagsterRunStatus.FAILURE)  # a failed run leaves the day to the fallback
        assert [r.partition_key for r in tick(instance, "2026-03-06").run_requests] == ["2026-03-05"]
        assert [r.partition_key for r in tick(instance, "2026-03-07").run_requests] == ["2026-03-06"]


def test_observing_the_inputs_reports_every_delivered_day_and_the_snapshot(data_root):
    from omnisage_pipeline.definitions import build_resources, defs

    _deliver(data_root, "2026-03-01", files=1)
    _deliver(data_root, "2026-03-03", files=2)
    observe = dg.define_asset_job("observe_inputs", selection=[RAW_ENGAGEMENT_LOGS, RAW_ENTITY_METADATA])
    local = dg.Definitions(assets=list(defs.assets), jobs=[observe], resources=build_resources(Settings.from_env()))
    instance = dg.DagsterInstance.ephemeral()
    assert local.resolve_job_def("observe_inputs").execute_in_process(instance=instance).success
    assert latest_data_version(instance, RAW_ENGAGEMENT_LOGS, "2026-03-01")
    assert latest_data_version(instance, RAW_ENGAGEMENT_LOGS, "2026-03-02") is None
    newest = daily_partitions.get_last_partition_key()  # the snapshot on disk is the newest day's
    first = latest_data_version(instance, RAW_ENTITY_METADATA, newest)
    (data_root / "pins" / "part-1.parquet").write_bytes(b"new")  # the snapshot changed
    assert local.resolve_job_def("observe_inputs").execute_in_process(instance=instance).success
    assert latest_data_version(instance, RAW_ENTITY_METADATA, newest) not in (None, first)
