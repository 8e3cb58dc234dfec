"""Atomic publishing: readers see the old partition or the new one, never half of one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from omnisage_pipeline.storage.publish import (
    PUBLISH_PHASES,
    PublishError,
    check_partition_key,
    list_published,
    partition_link,
    publish_partition,
    published_path,
    remove_partition,
    require_published,
)

KEY = "2026-01-01"


def _write_version(dataset: Path, content: str, n_files: int = 3) -> None:
    with publish_partition(dataset, KEY) as staging:
        for i in range(n_files):
            (staging / f"part-{i}.txt").write_text(content)


def _read(dataset: Path) -> set[str]:
    path = published_path(dataset, KEY)
    assert path is not None
    return {p.read_text() for p in sorted(path.iterdir())}


def test_publish_makes_partition_visible_through_a_symlink(tmp_path):
    dataset = tmp_path / "ds"
    assert published_path(dataset, KEY) is None
    _write_version(dataset, "v1")
    assert partition_link(dataset, KEY).is_symlink()
    assert _read(dataset) == {"v1"}
    assert list_published(dataset) == [KEY]
    _write_version(dataset, "v2")
    assert _read(dataset) == {"v2"}
    # Staging leaves nothing behind and readers never list dot-directories.
    assert list(dataset.glob(".staging/dt=*")) == []
    assert sorted(p.name for p in dataset.glob("dt=*")) == [f"dt={KEY}"]


def test_old_versions_are_cleaned_up_after_the_swap(tmp_path):
    dataset = tmp_path / "ds"
    for i in range(5):
        _write_version(dataset, f"v{i}")
    versions = list((dataset / ".versions").glob(f"dt={KEY}.*"))
    # The current version plus one previous (for readers that opened it just before the swap).
    assert len(versions) == 2
    assert _read(dataset) == {"v4"}


def test_failed_build_keeps_previous_partition_and_removes_staging(tmp_path):
    dataset = tmp_path / "ds"
    _write_version(dataset, "v1")
    with pytest.raises(RuntimeError, match="boom"), publish_partition(dataset, KEY) as staging:
        (staging / "part-0.txt").write_text("half")
        raise RuntimeError("boom")
    assert _read(dataset) == {"v1"}
    assert list((dataset / ".staging").iterdir()) == []


def test_refuses_to_replace_a_real_directory(tmp_path):
    dataset = tmp_path / "ds"
    (dataset / f"dt={KEY}").mkdir(parents=True)
    with pytest.raises(PublishError, match="real directory"), publish_partition(dataset, KEY):
        pass


def test_remove_partition(tmp_path):
    dataset = tmp_path / "ds"
    _write_version(dataset, "v1")
    assert remove_partition(dataset, KEY)
    assert published_path(dataset, KEY) is None
    assert list((dataset / ".versions").iterdir()) == []


_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from omnisage_pipeline.storage.publish import publish_partition
    dataset, content = Path(sys.argv[1]), sys.argv[2]
    with publish_partition(dataset, "2026-01-01") as staging:
        for i in range(3):
            (staging / f"part-{i}.txt").write_text(content)
    print("published")
    """
)


def _run_child(dataset: Path, content: str, phase: str | None, fault_dataset: str | None = None):
    env = dict(os.environ)
    env.pop("OMNISAGE_FAULT_PHASE", None)
    env.pop("OMNISAGE_FAULT_DATASET", None)
    if phase:
        env["OMNISAGE_FAULT_PHASE"] = phase
    if fault_dataset:
        env["OMNISAGE_FAULT_DATASET"] = fault_dataset
    return subprocess.run(
        [sys.executable, "-c", _CHILD, str(dataset), content],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("phase", PUBLISH_PHASES)
def test_kill_at_each_publish_phase_leaves_a_whole_partition(tmp_path, phase):
    dataset = tmp_path / "ds"
    first = _run_child(dataset, "old", None)
    assert first.returncode == 0, first.stderr

    killed = _run_child(dataset, "new", phase)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)

    # Whatever is visible is one whole version: all three files of the old run, or all three of the new.
    visible = _read(dataset)
    expected = {"old"} if phase in ("begin", "staged", "versioned") else {"new"}
    assert visible == expected
    assert len(list(published_path(dataset, KEY).iterdir())) == 3

    # A re-run succeeds, cleans the dead writer's staging, and publishes the new content.
    rerun = _run_child(dataset, "again", None)
    assert rerun.returncode == 0, rerun.stderr
    assert _read(dataset) == {"again"}
    assert list(dataset.glob(".staging/dt=*")) == []


