"""Retention of the heavy per-day outputs (OMNISAGE_RETENTION_DAYS, omnisage_pipeline.storage.retention): the policy,
reader leases (live, stale, taken during a removal), running-run protection, and the assets' hook."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from click.testing import CliRunner

from omnisage_pipeline.cli import main as omnisage
from omnisage_pipeline.settings import Settings, SettingsError
from omnisage_pipeline.storage import retention
from omnisage_pipeline.storage.publish import (
    list_published,
    partition_link,
    publish_partition,
    require_published,
)
from omnisage_pipeline.storage.retention import (
    acquire_lease,
    apply_retention,
    expired_partitions,
    live_leases,
    plan_retention,
    read_lease,
    release_lease,
)
from omnisage_pipeline.storage.retention_home import run_partitions


def days(n: int, start: str = "2026-01-01") -> list[str]:
    first = date.fromisoformat(start)
    return [(first + timedelta(days=i)).isoformat() for i in range(n)]


TEN = days(10)


# ---------------------------------------------------------------------------------------------- policy
def test_policy_keeps_the_newest_retention_days():
    # 10 days published, retention 3: the dataset keeps (newest - 3, newest] = the last three days.
    assert expired_partitions(TEN, retention_days=3, window_days=3) == TEN[:7]
    assert expired_partitions(TEN, retention_days=10, window_days=3) == []
    assert expired_partitions(TEN, retention_days=9, window_days=3) == TEN[:1]  # the boundary day
    # Calendar days, not a count of partitions: with gaps, fewer than 3 partitions may remain.
    gappy = [TEN[0], TEN[5], TEN[8], TEN[9]]
    assert expired_partitions(gappy, 3, 3) == [TEN[0], TEN[5]]
    # A newer partition elsewhere (newest=) moves the cutoff; protected keys and non-dates never expire.
    assert expired_partitions(TEN[:5], 3, 3, newest=TEN[9]) == TEN[:5]
    assert expired_partitions(TEN + ["not-a-day"], 3, 3, protected={TEN[2]}) == TEN[:2] + TEN[3:7]
    assert expired_partitions([], 3, 3) == []
    plan = plan_retention({"graph": TEN, "features": TEN[:8]}, 3, 2, protected={"graph": {TEN[0]}})
    assert plan == {"graph": TEN[1:7], "features": TEN[:5]}


def test_invalid_retention_is_an_error_naming_the_variable():
    with pytest.raises(SettingsError, match=r"OMNISAGE_RETENTION_DAYS=2 is less than OMNISAGE_WINDOW_DAYS=3"):
        expired_partitions(TEN, retention_days=2, window_days=3)
    with pytest.raises(SettingsError, match="OMNISAGE_RETENTION_DAYS"):
        apply_retention(Path("/nonexistent"), 1, 30)
    with pytest.raises(SettingsError, match=r"OMNISAGE_RETENTION_DAYS=29 is less than OMNISAGE_WINDOW_DAYS=30"):
        Settings.from_env({"OMNISAGE_RETENTION_DAYS": "29"})
    with pytest.raises(SettingsError, match=r"OMNISAGE_RETENTION_DAYS='a week' is not an integer"):
        Settings.from_env({"OMNISAGE_RETENTION_DAYS": "a week"})
    # The default is the window; an explicit value at least the window is taken as is.
    assert Settings.from_env({}).retention_days == 30
    assert Settings.from_env({"OMNISAGE_WINDOW_DAYS": "7"}).retention_days == 7
    assert Settings.from_env({"OMNISAGE_WINDOW_DAYS": "7", "OMNISAGE_RETENTION_DAYS": "45"}).retention_days == 45


def test_storage_resource_settings_read_the_retention_variable(omnisage_env, monkeypatch):
    """StorageResource builds Settings field by field: the retention still comes from the environment."""
    from omnisage_pipeline.resources import StorageResource

    monkeypatch.setenv("OMNISAGE_WINDOW_DAYS", "4")
    monkeypatch.setenv("OMNISAGE_RETENTION_DAYS", "9")
    assert StorageResource.from_settings(Settings.from_env()).settings.retention_days == 9
    monkeypatch.delenv("OMNISAGE_RETENTION_DAYS")
    assert StorageResource.from_settings(Settings.from_env()).settings.retention_days == 4


def test_partitions_of_running_runs():
    assert run_partitions({"dagster/partition": TEN[3]}) == {TEN[3]}
    tags = {"dagster/asset_partition_range_start": TEN[1], "dagster/asset_partition_range_end": TEN[4]}
    assert run_partitions(tags) == set(TEN[1:5])
    config = {"ops": {"omnisage_model": {"config": {"training_partition": TEN[2], "steps": 3}}}}
    assert run_partitions({}, config, newest_training=TEN[9]) == {TEN[2]}
    assert run_partitions({}, {"ops": {"omnisage_model": {"config": {}}}}, newest_training=TEN[9]) == {TEN[9]}


# ------------------------------------------------------------------------------------ one dataset on disk
def publish_days(dataset: Path, keys: list[str], size: int = 1000) -> None:
    for key in keys:
        with publish_partition(dataset, key) as staging:
            (staging / "data.bin").write_bytes(b"x" * size)
            (staging / "sub").mkdir()
            (staging / "sub" / "more.bin").write_bytes(b"y" * size)


def versions_of(dataset: Path, key: str) -> list[Path]:
    return sorted((dataset / ".versions").glob(f"dt={key}.*"))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_apply_retention_removes_links_versions_and_orphans(tmp_path):
    ds = tmp_path / "graph"
    publish_days(ds, TEN)
    publish_days(ds, [TEN[0]])  # re-published: day 0 also has one kept previous version
    assert len(versions_of(ds, TEN[0])) == 2
    # Orphans of an expired day: a version without a dt= link, a dead writer's staging.
    orphan = ds / ".versions" / f"dt={TEN[1]}.{dead_pid()}.orphan"
    orphan.mkdir()
    (orphan / "f").write_bytes(b"z" * 10)
    partition_link(ds, TEN[1]).unlink()
    dead_staging = ds / ".staging" / f"dt={TEN[2]}.{dead_pid()}.deadwriter"
    dead_staging.mkdir()
    (dead_staging / "f").write_bytes(b"w" * 5)
    # A live writer's staging of an expired day is not touched.
    live_staging = ds / ".staging" / f"dt={TEN[3]}.{os.getpid()}.livewriter"
    live_staging.mkdir()

    dry = apply_retention(ds, 3, 3, dry_run=True)
    assert dry.removed == [TEN[0]] + TEN[2:7] and dry.orphans_removed == [TEN[1]]
    assert list_published(ds) == [k for k in TEN if k != TEN[1]]  # nothing removed by a dry run

    report = apply_retention(ds, 3, 3)
    assert (report.newest, report.cutoff) == (TEN[9], TEN[6])
    assert report.removed == [TEN[0]] + TEN[2:7]
    assert report.orphans_removed == [TEN[1]]
    # Bytes: 2000 per version (day 0: two; day 1: its unlinked one), the orphan (10), the dead staging (5).
    assert report.bytes_freed == dry.bytes_freed == 2000 * 8 + 10 + 5
    assert report.kept == {} and report.errors == []
    assert list_published(ds) == TEN[7:]
    for key in TEN[:7]:
        assert not partition_link(ds, key).is_symlink() and versions_of(ds, key) == [], key
    assert live_staging.is_dir() and not orphan.exists() and not dead_staging.exists()
    assert not list((ds / ".staging").glob("retired.*"))
    for key in TEN[7:]:
        assert (require_published(ds, key) / "sub" / "more.bin").read_bytes() == b"y" * 1000
    # Idempotent: a second pass finds nothing.
    again = apply_retention(ds, 3, 3)
    assert again.removed == [] and again.orphans_removed == [] and again.bytes_freed == 0


def test_leased_partition_survives_and_is_removed_after_release(tmp_path):
    ds = tmp_path / "features"
    publish_days(ds, TEN[:6])
    lease = acquire_lease(ds, TEN[1])
    report = apply_retention(ds, 3, 3, protected={TEN[0]: "read by running job abc"})
    assert report.removed == [TEN[2]]
    assert report.kept == {TEN[0]: "read by running job abc", TEN[1]: f"leased by pid {os.getpid()}"}
    assert list_published(ds) == [TEN[0], TEN[1]] + TEN[3:6]
    assert (require_published(ds, TEN[1]) / "data.bin").is_file()
    release_lease(lease)
    report = apply_retention(ds, 3, 3)
    assert report.removed == TEN[:2] and list_published(ds) == TEN[3:6]


def test_read_lease_holds_for_the_block_only(tmp_path):
    ds = tmp_path / "graph"
    publish_days(ds, TEN[:5])
    with read_lease(ds, TEN[0]) as path:
        assert path == require_published(ds, TEN[0])
        leases, _ = live_leases(ds)
        assert list(leases) == [TEN[0]]
        assert apply_retention(ds, 3, 3).removed == [TEN[1]]  # day 0 is being read
        assert (path / "data.bin").read_bytes() == b"x" * 1000
    assert live_leases(ds)[0] == {}
    assert apply_retention(ds, 3, 3).removed == [TEN[0]]
    with pytest.raises(FileNotFoundError, match="has not been published"), read_lease(ds, TEN[0]):
        pass
    assert not list((ds / ".leases").glob("dt=*"))  # a failed read leaves no lease behind


def test_stale_leases_do_not_block(tmp_path):
    ds = tmp_path / "graph"
    publish_days(ds, TEN[:5])
    leases = ds / ".leases"
    leases.mkdir()
    # A reader that was killed: its pid is gone.
    pid = dead_pid()
    (leases / f"dt={TEN[0]}.{pid}.dead").write_text(
        f'{{"partition": "{TEN[0]}", "pid": {pid}, "host": "{socket.gethostname()}"}}'
    )
    # A reused pid: this process's pid, but another process start time.
    own = os.getpid()
    (leases / f"dt={TEN[1]}.{own}.reused").write_text(
        f'{{"partition": "{TEN[1]}", "pid": {own}, "host": "{socket.gethostname()}", "start": "1"}}'
    )
    report = apply_retention(ds, 3, 3)
    assert report.removed == TEN[:2] and report.kept == {}
    assert report.stale_leases_removed == 2
    assert not list(leases.glob("dt=*"))


@pytest.mark.parametrize("key", ["../../x", "x/../../../outside", "2026-01-05/../../etc", ""])
def test_a_lease_key_that_is_not_a_plain_name_writes_nothing(tmp_path, key):
    """The key becomes a file name under .leases: one that is not a plain name is refused before any write,
    even where the path it builds would exist (``dt=x/..`` leads out of the dataset)."""
    ds = tmp_path / "home" / "graph"
    publish_days(ds, TEN[:1])
    (ds / ".leases" / "dt=x").mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="not a plain name"):
        acquire_lease(ds, key)
    with pytest.raises(ValueError, match="not a plain name"), read_lease(ds, key):
        pass
    assert sorted(tmp_path.rglob("*")) == before


def test_retention_honours_a_version_bound_lease_by_day(tmp_path):
    """One lease implementation: retention's read_lease records the version it resolved (so a re-publish
    keeps it), and retention keeps the leased day whichever version the lease names."""
    ds = tmp_path / "graph"
    publish_days(ds, TEN[:5])
    with read_lease(ds, TEN[0]) as held:
        (lease,) = live_leases(ds)[0][TEN[0]]
        assert lease.version == held.name
        publish_days(ds, [TEN[0]], size=10)
        publish_days(ds, [TEN[0]], size=20)
        assert (held / "data.bin").read_bytes() == b"x" * 1000  # not collected by the publishes
        assert apply_retention(ds, 3, 3).removed == [TEN[1]]
        assert held.is_dir()
    assert apply_retention(ds, 3, 3).removed == [TEN[0]] and not held.exists()


def test_lease_taken_during_removal_keeps_the_version(tmp_path, monkeypatch):
    """Protocol: reader leases, then resolves; retention unlinks, then checks leases again. A reader that
    resolved the link just before the unlink holds a lease by then, so its version directory stays."""
    ds = tmp_path / "graph"
    publish_days(ds, TEN[:5])
    version = require_published(ds, TEN[0])  # what that reader resolved
    real = retention.live_leases
    calls = []

    def racing(dataset_dir, remove_stale=True):
        calls.append(remove_stale)
        if len(calls) == 2:  # the re-check right after dt=TEN[0] was unlinked
            calls.append(acquire_lease(ds, TEN[0]))
        return real(dataset_dir, remove_stale)

    monkeypatch.setattr(retention, "live_leases", racing)
    report = apply_retention(ds, 3, 3)
    monkeypatch.setattr(retention, "live_leases", real)
    assert "version kept" in report.kept[TEN[0]]
    assert not partition_link(ds, TEN[0]).is_symlink()  # unpublished: new readers see no dt=TEN[0]
    assert (version / "data.bin").read_bytes() == b"x" * 1000  # the reader's version is intact
    assert TEN[1] in report.removed
    release_lease(calls[2])
    report = apply_retention(ds, 3, 3)
    assert report.orphans_removed == [TEN[0]] and not version.exists()


def test_in_flight_version_of_a_live_writer_is_left_alone(tmp_path):
    """Another live process renamed its build of an expired day into .versions and has not swapped the link
    yet: retention unpublishes the day but leaves that version to its writer."""
    ds = tmp_path / "graph"
    publish_days(ds, TEN[:5])
    writer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        in_flight = ds / ".versions" / f"dt={TEN[0]}.{writer.pid}.inflight"
        in_flight.mkdir()
        (in_flight / "f").write_bytes(b"n" * 3)
        report = apply_retention(ds, 3, 3)
        assert report.removed == TEN[:2] and report.bytes_freed == 2 * 2000
        assert in_flight.is_dir() and versions_of(ds, TEN[0]) == [in_flight]
    finally:
        writer.communicate(b"")  # the writer ends: its version is an orphan now
    report = apply_retention(ds, 3, 3)
    assert report.orphans_removed == [TEN[0]] and report.bytes_freed == 3 and not in_flight.exists()


def test_killed_retention_pass_leftovers_are_removed(tmp_path):
    ds = tmp_path / "graph"
    publish_days(ds, TEN[:2])
    retired = ds / ".staging" / f"retired.{dead_pid()}.abcd.dt={TEN[0]}.1.x"
    retired.mkdir(parents=True)
    (retired / "f").write_bytes(b"r" * 7)
    report = apply_retention(ds, 3, 3)
    assert report.bytes_freed == 7 and not retired.exists()
    assert list_published(ds) == TEN[:2]


# --------------------------------------------------------------------------------- through the assets
def _storage_assets():
    from assets.features import feature_store
    from assets.graph import daily_edges, pruned_edges
    from assets.ingest import engagement_logs, entity_metadata
    from assets.snapshot import graph_snapshot

    return [engagement_logs, entity_metadata, daily_edges, pruned_edges, graph_snapshot, feature_store]


def test_assets_apply_retention_after_publishing(tmp_path, omnisage_env, monkeypatch):
    from graph_engine.batch import NODE_TYPE_CODE
    from graph_engine.featurizer import Featurizer
    from graph_engine.snapshot import GraphSnapshot
    from omnisage_pipeline.resources import StorageResource, lazy_pyspark
    from omnisage_pipeline.tools.synthetic import generate

    five = days(5)
    data_root = tmp_path / "data"
    generate(data_root, start_date=five[0], days=5, scale="tiny", seed=0)
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(data_root))
    monkeypatch.setenv("OMNISAGE_WINDOW_DAYS", "2")
    monkeypatch.setenv("OMNISAGE_RETENTION_DAYS", "2")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    settings = Settings.from_env()
    assert settings.retention_days == 2
    resources = {"storage": StorageResource.from_settings(settings), "pyspark": lazy_pyspark(settings)}
    assets = _storage_assets()
    config = dg.RunConfig(
        {"graph_snapshot": {"config": {"blocks": ["pin_board:pin:4", "pin_board:board:4", "pin_pin:pin:4"]}}}
    )

    # A single-run backfill of days 0-3: its own range is read by its later steps, so nothing goes yet.
    result = dg.materialize(
        assets,
        resources=resources,
        run_config=config,
        tags={"dagster/asset_partition_range_start": five[0], "dagster/asset_partition_range_end": five[3]},
    )
    assert result.success
    assert list_published(settings.graph_dir) == five[:4] and list_published(settings.features_dir) == five[:4]
    meta = result.asset_materializations_for_node("graph_snapshot")[-1].metadata
    assert meta["retention_days"].value == 2 and meta["retention_removed"].value == {"graph": []}
    assert meta["retention_kept"].value == {"graph": {five[0]: "read by this run", five[1]: "read by this run"}}

    # Day 4 alone, while a reader (this test) holds a lease on graph day 2.
    lease = acquire_lease(settings.graph_dir, five[2])
    graph_bytes = sum(f.stat().st_size for f in require_published(settings.graph_dir, five[0]).rglob("*"))
    result = dg.materialize(assets, resources=resources, run_config=config, partition_key=five[4])
    assert result.success
    graph_meta = result.asset_materializations_for_node("graph_snapshot")[-1].metadata
    assert graph_meta["retention_removed"].value == {"graph": five[:2]}
    assert graph_meta["retention_kept"].value == {"graph": {five[2]: f"leased by pid {os.getpid()}"}}
    assert graph_meta["retention_bytes_freed"].value > graph_bytes > 0  # days 0 and 1
    # Each removed partition of the step's asset carries a note: its data is gone.
    notes = result.asset_observations_for_node("graph_snapshot")
    assert [(o.asset_key.to_user_string(), o.partition) for o in notes] == [("graph_snapshot", d) for d in five[:2]]
    assert all(o.metadata["removed_by_retention"].value is True for o in notes)
    feat_meta = result.asset_materializations_for_node("feature_store")[-1].metadata
    assert feat_meta["retention_removed"].value == {"features": five[:3]}
    assert feat_meta["retention_bytes_freed"].value > 0

    assert list_published(settings.graph_dir) == five[2:]
    assert list_published(settings.features_dir) == five[3:]
    for folder in (settings.graph_dir, settings.features_dir):
        assert not [v for v in (folder / ".versions").iterdir() if v.name.split(".")[0][3:] in five[:2]]
    # The small warehouse datasets (what a snapshot is re-built from) are all still there.
    for name in ("engagement_logs", "entity_metadata", "daily_edges", "pruned_edges"):
        assert list_published(settings.warehouse_dataset(name)) == five, name

    # The newest partition still reads: the snapshot maps, the feature store answers.
    with (
        read_lease(settings.graph_dir, five[4]) as graph_dir,
        read_lease(settings.features_dir, five[4]) as fdir,
    ):
        snapshot = GraphSnapshot.open(graph_dir)
        assert snapshot.num_nodes > 0
        pins = np.asarray(snapshot.node_id)[np.asarray(snapshot.node_type) == NODE_TYPE_CODE["pin"]][:5]
        with Featurizer(fdir) as featurizer:
            assert featurizer.fetch(NODE_TYPE_CODE["pin"], pins).present.all()
        del snapshot

    # The lease released, the next pass (here by hand, `omnisage retention --apply`) takes day 2.
    release_lease(lease)
    cli = CliRunner().invoke(omnisage, ["retention", "--apply"], catch_exceptions=False)
    assert cli.exit_code == 0 and f"removed dt={five[2]}" in cli.output, cli.output
    assert list_published(settings.graph_dir) == five[3:]


def test_backfill_older_than_the_horizon_is_refused_before_any_work(omnisage_env, monkeypatch):
    """Retention keeps (newest - retention, newest] of the published days: an older day would be published
    and deleted by the next pass, so the asset refuses it at launch, naming the cutoff and the variable."""
    from assets.snapshot import graph_snapshot
    from omnisage_pipeline.resources import StorageResource
    from omnisage_pipeline.storage.retention import ExpiredBackfillError, refuse_expired_days

    monkeypatch.setenv("OMNISAGE_WINDOW_DAYS", "3")
    monkeypatch.setenv("OMNISAGE_RETENTION_DAYS", "3")
    settings = Settings.from_env()
    publish_days(settings.graph_dir, TEN[5:])  # graph/ holds days 5..9: cutoff = day 6
    with pytest.raises(ExpiredBackfillError, match=rf"dt={TEN[6]} is at or before the retention cutoff {TEN[6]}"):
        refuse_expired_days(settings, ["graph"], [TEN[6], TEN[7]])
    refuse_expired_days(settings, ["graph"], [TEN[7]])  # inside the horizon: allowed
    refuse_expired_days(settings, ["features"], [TEN[0]])  # nothing published there yet: allowed

    result = dg.materialize(
        [graph_snapshot],
        partition_key=TEN[2],
        raise_on_error=False,
        resources={"storage": StorageResource.from_settings(settings)},
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.cause.message
    assert "ExpiredBackfillError" in failure.step_failure_data.error.cause.cls_name
    assert f"dt={TEN[2]}" in message and "OMNISAGE_RETENTION_DAYS=3" in message
    assert list_published(settings.graph_dir) == TEN[5:]  # nothing built, nothing removed
    assert not result.get_asset_materialization_events()


# ------------------------------------------------------------------------------ links that leave the home
def link_outside(dataset: Path, key: str, target: Path) -> None:
    """``dataset/dt=key`` -> ``target``: a day restored from a backup kept elsewhere."""
    target.mkdir(parents=True)
    (target / "data.bin").write_bytes(b"b" * 100)
    (target / "sub").mkdir()
    (target / "sub" / "more.bin").write_bytes(b"c" * 100)
    partition_link(dataset, key).symlink_to(target, target_is_directory=True)


def test_partition_linking_outside_the_home_loses_its_link_only(tmp_path):
    home = tmp_path / "home"
    ds = home / "graph"
    publish_days(ds, TEN[1:])
    backup = tmp_path / "backup" / f"graph-dt={TEN[0]}"
    link_outside(ds, TEN[0], backup)
    assert list_published(ds) == TEN

    dry = apply_retention(ds, 3, 3, dry_run=True)
    assert partition_link(ds, TEN[0]).is_symlink()  # a dry run removes nothing
    report = apply_retention(ds, 3, 3)
    # The link is gone, the backup and its files survive, untouched.
    assert not partition_link(ds, TEN[0]).is_symlink() and list_published(ds) == TEN[7:]
    assert (backup / "data.bin").read_bytes() == b"b" * 100
    assert (backup / "sub" / "more.bin").read_bytes() == b"c" * 100
    assert not list((ds / ".staging").glob("retired.*"))
    # The report says so; no byte of the backup is counted.
    for r in (dry, report):
        assert r.removed == TEN[:7] and r.errors == [], r
        assert r.targets_kept_outside == {TEN[0]: str(backup)}
        assert r.partition_bytes[TEN[0]] == 0 and r.bytes_freed == 6 * 2000  # the home's six versions


def test_previous_record_linking_outside_the_home_is_not_followed(tmp_path):
    """A ``.previous/dt=D`` record (datasets whose days share versions) that points outside the home: the
    record goes with its day, its target stays."""
    ds = tmp_path / "home" / "warehouse" / "entity_metadata"
    publish_days(ds, TEN[:5])
    outside = tmp_path / "elsewhere" / "old-version"
    outside.mkdir(parents=True)
    (outside / "f").write_bytes(b"o" * 9)
    (ds / ".previous").mkdir()
    (ds / ".previous" / f"dt={TEN[0]}").symlink_to(outside, target_is_directory=True)

    report = apply_retention(ds, 3, 3)
    assert not (ds / ".previous" / f"dt={TEN[0]}").is_symlink()
    assert (outside / "f").read_bytes() == b"o" * 9
    assert report.removed == TEN[:2] and report.targets_kept_outside == {TEN[0]: str(outside)}
