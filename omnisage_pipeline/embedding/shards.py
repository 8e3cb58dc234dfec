"""Publishing one day of embeddings: directly (one worker) or, for N shard workers, through a staging area
no reader lists, published once by the worker that completes the set (under an exclusive ``flock``).
Dagster-free; ``omnisage_pipeline.embedding.day`` describes the layout."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ml.layout import EMBEDDINGS_MANIFEST, SHARDS_DIR
from omnisage_pipeline.embedding.day import DayEmbeddings
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import publish_partition


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write under a temporary name in the same folder, fsync, then rename: a reader of ``path`` sees the
    whole file or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def shard_name(shard_index: int, num_shards: int) -> str:
    return f"shard-{shard_index:05d}-of-{num_shards:05d}.parquet"


def part_name(shard_index: int, num_shards: int) -> str:
    return f"part-{shard_index:05d}-of-{num_shards:05d}.parquet"


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / EMBEDDINGS_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def publish_unsharded(settings: Settings, day: str, result: DayEmbeddings, manifest: dict, validate=None) -> None:
    """num_shards = 1: publish both datasets directly (users first: the entity partition is the one that
    marks the day as embedded). ``validate(staged entities)`` runs before either is swapped in: when it
    raises, neither dataset changes."""
    with publish_partition(settings.embeddings_dir, day) as staging:
        pq.write_table(result.entities, staging / part_name(0, 1))
        _write_manifest(staging, manifest)
        if validate is not None:
            validate(staging)
        if result.users is not None:
            with publish_partition(settings.user_embeddings_dir, day) as user_staging:
                pq.write_table(result.users, user_staging / part_name(0, 1))
                _write_manifest(user_staging, manifest)


def shard_stage_dir(settings: Settings, day: str, stage_key: str) -> Path:
    return settings.embeddings_dir / SHARDS_DIR / f"dt={day}" / stage_key


def stage_shard(stage: Path, result: DayEmbeddings, shard_index: int, num_shards: int) -> None:
    """Write this worker's shard files (users first; each atomically)."""
    name = shard_name(shard_index, num_shards)
    if result.users is not None:
        (stage / "users").mkdir(parents=True, exist_ok=True)
        _write_parquet_atomic(result.users, stage / "users" / name)
    (stage / "entities").mkdir(parents=True, exist_ok=True)
    _write_parquet_atomic(result.entities, stage / "entities" / name)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same filesystem: no copy; the shard file stays until the publish is complete
    except OSError:
        shutil.copy2(src, dst)


def publish_if_complete(
    settings: Settings,
    day: str,
    stage: Path,
    num_shards: int,
    shard_index: int,
    with_users: bool,
    manifest: dict,
    validate=None,
) -> str:
    """Under an exclusive lock: publish the partition when all shards are staged (``validate``: the check
    of the staged entity embeddings; when it raises, nothing is published and the shard files stay).

    Returns "published" (this worker published), "waiting" (shards missing) or "already_published" (this
    worker's own shard file is gone: another worker published the set, this shard included)."""
    stage.mkdir(parents=True, exist_ok=True)
    lock_path = stage / ".publish.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            names = [shard_name(i, num_shards) for i in range(num_shards)]
            kinds = ["entities"] + (["users"] if with_users else [])
            if not (stage / "entities" / names[shard_index]).is_file():
                return "already_published"
            if not all((stage / k / n).is_file() for k in kinds for n in names):
                return "waiting"
            manifest = {
                **manifest,
                "entities": sum(pq.ParquetFile(stage / "entities" / n).metadata.num_rows for n in names),
            }
            if with_users:
                manifest["users"] = sum(pq.ParquetFile(stage / "users" / n).metadata.num_rows for n in names)
            # Entities staged and checked first; users swapped in before them (see publish_unsharded).
            with publish_partition(settings.embeddings_dir, day) as staging:
                for i, n in enumerate(names):
                    _link_or_copy(stage / "entities" / n, staging / part_name(i, num_shards))
                _write_manifest(staging, manifest)
                if validate is not None:
                    validate(staging)
                if with_users:
                    with publish_partition(settings.user_embeddings_dir, day) as user_staging:
                        for i, n in enumerate(names):
                            _link_or_copy(stage / "users" / n, user_staging / part_name(i, num_shards))
                        _write_manifest(user_staging, manifest)
            # Published: the shard files are garbage now. Removed while the lock is held, so a worker waiting
            # on the lock finds no complete set and does not publish again.
            for k in ("entities", "users"):
                shutil.rmtree(stage / k, ignore_errors=True)
            return "published"
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
