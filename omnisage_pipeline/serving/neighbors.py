"""The queries behind ``omnisage neighbors`` and ``omnisage serve`` (paper 1, 4.3): related pins of a pin,
related boards of a board, boards for a pin, homefeed pin candidates for a user.

An entity's query vector is its own embedding (read from the index's row-aligned vectors); a user's is the
user-entity transformer's embedding of its history (``user_embeddings/dt=D``, written by entity_embeddings
and copied into the index partition). The score is the inner product of the unit vectors (cosine); the
query entity itself is never returned. The homefeed does not remove pins the user already engaged with (the
index holds no engagement history). Ids are the contract's int64, negative ones included; an id outside the
int64 range is an unknown id.

Reader lease: ``open_index`` takes a reader lease (``storage.retention``) while it loads a day, so retention
does not delete the files mid-read. On a store this process cannot write (read-only mount, no permission,
full disk) no lease file can be created: the day is then loaded without one, and the log says so once per
indexes directory. Only the load itself goes unprotected (a loaded index no longer needs its files, module
``service``): a retention pass run by another, writing process at that moment makes that load fail, and the
reader keeps what it had.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnisage_pipeline.serving.index import LoadedIndex
from omnisage_pipeline.serving.vectors import ENTITY_TYPES, USER
from omnisage_pipeline.storage.publish import list_published, partition_link

MAX_K = 1000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: errno of a lease that cannot be written because the store is not writable by this process
_UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}

log = logging.getLogger("omnisage.serve")
_warned_unleased: set[str] = set()


class UnknownEntityError(LookupError):
    """The id is not in the day's index (the message names the type, the id and the day)."""


class NoIndexError(FileNotFoundError):
    """No published index (for that day)."""


@dataclass(frozen=True)
class Neighbor:
    id: int
    type: str
    score: float

    def to_dict(self) -> dict:
        return {"id": self.id, "type": self.type, "score": self.score}


def newest_partition(indexes_dir: Path) -> str | None:
    keys = list_published(indexes_dir)
    return keys[-1] if keys else None


def published_target(indexes_dir: Path, day: str) -> str | None:
    """Where ``indexes/dt=day`` points now (a cheap readlink: changes exactly when a new version is published)."""
    try:
        return str(partition_link(indexes_dir, day).readlink())
    except OSError:
        return None


def open_index(indexes_dir: Path, day: str | None = None) -> LoadedIndex:
    """Load the published index of ``day`` (default: the newest), under a reader lease while it is read (no
    lease on a store this process cannot write: module docstring)."""
    indexes_dir = Path(indexes_dir)
    day = day or newest_partition(indexes_dir)
    if day is None:
        raise NoIndexError(f"no published index under {indexes_dir}: materialize ann_index first")
    if day not in list_published(indexes_dir):
        raise NoIndexError(f"{indexes_dir}/dt={day} has not been published: materialize ann_index for {day}")
    with _reader_lease(indexes_dir, day) as path:
        return LoadedIndex.open(path)


@contextmanager
def _reader_lease(indexes_dir: Path, day: str) -> Iterator[Path]:
    """``leases.read_lease`` where the store is writable; no lease where it is not (module docstring)."""
    from omnisage_pipeline.storage.leases import read_lease
    from omnisage_pipeline.storage.publish import require_published

    with ExitStack() as stack:
        try:
            path = stack.enter_context(read_lease(indexes_dir, day))
        except OSError as exc:
            if exc.errno not in _UNWRITABLE:
                raise
            if str(indexes_dir) not in _warned_unleased:
                _warned_unleased.add(str(indexes_dir))
                log.warning(
                    "cannot write a reader lease under %s (%s): loading indexes without one (a read-only store)",
                    indexes_dir,
                    exc,
                )
            path = require_published(indexes_dir, day)
        yield path


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k={k} must be in 1..{MAX_K}")


def _query_vector(loaded: LoadedIndex, source_type: str, source_id: int) -> np.ndarray:
    if not INT64_MIN <= source_id <= INT64_MAX:  # numpy would overflow; no such id can be in the index
        raise UnknownEntityError(f"unknown {source_type} id {source_id}: outside the contract's int64 range")
    if source_type == USER:
        users = loaded.users
        if users is None or len(users.ids) == 0:
            raise UnknownEntityError(f"the index of dt={loaded.partition} holds no user embeddings")
        row = int(np.searchsorted(users.ids, source_id))
        if row >= len(users.ids) or users.ids[row] != source_id:
            raise UnknownEntityError(f"unknown user id {source_id} in the index of dt={loaded.partition}")
        return np.asarray(users.matrix[row : row + 1], dtype=np.float32)
    if source_type not in ENTITY_TYPES:
        raise ValueError(f"entity type {source_type!r}: expected one of {ENTITY_TYPES + (USER,)}")
    index = loaded.types.get(source_type)
    row = int(index.rows_of(np.array([source_id]))[0]) if index is not None else -1
    if row < 0:
        raise UnknownEntityError(f"unknown {source_type} id {source_id} in the index of dt={loaded.partition}")
    return np.asarray(index.vectors[row : row + 1], dtype=np.float32)


def nearest(loaded: LoadedIndex, source_type: str, source_id: int, target_type: str, k: int = 10) -> list[Neighbor]:
    """The ``k`` nearest ``target_type`` entities of one pin, board or user (the query itself excluded)."""
    _check_k(k)
    if target_type not in ENTITY_TYPES:
        raise ValueError(f"target type {target_type!r}: expected one of {ENTITY_TYPES}")
    query = _query_vector(loaded, source_type, int(source_id))
    index = loaded.types.get(target_type)
    if index is None:
        return []
    same = source_type == target_type
    ids, scores, found = index.search(query, k + 1 if same else k)
    ids, scores, keep = ids[0], scores[0], found[0]
    if same:
        keep &= ids != source_id
    return [Neighbor(int(i), target_type, float(s)) for i, s in zip(ids[keep][:k], scores[keep][:k])]


#: (source type, target type) of each HTTP route; the CLI's --type/--target-type pick the same pairs.
ROUTES = {
    "related_pin": ("pin", "pin"),
    "related_board": ("board", "board"),
    "boards_for_pin": ("pin", "board"),
    "homefeed": (USER, "pin"),
}
