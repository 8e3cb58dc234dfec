"""Partition keys and the published path of a partition: what publishing
(``omnisage_pipeline.storage.publish``) and the reader leases (``omnisage_pipeline.storage.leases``) both
build on, so that publish can honour the leases without the two importing each other. The layout is
described in ``publish``'s docstring.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: A plain partition name: letters, digits, ``-`` and ``_`` (e.g. ``2026-01-05``).
PARTITION_RE = re.compile(r"[0-9A-Za-z_\-]+")


class PublishError(RuntimeError):
    pass


class PartitionKeyError(PublishError, ValueError):
    """A partition key that is not a plain name (it could name a path outside the dataset)."""


def check_partition_key(partition_key: str) -> str:
    """``partition_key`` when it is a plain name (letters, digits, ``-`` and ``_``: e.g. ``2026-01-05``),
    else a ``PartitionKeyError`` (a ``ValueError``) naming it. Call it on every key from outside (run config,
    command line) before it becomes part of a path."""
    if not isinstance(partition_key, str) or not PARTITION_RE.fullmatch(partition_key):
        raise PartitionKeyError(
            f"partition key {partition_key!r} is not a plain name (letters, digits, '-' and '_' only, e.g. "
            "'2026-01-05'): refusing to use it in a path"
        )
    return partition_key


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0; EPERM means it exists but is not ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # not a pid at all
        return False
    return True


def partition_link(dataset_dir: Path, partition_key: str) -> Path:
    """The ``dt=<partition_key>`` symlink of a dataset (the key is checked: ``check_partition_key``)."""
    return Path(dataset_dir) / f"dt={check_partition_key(partition_key)}"


def published_path(dataset_dir: Path, partition_key: str) -> Path | None:
    """The published version directory of a partition, or None when it was never published."""
    link = partition_link(dataset_dir, partition_key)
    if not link.exists():
        return None
    return link.resolve()


def require_published(dataset_dir: Path, partition_key: str) -> Path:
    """The published version directory of a partition; FileNotFoundError when it was never published."""
    path = published_path(dataset_dir, partition_key)
    if path is None:
        raise FileNotFoundError(
            f"partition dt={partition_key} of {dataset_dir} has not been published; materialize it first"
        )
    return path
