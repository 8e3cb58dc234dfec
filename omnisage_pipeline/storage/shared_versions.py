"""Content-addressed daily versions: days whose content is identical share one published version.

A daily dataset whose content rarely changes (``entity_metadata``: the whole pin and board catalogue,
image vectors included) would otherwise store a full copy per day. Here each day's content has a digest
(computed by the caller before anything is written, e.g. over the input files and the code version), kept
in the version directory as the dot-file ``.content-digest`` (readers list ``*.parquet`` only). When a
published version already has that digest, ``dt=D`` becomes one more symlink to it: the same atomic
``os.replace`` of the ``dt=D`` link that ``omnisage_pipeline.storage.publish`` uses, and no byte is written.
Otherwise the day is built and published by ``publish_partition`` as usual (staging, checks, rename, swap).

The version a day showed before its last swap is recorded as ``.previous/dt=D`` (kept for readers that
opened it, as ``publish_partition`` keeps one previous version); the one recorded before that is deleted
once no ``dt=`` link and no ``.previous`` record points to it and no reader lease holds it
(``omnisage_pipeline.storage.leases``). Nothing here, in ``publish`` or in ``retention`` deletes a version
that a link or a record still points to. Linking to an existing version
and deleting unreferenced ones take the dataset's ``.staging/.references.lock`` (``flock``), so a version
is never deleted between being found and being linked.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omnisage_pipeline.storage.leases import lease_holds
from omnisage_pipeline.storage.publish import (
    PREVIOUS_DIR,
    _fsync_dir,
    _live_writer,
    _remove,
    check_partition_key,
    dataset_label,
    fault_point,
    partition_link,
    publish_partition,
    referenced_versions,
    require_published,
)

DIGEST_FILE = ".content-digest"
LOCK_FILE = ".references.lock"
_STAGING = ".staging"
_VERSIONS = ".versions"


@dataclass(frozen=True)
class SharedPublish:
    """What a day's publish did: the version ``dt=D`` now points to, and whether it was reused."""

    version: Path
    digest: str
    reused: bool
    bytes_written: int


def files_digest(root: Path, groups: Mapping[str, Sequence[Path]], salt: Iterable[str] = ()) -> str:
    """sha256 over ``salt`` (e.g. code versions) and, per group in order, each file's path relative to
    ``root``, size and sha256 of its bytes. Deterministic for the same files in the same order."""
    total = hashlib.sha256()
    for part in salt:
        total.update(f"salt\0{part}\0".encode())
    for group, files in groups.items():
        total.update(f"group\0{group}\0{len(files)}\0".encode())
        for path in files:
            with open(path, "rb") as handle:
                file_hash = hashlib.file_digest(handle, "sha256").hexdigest()
            rel = os.path.relpath(path, root)
            total.update(f"{rel}\0{os.path.getsize(path)}\0{file_hash}\0".encode())
    return total.hexdigest()


def version_digest(version: Path) -> str | None:
    try:
        return (Path(version) / DIGEST_FILE).read_text().strip() or None
    except OSError:
        return None


def find_version(dataset_dir: Path, digest: str) -> Path | None:
    """A version with this digest that a ``dt=`` link (or a ``.previous`` record) points to, else None."""
    for version in sorted(referenced_versions(dataset_dir)):
        if version_digest(version) == digest:
            return version
    return None


@contextmanager
def references_lock(dataset_dir: Path) -> Iterator[None]:
    """Exclusive lock of a dataset's links and shared versions (released when the process dies)."""
    path = Path(dataset_dir) / _STAGING / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish_shared(
    dataset_dir: Path,
    partition_key: str,
    digest: str,
    build: Callable[[Path], None],
    validate: Callable[[Path], None] | None = None,
    reuse: bool = True,
) -> SharedPublish:
    """Publish ``dt=partition_key`` with content ``digest``: link it to a published version with the same
    digest (``validate`` runs on that version first; it raises to leave ``dt=D`` as it was), or, when there
    is none (or ``reuse`` is False), build a new version with ``build(staging)`` through
    ``publish_partition`` (``validate`` on the staging). Returns what was done."""
    check_partition_key(partition_key)
    dataset_dir = Path(dataset_dir)
    if reuse:
        linked = _link_existing(dataset_dir, partition_key, digest, validate)
        if linked is not None:
            return linked
    (dataset_dir / PREVIOUS_DIR).mkdir(parents=True, exist_ok=True)
    older = _record_previous(dataset_dir, partition_key)
    try:
        with publish_partition(dataset_dir, partition_key, validate=validate) as staging:
            build(staging)
            (staging / DIGEST_FILE).write_text(digest)
    except BaseException:
        _set_previous(dataset_dir, partition_key, older)
        raise
    collect_unreferenced(dataset_dir, [older], partition_key)
    version = require_published(dataset_dir, partition_key)
    return SharedPublish(version, digest, reused=False, bytes_written=tree_bytes(version))


