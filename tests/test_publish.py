"""Atomic publishing: readers see the old partition or the new one, never half of one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from omnisage_pipeline.storage.publish import (
    PUBLISH_PHASES,
    PublishError,
    list_published,
    partition_link,
    publish_partition,
    published_path,
    remove_partition,
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
