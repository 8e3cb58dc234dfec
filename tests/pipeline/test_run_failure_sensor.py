"""omnisage_run_failure_sensor: one clear line per failed run (job, partition, failed step, the first line of
the error), from the events of real failed runs."""

from __future__ import annotations

import dagster as dg

from omnisage_pipeline import sensors
from omnisage_pipeline.resources import StorageResource
from omnisage_pipeline.settings import Settings


def _failure_context(instance, run_id: str) -> dg.RunFailureSensorContext:
    run = instance.get_run_by_id(run_id)
    (failure,) = [
        e.dagster_event
        for e in instance.all_logs(run_id)
        if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.RUN_FAILURE
    ]
    return dg.build_run_status_sensor_context(
        sensor_name=sensors.FAILURE_SENSOR_NAME,
        dagster_event=failure,
        dagster_instance=instance,
        dagster_run=run,
    ).for_run_failure()


def test_a_missing_input_day_is_summarised_with_job_partition_step_and_reason(omnisage_env, tmp_path, monkeypatch):
    from assets.ingest import engagement_logs

    (tmp_path / "data").mkdir()
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(tmp_path / "data"))
    storage = StorageResource.from_settings(Settings.from_env())
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [engagement_logs],
            partition_key="2026-03-02",
            instance=instance,
            resources={"storage": storage},
            raise_on_error=False,
        )
        assert not result.success
        context = _failure_context(instance, result.run_id)
        summary = sensors.failure_summary(context.dagster_run, context.failure_event, context.get_step_failure_events())
        job = result.dagster_run.job_name  # dg.materialize's job
        assert summary.startswith(f"run {result.run_id} of job {job} failed: partition 2026-03-02;")
        assert "failed step(s) engagement_logs;" in summary
        missing = tmp_path / "data" / "engagement_logs" / "dt=2026-03-02"
        assert f"error: engagement_logs dt=2026-03-02: the input folder {missing} does not exist" in summary
        assert "\n" not in summary


def test_an_exception_is_reported_by_its_own_first_line_and_the_sensor_logs_it(capfd):
    @dg.op
    def explode():
        raise ValueError("feature store dt=2026-03-03 is corrupt\nsecond line with details")

    @dg.job(
        tags={"dagster/asset_partition_range_start": "2026-03-01", "dagster/asset_partition_range_end": "2026-03-03"}
    )
    def range_job():
        explode()

    with dg.instance_for_test() as instance:
        result = range_job.execute_in_process(instance=instance, raise_on_error=False)
        context = _failure_context(instance, result.run_id)
        capfd.readouterr()
        sensors.omnisage_run_failure_sensor(context)
        logged = capfd.readouterr().err  # the sensor's log (Dagster's console handler)
    expected = (
        f"run {result.run_id} of job range_job failed: partition 2026-03-01...2026-03-03; failed step(s) explode; "
        "error: ValueError: feature store dt=2026-03-03 is corrupt"
    )
    assert f"ERROR - {expected}" in logged
    assert "second line" not in logged
