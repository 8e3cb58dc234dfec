"""Reader leases: what keeps a published version on disk while a process reads it.

A reader holds ``with read_lease(dataset_dir, day) as path:`` for the whole read. That writes
``<dataset>/.leases/dt=D.<pid>.<token>``, a JSON file with the partition, the process id, host and start
time, and -- once ``dt=D`` is resolved -- ``version``: the name of the version directory (in ``.versions``)
the reader got. The lease is written BEFORE ``dt=D`` is resolved and names the version right after.

Who honours a live lease:

- retention (``omnisage_pipeline.storage.retention``), by partition: an expired day with a lease is kept;
- the cleanup after a publish (``publish_partition``, ``shared_versions``), by version: a version a lease
  names is kept, and a lease that names none (it is between taking the lease and resolving, or it was taken
  by ``acquire_lease`` without a version) keeps every version of its partition. The
  version is removed later, by the next cleanup or by retention, once the lease is gone.

Why that order is safe: a cleanup reads the leases after its swap, and a reader that resolved the old link
had written its lease before resolving, so the cleanup sees the lease -- naming the version, or not yet
naming one and then protecting them all.

A lease whose process is gone (or whose pid was reused: the start time differs) is stale and blocks
nothing; a lease from another host cannot be checked and is honoured until it is deleted. This module is
the one lease implementation (``retention`` re-exports its names).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omnisage_pipeline.storage.partition_paths import check_partition_key, pid_alive, require_published

LEASES_DIR = ".leases"


def process_start(pid: int) -> str | None:
    """Start time of a process (Linux /proc, clock ticks since boot): tells a reused pid apart."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return raw[raw.rindex(")") + 2 :].split()[19]
    except (ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Lease:
    """One lease file; ``version`` is the version directory name it holds (None: every version of the day)."""

    path: Path
    partition: str
    pid: int
    host: str
    start: str | None
    version: str | None = None

    def alive(self) -> bool:
        """Whether its process still runs (a lease from another host is assumed alive)."""
        if self.host != socket.gethostname():
            return True  # cannot check a process on another machine: honoured until removed by hand
        if not pid_alive(self.pid):
            return False
        return self.start is None or process_start(self.pid) in (None, self.start)


def _write_atomic(path: Path, body: dict) -> None:
    tmp = path.parent / f".tmp.{path.name}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)  # a lease is never seen half-written


def acquire_lease(dataset_dir: Path, partition_key: str, version: Path | None = None) -> Path:
    """Register this process as a reader of ``dataset/dt=partition_key`` (of ``version`` when given, else of
    every version of the day); returns the lease file."""
    check_partition_key(partition_key)
    folder = Path(dataset_dir) / LEASES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    path = folder / f"dt={partition_key}.{pid}.{uuid.uuid4().hex[:12]}"
    _write_atomic(path, _body(partition_key, pid, version))
    return path


def _body(partition_key: str, pid: int, version: Path | None) -> dict:
    body = {"partition": partition_key, "pid": pid, "host": socket.gethostname(), "start": process_start(pid)}
    if version is not None:
        body["version"] = Path(version).name
    return body


def release_lease(lease_path: Path) -> None:
    """Remove a lease file (nothing when it is already gone)."""
    Path(lease_path).unlink(missing_ok=True)


@contextmanager
def read_lease(dataset_dir: Path, partition_key: str) -> Iterator[Path]:
    """Hold a reader lease on a published partition for the ``with`` block; yields the published version
    directory (like ``require_published``, which raises when the partition is not published). The lease
    keeps exactly that version, even when ``dt=D`` is published again meanwhile (module docstring)."""
    lease = acquire_lease(dataset_dir, partition_key)
    try:
        version = require_published(dataset_dir, partition_key)
        _write_atomic(lease, _body(partition_key, os.getpid(), version))
        yield version
    finally:
        release_lease(lease)


def _read_lease_file(path: Path) -> Lease | None:
    parts = path.name.split(".")
    if not path.name.startswith("dt=") or len(parts) < 3:
        return None
    key = parts[0][3:]
    try:
        body = json.loads(path.read_text())
        version = body.get("version")
        return Lease(
            path,
            key,
            int(body["pid"]),
            str(body.get("host", "")),
            body.get("start"),
            str(version) if version else None,
        )
    except FileNotFoundError:
        return None  # released meanwhile
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        # Unreadable body: fall back to the pid in the name, on this host, holding the whole day.
        try:
            return Lease(path, key, int(parts[1]), socket.gethostname(), None)
        except ValueError:
            return None


def live_leases(dataset_dir: Path, remove_stale: bool = True) -> tuple[dict[str, list[Lease]], int]:
    """Live leases of a dataset by partition key, and how many stale ones were found (and removed)."""
    folder = Path(dataset_dir) / LEASES_DIR
    live: dict[str, list[Lease]] = {}
    stale = 0
    if not folder.is_dir():
        return live, stale
    for path in folder.glob("dt=*"):
        lease = _read_lease_file(path)
        if lease is None:
            continue
        if lease.alive():
            live.setdefault(lease.partition, []).append(lease)
        else:
            stale += 1
            if remove_stale:
                release_lease(path)
    return live, stale


@dataclass(frozen=True)
class LeaseHolds:
    """What the live leases of one dataset keep: version directory names, and partitions held whole."""

    versions: frozenset[str]
    partitions: frozenset[str]

    def protects(self, version: Path, partition_key: str | None = None) -> bool:
        """Whether ``version`` (a ``.versions`` entry, or a link to one) must stay: a lease names it, or holds
        the whole day it was built for, or the whole of ``partition_key`` (the day being cleaned up, which may
        have linked to a version named after another day: ``shared_versions``)."""
        name = Path(version).resolve().name
        built_for = name[3:].split(".", 1)[0] if name.startswith("dt=") else None
        return (
            name in self.versions
            or built_for in self.partitions
            or (partition_key is not None and partition_key in self.partitions)
        )


def lease_holds(dataset_dir: Path) -> LeaseHolds:
    """The versions and whole partitions that the live leases of ``dataset_dir`` keep."""
    live, _ = live_leases(dataset_dir, remove_stale=False)
    leases = [lease for group in live.values() for lease in group]
    return LeaseHolds(
        versions=frozenset(lease.version for lease in leases if lease.version),
        partitions=frozenset(lease.partition for lease in leases if not lease.version),
    )
