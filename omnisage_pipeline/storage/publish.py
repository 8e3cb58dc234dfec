"""Atomic publishing of one partition of one dataset (contract: "Every output of a partition is published
atomically").

Layout of a dataset directory::

    <dataset>/dt=D                 -> symlink to .versions/dt=D.<pid>.<token>   (what readers list and open)
    <dataset>/.versions/dt=D.*     immutable published versions
    <dataset>/.staging/dt=D.*      work in progress; no reader lists dot-directories (Spark, DuckDB and
                                   our own globs skip them)
    <dataset>/.previous/dt=P       -> the version dt=P showed before its last swap (datasets whose days
                                   share versions, ``omnisage_pipeline.storage.shared_versions``)

A version may be the target of several ``dt=`` links (days with identical content share one version), so
no cleanup here deletes a version that a ``dt=`` link or a ``.previous`` record still points to, nor one a
live reader lease holds (``omnisage_pipeline.storage.leases``): such a version is removed later, by the next
cleanup or by retention, once the lease is gone.

Partition keys are plain names (``check_partition_key``) on every path that builds a file name from one,
reads included, so no key can name a file outside the dataset (``2026-01-05/../../etc``).

A writer builds into a staging directory, fsyncs every file and folder in it, renames it into ``.versions``
(same filesystem), then swaps the ``dt=D`` symlink with ``os.replace`` -- a single atomic rename(2). The
fsyncs come first so that after a power loss ``dt=D`` never points at files whose data never reached the
disk. A plain rename onto a non-empty directory is not atomic (and fails), which is why the visible name is
a symlink. A process killed at any moment leaves either the old symlink (old version intact) or the new one
(new version complete).

Fault injection for the kill tests: ``OMNISAGE_FAULT_PHASE=<phase>`` (optionally restricted by
``OMNISAGE_FAULT_DATASET=<dataset dir name>``, or ``quarantine/<name>`` for a
quarantine table) makes the process SIGKILL itself when it reaches that phase.
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from omnisage_pipeline.storage.leases import lease_holds
from omnisage_pipeline.storage.partition_paths import (  # noqa: F401 - the publish API names them too
    PARTITION_RE,
    PartitionKeyError,
    PublishError,
    check_partition_key,
    partition_link,
    pid_alive,
    published_path,
    require_published,
)

#: Publish phases, in order, at which the fault-injection hook can kill the process.
#: begin     - the staging directory exists and is empty (the build has not started)
#: staged    - the build finished in staging; nothing moved yet
#: versioned - the staging directory was renamed into .versions; the symlink still points to the old one
#: swapped   - the symlink points to the new version; old versions not yet cleaned up
PUBLISH_PHASES = ("begin", "staged", "versioned", "swapped")

FAULT_PHASE_ENV = "OMNISAGE_FAULT_PHASE"
FAULT_DATASET_ENV = "OMNISAGE_FAULT_DATASET"

_VERSIONS = ".versions"
_STAGING = ".staging"
PREVIOUS_DIR = ".previous"


def fault_point(phase: str, dataset: str | None = None) -> None:
    """SIGKILL this process when the fault-injection environment names this phase (and dataset)."""
    wanted = os.environ.get(FAULT_PHASE_ENV)
    if not wanted or wanted != phase:
        return
    wanted_dataset = os.environ.get(FAULT_DATASET_ENV)
    if wanted_dataset and dataset is not None and wanted_dataset != dataset:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def dataset_label(dataset_dir: Path) -> str:
    """The name the fault hook matches: the folder name, or ``quarantine/<name>`` for a quarantine table."""
    dataset_dir = Path(dataset_dir)
    if dataset_dir.parent.name == "quarantine":
        return f"quarantine/{dataset_dir.name}"
    return dataset_dir.name


def _remove_dead_staging(dataset_dir: Path, partition_key: str) -> None:
    """Staging left behind by a killed writer of this partition (its pid is in the name) is garbage, and so
    is a temporary ``link.<pid>.*`` of a writer killed between creating the new symlink and the swap."""
    staging_root = dataset_dir / _STAGING
    if not staging_root.is_dir():
        return
    for entry in [*staging_root.glob(f"dt={partition_key}.*"), *staging_root.glob("link.*")]:
        try:
            pid = int(entry.name.split(".")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not pid_alive(pid):
            _remove(entry)


def _live_writer(entry: Path) -> bool:
    """True when ``entry`` (``dt=D.<pid>.<token>``) belongs to another process that is still running."""
    try:
        pid = int(entry.name.split(".")[1])
    except (IndexError, ValueError):
        return False
    return pid != os.getpid() and pid_alive(pid)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def list_published(dataset_dir: Path) -> list[str]:
    """Partition keys with a published version, sorted. A ``dt=`` entry whose key is not a plain name (a
    ``dt=D.bak`` copy made by hand) is not a partition: publish never makes one, and no reader can open it."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        return []
    keys = [p.name[3:] for p in dataset_dir.glob("dt=*") if p.exists()]
    return sorted(k for k in keys if PARTITION_RE.fullmatch(k))