def test_fault_dataset_filter_spares_other_datasets(tmp_path):
    dataset = tmp_path / "ds"
    spared = _run_child(dataset, "x", "staged", fault_dataset="some_other_dataset")
    assert spared.returncode == 0, spared.stderr
    assert _read(dataset) == {"x"}


def test_every_staged_file_is_fsynced_before_the_rename_and_the_swap(tmp_path, monkeypatch):
    """After a power loss dt=D must not point at files whose data never reached the disk."""
    dataset = tmp_path / "ds"
    events: list[tuple] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, **kwargs):
        events.append(("rename", os.fspath(src), os.fspath(dst)))
        return real_rename(src, dst, **kwargs)

    def replace(src, dst, **kwargs):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    files = ["part-0.parquet", "_manifest.json", "pin/vectors.npy", "pin/ivf/index.faiss", "sub/.hidden"]
    with publish_partition(dataset, KEY) as staging:
        for rel in files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(rel.encode() * 100)
        (staging / "sub" / "link").symlink_to("../part-0.parquet")  # a link is not a file to sync
    real_staging = os.path.realpath(staging)
    version = published_path(dataset, KEY)

    kinds = [e[0] for e in events]
    rename_at = events.index(("rename", os.fspath(staging), os.fspath(dataset / ".versions" / version.name)))
    swap_at = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == os.fspath(dataset / f"dt={KEY}"))
    assert rename_at < swap_at, kinds
    synced = {e[1]: i for i, e in enumerate(events) if e[0] == "fsync"}
    for rel in files:
        path = os.path.join(real_staging, rel)
        assert path in synced, f"{rel} was never fsynced: {events}"
        assert synced[path] < rename_at, f"{rel} fsynced after the rename into .versions"
    for folder in ("", "pin", "pin/ivf", "sub"):  # and the folders holding their names, before the rename
        assert synced[os.path.normpath(os.path.join(real_staging, folder))] < rename_at, folder
    assert os.path.join(real_staging, "sub", "link") not in synced
    assert {p.name for p in version.rglob("*") if p.is_file()} >= {Path(f).name for f in files}


def test_a_file_that_cannot_be_synced_fails_the_publish_and_keeps_the_old_version(tmp_path, monkeypatch):
    dataset = tmp_path / "ds"
    _write_version(dataset, "old")

    def fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        _write_version(dataset, "new")
    monkeypatch.undo()
    assert _read(dataset) == {"old"}
    assert list(dataset.glob(".staging/dt=*")) == []


@pytest.mark.parametrize("key", ["2026-01-05/../../etc", "../etc", "", "2026-01-05 ", "a/b", "..", "x\n"])
def test_reads_and_writes_refuse_a_key_that_is_not_a_plain_name(tmp_path, key):
    dataset = tmp_path / "ds"
    with publish_partition(dataset, "2026-01-05") as staging:
        (staging / "part-0.txt").write_text("inside")
    (tmp_path / "etc").mkdir()  # what the traversing key would reach
    (dataset / "etc").mkdir()
    for call in (partition_link, published_path, require_published, remove_partition):
        with pytest.raises(ValueError, match=f"partition key {re.escape(repr(key))} is not a plain name"):
            call(dataset, key)
    with pytest.raises(ValueError, match="not a plain name"), publish_partition(dataset, key):
        pass
    assert list_published(dataset) == ["2026-01-05"]


def test_check_partition_key_returns_a_plain_key_and_names_a_bad_one():
    assert check_partition_key("2026-01-05") == "2026-01-05"
    assert check_partition_key("static_1") == "static_1"
    for bad in (None, 20260105, "2026-01-05/../../etc"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            check_partition_key(bad)


def test_list_published_skips_entries_that_are_not_partitions(tmp_path):
    dataset = tmp_path / "ds"
    _write_version(dataset, "v1")
    (dataset / f"dt={KEY}.bak").symlink_to(published_path(dataset, KEY))  # a copy made by hand
    assert list_published(dataset) == [KEY]
    assert all(published_path(dataset, key) is not None for key in list_published(dataset))
