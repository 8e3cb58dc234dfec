"""``entity_metadata`` stored once per change: days with the same catalogue share one published version
(``omnisage_pipeline.storage.shared_versions``), a changed catalogue gets a new one, and retention deletes a shared
version only with the last ``dt=`` link to it."""

from __future__ import annotations

import os
from datetime import date, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_ingest import DAY, board_table, materialization_metadata, pin_table, run_assets

from assets.daily import BlockingCheckFailed
from assets.ingest import entity_metadata
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import (
    PREVIOUS_DIR,
    published_path,
    remove_partition,
    require_published,
)
from omnisage_pipeline.storage.retention import apply_retention
from omnisage_pipeline.storage.shared_versions import (
    DIGEST_FILE,
    _record_previous,
    files_digest,
    publish_shared,
)

DAYS = [(date.fromisoformat(DAY) + timedelta(days=i)).isoformat() for i in range(3)]


@pytest.fixture
def catalogue(omnisage_env, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    (root / "pins").mkdir(parents=True)
    (root / "boards").mkdir()
    pq.write_table(pin_table([1, 2, 2]), root / "pins" / "p0.parquet")  # one duplicate: quarantined
    pq.write_table(board_table([10, 11]), root / "boards" / "b0.parquet")
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(root))
    return root


def _files(dataset: Path) -> dict[str, tuple[int, int]]:
    """Every file under a dataset's versions: path -> (inode, mtime), to see whether anything was written."""
    return {
        str(p.relative_to(dataset)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in (dataset / ".versions").rglob("*")
        if p.is_file()
    }


def _pin_ids(dataset: Path, day: str) -> list[int]:
    return sorted(pq.read_table(require_published(dataset, day) / "pins").column("pin_id").to_pylist())


def _materialize(day: str) -> tuple[dict, list]:
    result = run_assets([entity_metadata], partition_key=day)
    return materialization_metadata(result, "entity_metadata"), [
        c for c in result.get_asset_check_evaluations() if c.check_name == "rows_accounted"
    ]


def test_identical_days_share_one_version_a_change_gets_a_new_one_retention_follows_the_links(catalogue):
    settings = Settings.from_env()
    valid_ds = settings.warehouse_dataset("entity_metadata")
    quarantine_ds = settings.quarantine_dataset("entity_metadata")

    first, _ = _materialize(DAYS[0])
    assert first["reused_version"] is False and first["bytes_written"] > 0
    assert first["dagster/row_count"] == 4  # pins 1, 2 and boards 10, 11
    on_disk = {ds: _files(ds) for ds in (valid_ds, quarantine_ds)}

    second, (check,) = _materialize(DAYS[1])
    assert second["reused_version"] is True and second["quarantine_reused_version"] is True
    assert second["bytes_written"] == 0 and second["dagster/row_count"] == 4
    assert second["version"] == first["version"] and second["content_digest"] == first["content_digest"]
    # The day's check ran again, on the shared version.
    assert check.passed and check.metadata["rows_published"].value == 5
    for ds in (valid_ds, quarantine_ds):
        assert _files(ds) == on_disk[ds]  # one set of files; nothing written or rewritten on day 2
        assert published_path(ds, DAYS[0]) == published_path(ds, DAYS[1])
        assert os.readlink(ds / f"dt={DAYS[1]}").startswith(".versions/")

    pq.write_table(pin_table([1, 2, 3]), catalogue / "pins" / "p0.parquet")  # the catalogue changes
    third, (check3,) = _materialize(DAYS[2])
    assert third["reused_version"] is False and third["bytes_written"] > 0 and check3.passed
    assert third["version"] != first["version"] and third["content_digest"] != first["content_digest"]
    assert third["dagster/row_count"] == 5
    assert [_pin_ids(valid_ds, d) for d in DAYS] == [[1, 2], [1, 2], [1, 2, 3]]
    shared = published_path(valid_ds, DAYS[0])

    # Retention of day 1 while day 2 still links to the shared version: the version stays.
    report = apply_retention(valid_ds, retention_days=1, window_days=1, protected={DAYS[1]: "test"})
    assert report.removed == [DAYS[0]] and report.bytes_freed == 0
    assert published_path(valid_ds, DAYS[0]) is None and shared.is_dir()
    assert _pin_ids(valid_ds, DAYS[1]) == [1, 2]
    # Day 2 goes too: no link remains, the version is deleted; day 3 is untouched.
    report = apply_retention(valid_ds, retention_days=1, window_days=1)
    assert report.removed == [DAYS[1]] and report.bytes_freed > 0
    assert not shared.exists()
    assert [p.name for p in (valid_ds / ".versions").iterdir()] == [third["version"]]
    assert _pin_ids(valid_ds, DAYS[2]) == [1, 2, 3]


def _writer(ids: list[int]):
    def build(staging: Path) -> None:
        (staging / "pins").mkdir()
        pq.write_table(pin_table(ids), staging / "pins" / "part-0.parquet")

    return build


def test_republishing_the_day_a_shared_version_is_named_after_keeps_it_for_the_other_day(tmp_path):
    """Day 1 built version A, day 2 links to it; day 1 is then re-published twice with other content.
    A stops being day 1's previous version but day 2 still links to it, so no cleanup may delete it."""
    ds = tmp_path / "dataset"
    a = publish_shared(ds, DAYS[0], "A", _writer([1]))
    assert publish_shared(ds, DAYS[1], "A", _writer([1])).reused
    publish_shared(ds, DAYS[0], "B", _writer([2]))
    assert (ds / PREVIOUS_DIR / f"dt={DAYS[0]}").resolve() == a.version
    c = publish_shared(ds, DAYS[0], "C", _writer([3]))
    assert a.version.is_dir() and require_published(ds, DAYS[1]) == a.version
    assert _pin_ids(ds, DAYS[1]) == [1] and _pin_ids(ds, DAYS[0]) == [3]
    # A's content digest sits in the version as a dot-file (readers list *.parquet only).
    assert (a.version / DIGEST_FILE).read_text() == "A"
    # B was day 1's previous (kept for its readers); C is visible; A is day 2's: nothing else is left.
    assert len(list((ds / ".versions").iterdir())) == 3 and c.version.is_dir()
    # Day 2 moves on: A is now only its previous version, and goes with the next swap of day 2.
    publish_shared(ds, DAYS[1], "C", _writer([3]))
    assert a.version.is_dir()
    publish_shared(ds, DAYS[1], "D", _writer([4]))
    assert not a.version.exists() and _pin_ids(ds, DAYS[1]) == [4]


def test_a_failed_check_on_a_reused_version_leaves_the_day_as_it_was(tmp_path):
    ds = tmp_path / "dataset"
    a = publish_shared(ds, DAYS[0], "A", _writer([1]))
    b = publish_shared(ds, DAYS[1], "B", _writer([2]))
    seen = []

    def refuse(version: Path) -> None:
        seen.append(version)
        raise BlockingCheckFailed(DAYS[1], [])

    with pytest.raises(BlockingCheckFailed):
        publish_shared(ds, DAYS[1], "A", _writer([1]), validate=refuse)
    assert seen == [a.version]  # the checks ran on the version the day was about to show
    assert require_published(ds, DAYS[1]) == b.version


def test_reuse_disabled_writes_a_fresh_copy(tmp_path):
    ds = tmp_path / "dataset"
    a = publish_shared(ds, DAYS[0], "A", _writer([1]))
    fresh = publish_shared(ds, DAYS[1], "A", _writer([1]), reuse=False)
    assert not fresh.reused and fresh.bytes_written > 0 and fresh.version != a.version
    assert _pin_ids(ds, DAYS[1]) == [1]


def test_content_digest_follows_bytes_names_and_code_version(tmp_path):
    pins = tmp_path / "pins"
    pins.mkdir()
    pq.write_table(pin_table([1, 2]), pins / "p0.parquet")
    files = {"pins": [pins / "p0.parquet"], "boards": []}
    digest = files_digest(tmp_path, files, salt=["v1"])
    assert digest == files_digest(tmp_path, files, salt=["v1"])  # deterministic
    assert digest != files_digest(tmp_path, files, salt=["v2"])  # validation code changed
    assert digest != files_digest(tmp_path, {"pins": [], "boards": [pins / "p0.parquet"]}, salt=["v1"])
    (pins / "p0.parquet").rename(pins / "p1.parquet")  # file order decides which duplicate is kept
    assert digest != files_digest(tmp_path, {"pins": [pins / "p1.parquet"], "boards": []}, salt=["v1"])
    pq.write_table(pin_table([1, 3]), pins / "p0.parquet")
    assert digest != files_digest(tmp_path, {"pins": [pins / "p0.parquet"], "boards": []}, salt=["v1"])


def test_remove_partition_deletes_a_shared_version_with_its_last_link(tmp_path):
    ds = tmp_path / "dataset"
    a = publish_shared(ds, DAYS[0], "A", _writer([1]))
    publish_shared(ds, DAYS[1], "A", _writer([1]))
    assert remove_partition(ds, DAYS[0])
    assert a.version.is_dir() and _pin_ids(ds, DAYS[1]) == [1]
    assert remove_partition(ds, DAYS[1])
    assert not a.version.exists() and list((ds / ".versions").iterdir()) == []


def test_a_writer_killed_after_recording_the_previous_version_leaves_one_previous(tmp_path):
    """A writer records ``.previous/dt=D`` before its swap; killed then, the record already names the
    version still visible. The next publish keeps exactly that one as previous and deletes the older."""
    ds = tmp_path / "dataset"
    a = publish_shared(ds, DAYS[0], "A", _writer([1]))
    b = publish_shared(ds, DAYS[0], "B", _writer([2]))
    _record_previous(ds, DAYS[0])  # what the killed writer did before dying
    c = publish_shared(ds, DAYS[0], "C", _writer([3]))
    assert set((ds / ".versions").iterdir()) == {b.version, c.version} and not a.version.exists()


_LINK_KILLED = """
import sys
from pathlib import Path
from omnisage_pipeline.storage.shared_versions import publish_shared
publish_shared(Path(sys.argv[1]), sys.argv[2], "A", lambda staging: None)
"""


def test_a_writer_killed_right_after_linking_a_shared_version_leaves_a_consistent_dataset(tmp_path):
    import signal
    import subprocess
    import sys

    ds = tmp_path / "dataset"
    a = publish_shared(ds, DAYS[0], "A", _writer([1]))
    b = publish_shared(ds, DAYS[1], "B", _writer([2]))
    env = {**os.environ, "OMNISAGE_FAULT_PHASE": "swapped"}
    child = subprocess.run([sys.executable, "-c", _LINK_KILLED, str(ds), DAYS[1]], env=env, check=False)
    assert child.returncode == -signal.SIGKILL
    assert require_published(ds, DAYS[1]) == a.version and _pin_ids(ds, DAYS[1]) == [1]
    assert b.version.is_dir()  # the version visible before the swap, kept for its readers
    # The next publish of day 2 finds the dataset consistent: B goes, A stays for day 1.
    c = publish_shared(ds, DAYS[1], "C", _writer([3]))
    assert set((ds / ".versions").iterdir()) == {a.version, c.version}
    assert _pin_ids(ds, DAYS[0]) == [1] and _pin_ids(ds, DAYS[1]) == [3]