def _link_existing(
    dataset_dir: Path, partition_key: str, digest: str, validate: Callable[[Path], None] | None
) -> SharedPublish | None:
    if not dataset_dir.is_dir():
        return None
    link = partition_link(dataset_dir, partition_key)
    with references_lock(dataset_dir):
        version = find_version(dataset_dir, digest)
        if version is None:
            return None
        if validate is not None:
            validate(version)  # the day's checks, on the content it is about to show
        if link.is_symlink() and link.resolve() == version:
            return SharedPublish(version, digest, reused=True, bytes_written=0)
        (dataset_dir / PREVIOUS_DIR).mkdir(exist_ok=True)
        older = _record_previous(dataset_dir, partition_key)
        tmp_link = dataset_dir / _STAGING / f"link.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        os.symlink(os.path.relpath(version, dataset_dir), tmp_link)
        os.replace(tmp_link, link)
        _fsync_dir(dataset_dir)
    fault_point("swapped", dataset_label(dataset_dir))
    collect_unreferenced(dataset_dir, [older], partition_key)
    return SharedPublish(version, digest, reused=True, bytes_written=0)


def _record_previous(dataset_dir: Path, partition_key: str) -> Path | None:
    """Before a swap: record the version ``dt=D`` shows now as its previous; return the one recorded before
    (no longer kept for readers once the swap is done)."""
    record = dataset_dir / PREVIOUS_DIR / f"dt={partition_key}"
    older = record.resolve() if record.is_symlink() and record.exists() else None
    link = partition_link(dataset_dir, partition_key)
    _set_previous(dataset_dir, partition_key, link.resolve() if link.is_symlink() and link.exists() else None)
    return older


def _set_previous(dataset_dir: Path, partition_key: str, version: Path | None) -> None:
    record = dataset_dir / PREVIOUS_DIR / f"dt={partition_key}"
    if version is None:
        record.unlink(missing_ok=True)
        return
    tmp = dataset_dir / PREVIOUS_DIR / f".tmp.{os.getpid()}.{uuid.uuid4().hex[:12]}"
    os.symlink(os.path.relpath(version, record.parent), tmp)
    os.replace(tmp, record)


def collect_unreferenced(
    dataset_dir: Path, candidates: Iterable[Path | None], partition_key: str | None = None
) -> list[Path]:
    """Delete the candidate versions that no ``dt=`` link or ``.previous`` record points to, that no live
    writer is about to publish and that no live reader lease holds (``partition_key``: the day that showed
    the candidates; a lease on that whole day keeps them all). Any other version nothing points to (one a
    lease kept until now, a killed writer's orphan) goes too, unless a lease holds a whole day: such a reader
    may hold any version that day ever showed. Returns the deleted ones."""
    dataset_dir = Path(dataset_dir)
    deleted = []
    with references_lock(dataset_dir):
        referenced = referenced_versions(dataset_dir)
        leased = lease_holds(dataset_dir)  # after the swap: a reader leases before it resolves dt=D
        doomed = {Path(c) for c in candidates if c is not None}
        if not leased.partitions and (dataset_dir / _VERSIONS).is_dir():
            doomed.update((dataset_dir / _VERSIONS).iterdir())
        for version in doomed:
            if (
                version.exists()
                and version.resolve() not in referenced
                and not _live_writer(version)
                and not leased.protects(version, partition_key)
            ):
                _remove(version)
                deleted.append(version)
    return deleted


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