@contextmanager
def publish_partition(
    dataset_dir: Path,
    partition_key: str,
    keep_previous: int = 1,
    validate: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """Yield an empty staging directory; on normal exit publish it atomically as ``dt=<partition_key>``.

    ``validate(staging)`` runs on the finished staging directory before anything moves (the blocking asset
    checks, ``assets.checks``): when it raises, the staging is removed and the previous version stays
    published, exactly as when the build itself fails.
    On an exception the staging directory is removed and the previously published version stays.
    ``keep_previous`` older versions are kept after the swap so a reader that opened one just before the
    swap can finish; older ones are deleted.
    """
    check_partition_key(partition_key)
    dataset_dir = Path(dataset_dir)
    dataset = dataset_label(dataset_dir)
    (dataset_dir / _STAGING).mkdir(parents=True, exist_ok=True)
    (dataset_dir / _VERSIONS).mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(dataset_dir, partition_key)

    link = partition_link(dataset_dir, partition_key)
    if link.exists() and not link.is_symlink():
        raise PublishError(f"{link} is a real directory, not a published symlink: refusing to replace it")

    token = f"{os.getpid()}.{uuid.uuid4().hex[:12]}"
    staging = dataset_dir / _STAGING / f"dt={partition_key}.{token}"
    staging.mkdir()
    fault_point("begin", dataset)
    try:
        yield staging
        if validate is not None:
            validate(staging)
        _fsync_tree(staging)
    except BaseException:
        _remove(staging)
        raise
    fault_point("staged", dataset)

    version = dataset_dir / _VERSIONS / f"dt={partition_key}.{token}"
    os.rename(staging, version)
    _fsync_dir(version.parent)
    fault_point("versioned", dataset)

    # The version readers may hold open right now: the one kept by the cleanup below.
    previous = link.resolve() if link.is_symlink() and link.exists() else None
    tmp_link = dataset_dir / _STAGING / f"link.{token}"
    os.symlink(os.path.relpath(version, dataset_dir), tmp_link)
    os.replace(tmp_link, link)
    _fsync_dir(dataset_dir)
    fault_point("swapped", dataset)

    _cleanup_versions(dataset_dir, partition_key, current=version, previous=previous, keep_previous=keep_previous)


def referenced_versions(dataset_dir: Path, exclude: Iterable[str] = ()) -> set[Path]:
    """Resolved version directories that a ``dt=P`` link or a ``.previous/dt=P`` record points to, for
    every partition P except those in ``exclude``."""
    dataset_dir = Path(dataset_dir)
    skip = {f"dt={key}" for key in exclude}
    links = [*dataset_dir.glob("dt=*"), *(dataset_dir / PREVIOUS_DIR).glob("dt=*")]
    return {link.resolve() for link in links if link.name not in skip and link.is_symlink() and link.exists()}


def _cleanup_versions(
    dataset_dir: Path, partition_key: str, current: Path, previous: Path | None, keep_previous: int
) -> None:
    """Delete the partition's old versions except ``keep_previous`` of them, starting with ``previous`` (the
    version the symlink pointed to until the swap). Ranking by age alone would keep the newest directory,
    which after a writer killed in the phase ``versioned`` is its never-published orphan, and delete the
    version a reader may have just opened. With no previous version no reader can hold any, so none is kept.
    A version of another live writer (renamed into ``.versions``, its swap still to come) is never touched,
    nor one a live reader lease holds (read after the swap: a reader leases before it resolves ``dt=D``).
    """
    current = current.resolve()
    others = [
        v
        for v in (dataset_dir / _VERSIONS).glob(f"dt={partition_key}.*")
        if v.resolve() != current and not _live_writer(v)
    ]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    keep: list[Path] = []
    if previous is not None and previous != current:
        keep = [v for v in others if v.resolve() == previous]
        keep += [v for v in others if v not in keep][: max(keep_previous - len(keep), 0)]
        keep = keep[:keep_previous]
    shared = referenced_versions(dataset_dir)  # versions other days link to (or keep as their previous)
    leased = lease_holds(dataset_dir)
    for stale in others:
        if stale not in keep and stale.resolve() not in shared and not leased.protects(stale, partition_key):
            _remove(stale)


def remove_partition(dataset_dir: Path, partition_key: str) -> bool:
    """Unpublish a partition (retention): drop the symlink first, then its versions (those built for it, and
    the ones it linked to or kept as previous) that no other partition links to. Returns True if removed."""
    check_partition_key(partition_key)
    dataset_dir = Path(dataset_dir)
    link = partition_link(dataset_dir, partition_key)
    previous = dataset_dir / PREVIOUS_DIR / f"dt={partition_key}"
    existed = link.is_symlink()
    candidates = [p.resolve() for p in (link, previous) if p.is_symlink() and p.exists()]
    if existed:
        link.unlink()
    previous.unlink(missing_ok=True)
    candidates += (dataset_dir / _VERSIONS).glob(f"dt={partition_key}.*")
    still_linked = referenced_versions(dataset_dir)
    for version in candidates:
        if version.resolve() not in still_linked:
            _remove(version)
    return existed


def _fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then every folder, deepest first: a rename only makes the
    names durable, not the data. A file that cannot be synced fails the publish (nothing is swapped)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path) and os.path.isfile(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
