"""The two entry points of a whole-home retention pass: `omnisage retention [--apply]` (a dry run by default)
and `retention_job` (Dagster, daily schedule). Both keep leased days and the days an unfinished run reads,
and never delete outside OMNISAGE_HOME: a day that links elsewhere loses its link only."""

from __future__ import annotations

import os
import uuid
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from omnisage_pipeline.cli import main as omnisage
from omnisage_pipeline.settings import Settings, prepare_dagster_home
from omnisage_pipeline.storage.publish import list_published, partition_link, publish_partition
from omnisage_pipeline.storage.retention import acquire_lease, release_lease

TEN = [(date(2026, 1, 1) + timedelta(days=i)).isoformat() for i in range(10)]


@pytest.fixture
def home(omnisage_env, monkeypatch, tmp_path) -> dict:
    """graph/ with days 1..9 published (2000 bytes each) and day 0 a link to a backup outside the home;
    features/ with days 0..9. Retention 3: days 0..6 have expired."""
    monkeypatch.setenv("OMNISAGE_WINDOW_DAYS", "3")
    monkeypatch.setenv("OMNISAGE_RETENTION_DAYS", "3")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    settings = Settings.from_env()
    for folder, keys in ((settings.graph_dir, TEN[1:]), (settings.features_dir, TEN)):
        for key in keys:
            with publish_partition(folder, key) as staging:
                (staging / "data.bin").write_bytes(b"x" * 2000)
    backup = tmp_path / "backup" / "graph-restored"
    backup.mkdir(parents=True)
    (backup / "data.bin").write_bytes(b"b" * 100)
    partition_link(settings.graph_dir, TEN[0]).symlink_to(backup, target_is_directory=True)
    return {"settings": settings, "backup": backup}


def _running_run(instance: dg.DagsterInstance, partition: str) -> str:
    run_id = str(uuid.uuid4())
    instance.add_run(
        dg.DagsterRun(
            job_name="daily_pipeline",
            run_id=run_id,
            status=dg.DagsterRunStatus.STARTED,
            tags={"dagster/partition": partition},
        )
    )
    return run_id


def test_cli_dry_run_prints_what_and_why_and_removes_nothing(home):
    settings = home["settings"]
    lease = acquire_lease(settings.features_dir, TEN[1])
    with dg.DagsterInstance.from_config(str(prepare_dagster_home(settings.dagster_home))) as instance:
        run_id = _running_run(instance, TEN[2])
    try:
        result = CliRunner().invoke(omnisage, ["retention"], catch_exceptions=False)
    finally:
        release_lease(lease)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "OMNISAGE_RETENTION_DAYS=3" in out and "dry run" in out and "--apply" in out
    assert (
        f"would remove dt={TEN[3]}: older than retention_days=3 (cutoff {TEN[6]}, newest {TEN[9]}) [2,000 bytes]" in out
    )
    assert f"kept dt={TEN[1]}: leased by pid {os.getpid()}" in out
    assert f"kept dt={TEN[2]}: read by running job {run_id[:8]}" in out
    assert f"target {home['backup']} is outside the home, kept" in out
    # Nothing was removed.
    assert list_published(settings.graph_dir) == TEN and list_published(settings.features_dir) == TEN


def test_cli_apply_removes_expired_days_and_keeps_a_link_target_outside_the_home(home):
    settings, backup = home["settings"], home["backup"]
    result = CliRunner().invoke(omnisage, ["retention", "--apply"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"removed dt={TEN[0]}" in result.output and "would remove" not in result.output
    assert list_published(settings.graph_dir) == TEN[7:] and list_published(settings.features_dir) == TEN[7:]
    assert not partition_link(settings.graph_dir, TEN[0]).is_symlink()
    assert (backup / "data.bin").read_bytes() == b"b" * 100  # the link's target survives
    # Idempotent: a second pass has nothing left to remove.
    again = CliRunner().invoke(omnisage, ["retention", "--apply", "--json"], catch_exceptions=False)
    assert again.exit_code == 0 and '"removed": []' in again.output


def test_cli_names_a_bad_retention_setting(omnisage_env, monkeypatch):
    monkeypatch.setenv("OMNISAGE_RETENTION_DAYS", "a week")
    result = CliRunner().invoke(omnisage, ["retention"])
    assert result.exit_code == 1 and "OMNISAGE_RETENTION_DAYS='a week'" in result.output


def test_cli_apply_with_a_subprocess_and_omnisage_home(home, tmp_path):
    """The installed console script's path: `python -m omnisage_pipeline.cli retention --apply` with
    OMNISAGE_HOME set in a fresh process."""
    import subprocess
    import sys

    settings, backup = home["settings"], home["backup"]
    env = dict(os.environ, OMNISAGE_HOME=str(settings.home), OMNISAGE_WINDOW_DAYS="3", OMNISAGE_RETENTION_DAYS="3")
    env.pop("DAGSTER_HOME", None)
    proc = subprocess.run(
        [sys.executable, "-m", "omnisage_pipeline.cli", "retention", "--apply"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list_published(settings.graph_dir) == TEN[7:]
    assert (backup / "data.bin").read_bytes() == b"b" * 100


def test_retention_job_removes_notes_each_removed_partition_and_keeps_running_days(home, tmp_path):
    from omnisage_pipeline.resources import StorageResource
    from omnisage_pipeline.retention_job import retention_job

    settings, backup = home["settings"], home["backup"]
    with dg.DagsterInstance.from_config(str(prepare_dagster_home(tmp_path / "dagster"))) as instance:
        run_id = _running_run(instance, TEN[5])
        result = retention_job.execute_in_process(
            resources={"storage": StorageResource.from_settings(settings)}, instance=instance
        )
        assert result.success
        observed = {
            (o.asset_key.to_user_string(), o.partition): o.metadata
            for o in result.asset_observations_for_node("apply_retention_pass")
        }
        removed = [k for k in TEN[:7] if k != TEN[5]]
        assert set(observed) == {(a, k) for a in ("graph_snapshot", "feature_store") for k in removed}
        assert all(m["removed_by_retention"].value is True for m in observed.values())
        assert observed[("feature_store", TEN[0])]["retention_bytes_freed"].value == 2000
        assert "outside the home" in observed[("graph_snapshot", TEN[0])]["retention_reason"].value
        # The instance keeps the notes: the latest event of a removed partition says it was removed.
        records = instance.fetch_observations(dg.AssetKey("graph_snapshot"), limit=20).records
        assert {r.partition_key for r in records} == set(removed)

    (output,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    meta = output.step_output_data.metadata
    assert meta["retention_removed"].value == {
        "graph": removed,
        "features": removed,
        "embeddings": [],
        "user_embeddings": [],
        "indexes": [],
    }
    assert meta["retention_kept"].value == {
        "graph": {TEN[5]: f"read by running job {run_id[:8]}"},
        "features": {TEN[5]: f"read by running job {run_id[:8]}"},
    }
    assert meta["retention_targets_kept_outside"].value == {"graph": {TEN[0]: str(backup)}}
    assert list_published(settings.graph_dir) == [TEN[5], *TEN[7:]]
    assert (backup / "data.bin").read_bytes() == b"b" * 100


def test_retention_job_fails_when_a_day_cannot_be_removed(home, tmp_path):
    """A real directory where a ``dt=`` link belongs is left alone, and the run fails saying so."""
    from omnisage_pipeline.resources import StorageResource
    from omnisage_pipeline.retention_job import retention_job

    settings = home["settings"]
    partition_link(settings.features_dir, TEN[0]).unlink()
    partition_link(settings.features_dir, TEN[0]).mkdir()
    result = retention_job.execute_in_process(
        resources={"storage": StorageResource.from_settings(settings)}, raise_on_error=False
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "is a real directory, not a published symlink" in failure.step_failure_data.error.message
    assert Path(partition_link(settings.features_dir, TEN[0])).is_dir()
    assert list_published(settings.graph_dir) == TEN[7:]  # the rest was removed
