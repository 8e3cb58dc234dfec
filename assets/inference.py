"""entity_embeddings asset: daily batch inference with the registry's champion (paper 3.4.1 "Inference",
3.5), plus user embeddings (beyond the paper).

For day D, with the model version that holds the MLflow alias ``champion`` (ml.registry):

- entities: every pin and board of the day = the validated metadata (``warehouse/entity_metadata/dt=D/
  {pins,boards}``) UNION the nodes of the graph snapshot ``graph/dt=D``. Each is embedded from its cached
  neighbourhood (``graph/dt=D/neighborhoods``) and the features of ``features/dt=D``, in batches
  (graph_engine.BatchBuilder -> ml.inference.embed_entities). An entity outside the graph keeps its own
  features and gets an all-padding neighbourhood: "for entities pruned from the graph or lacking edges, we
  impute zeros for their neighbor features" (3.5; the BatchBuilder does it).
  Output ``embeddings/dt=D/``: Parquet ``entity_type`` string, ``entity_id`` int64, ``embedding``
  list<float32> (unit L2 norm), ``model_version`` string, and ``_manifest.json`` (readers skip ``_`` files).
- users: every user with a sequence in ``warehouse/training_examples/dt=D`` (``sequences`` and
  ``eval_sequences``: the users active in the window), embedded by the user-entity transformer (3.3.3) from
  the ``history`` column. History only, never the ``future`` engagements: for held-out users those are the
  evaluation positives (4.2.1), and an embedding built from them would leak the answer into any
  evaluation that uses it. Output ``user_embeddings/dt=D/``: ``user_id`` int64, ``embedding``
  list<float32>, ``model_version``.

A backfill of old dates embeds them with the CURRENT champion; the metadata (and ``_manifest.json``) flag
``before_training_cutoff`` when D is earlier than the champion's training partition, i.e. the model has
seen engagement from after D (a report over such a day is optimistic).

Sharding: N workers can split one day. Run the asset N times for the same partition, with run config
``ops: {entity_embeddings: {config: {num_shards: N, shard_index: i}}}`` for i = 0..N-1 (N Dagster runs, e.g.
from the launchpad or ``dagster asset materialize --select entity_embeddings --partition D --config
shard_i.yaml``; every worker needs the same OMNISAGE_HOME on a shared POSIX filesystem). Worker i embeds
the entities (and users) whose stable hash ``graph_engine.holdout.entity_hash(SHARD_SEED, type, id) %
N == i`` - the same split on every machine and every day - and writes its shard into a staging area no
reader lists::

    embeddings/.shards/dt=D/<stage key>/entities/shard-0000i-of-0000N.parquet
    embeddings/.shards/dt=D/<stage key>/users/shard-0000i-of-0000N.parquet

(each written under a temporary name, then renamed). The stage key is the model version plus a
fingerprint of the published input versions, so shards computed from different models or re-materialized
inputs are never mixed. Each worker then takes an exclusive ``fcntl.flock`` on ``<stage key>/.publish.lock``
and checks whether all N shard files are there; the one that finds them all publishes the partition once
(``publish_partition`` of ``embeddings`` and of ``user_embeddings``, the shard files hard-linked in) and
removes the shard files, still under the lock, so a second finishing worker finds its own shard gone
(``publish: already_published``) and publishes nothing. A worker that finishes early reports ``publish:
waiting`` as an ``AssetObservation`` of the day, not a materialization (the step yields no output,
so nothing downstream runs on a partial day). Re-running a failed worker completes the set and triggers the publish; re-running all N workers
publishes the same content again. With ``num_shards = 1`` (the default) the asset simply publishes.

(No ``from __future__ import annotations`` here: Dagster resolves the Config type from the real annotation.)
"""

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from assets.daily import ROW_COUNT, DayResult, materialize_days
from assets.snapshot import NEIGHBORHOODS_DIR, parse_blocks
from graph_engine.batch import NODE_TYPE_CODE, NODE_TYPES, NeighborhoodLayout
from graph_engine.batch_builder import BatchBuilder
from graph_engine.feature_table import open_features
from graph_engine.featurizer import DEFAULT_MAX_TOKENS
from graph_engine.holdout import TYPE_CODE, entity_hash
from graph_engine.neighbor_sampler import NeighborhoodCache, NeighborSampler, layout_from_json
from graph_engine.snapshot import GraphSnapshot
from omnisage_pipeline.partitions import DAILY_BACKFILL_POLICY, daily_partitions
from omnisage_pipeline.resources import MlflowResource, StorageResource
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import publish_partition, require_published

#: Seed of the shard hash. Fixed forever: changing it would move entities between shards of a running day.
SHARD_SEED = 0x5EED
SHARDS_DIR = ".shards"
MANIFEST = "_manifest.json"

EMBEDDING_SCHEMA = pa.schema(
    [
        ("entity_type", pa.string()),
        ("entity_id", pa.int64()),
        ("embedding", pa.list_(pa.float32())),
        ("model_version", pa.string()),
    ]
)
USER_EMBEDDING_SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("embedding", pa.list_(pa.float32())), ("model_version", pa.string())]
)


class EmbeddingsConfig(dg.Config):
    num_shards: int = Field(default=1, description="workers splitting one day (see the module docstring)")
    shard_index: int = Field(default=0, description="this worker's shard, 0 <= shard_index < num_shards")
    batch_size: int = Field(default=512, description="entities per forward pass")
    user_batch_size: int = Field(default=256, description="user sequences per forward pass")
    user_embeddings: bool = Field(
        default=True, description="also write user_embeddings/dt=D (beyond the paper)"
    )
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu' or 'cuda[:i]'")
    log_every: int = Field(default=50_000, description="log progress (entities/s) every this many entities")
    norm_tolerance: float = Field(
        default=1e-3, gt=0.0,
        description="blocking check embeddings_valid: largest allowed | ||e|| - 1 | of an entity embedding",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# Dagster-free parts (the benchmark and the tests call them directly)
# --------------------------------------------------------------------------------------------------------
class ChampionError(RuntimeError):
    """No usable champion (raised only when ml.registry itself is unavailable)."""


def load_champion(tracking_uri: str, model_name: str = "omnisage"):
    """The registry's champion (ml.registry.ModelRegistry.load_champion). Without one, ml.registry raises
    ChampionMissingError, whose message says to materialize ``omnisage_model`` first; it propagates as is."""
    from ml.registry import ModelRegistry

    return ModelRegistry(tracking_uri, model_name=model_name).load_champion()


def _extra(loaded) -> dict:
    """The champion's stored configuration (whatever the registry calls it), as one dict."""
    out: dict = {}
    for name in ("config", "extra"):
        value = getattr(loaded, name, None)
        if isinstance(value, dict):
            out.update(value)
    return out


def champion_layout(loaded, fallback: NeighborhoodLayout) -> NeighborhoodLayout:
    """The neighbourhood layout the champion was trained with (its block embeddings depend on it)."""
    value = getattr(loaded, "layout", None) or _extra(loaded).get("layout")
    if value is None:
        return fallback
    if isinstance(value, NeighborhoodLayout):
        return value
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, dict) and "blocks" in value:
        value = value["blocks"]
    if value and isinstance(value[0], str):
        return parse_blocks(list(value))
    return layout_from_json(list(value))


def champion_max_tokens(loaded) -> int:
    value = getattr(loaded, "max_tokens", None) or _extra(loaded).get("max_tokens")
    return int(value) if value else DEFAULT_MAX_TOKENS


def champion_version(loaded) -> str:
    return str(loaded.version)


def champion_training_partition(loaded) -> str | None:
    value = getattr(loaded, "training_partition", None) or _extra(loaded).get("training_partition")
    return str(value) if value else None


def resolve_device(name: str):
    from ml.train import resolve_device as resolve

    return resolve(name)


def _read_ids(folder: Path, column: str) -> np.ndarray:
    files = sorted(p for p in Path(folder).glob("*.parquet")) if Path(folder).is_dir() else []
    if not files:
        return np.zeros(0, dtype=np.int64)
    parts = []
    for f in files:
        try:
            table = pq.read_table(f, columns=[column])
        except (pa.ArrowInvalid, KeyError) as exc:
            raise ValueError(f"{f}: cannot read column {column!r}: {exc}") from exc
        parts.append(table.column(column).to_numpy(zero_copy_only=False).astype(np.int64))
    return np.concatenate(parts)


def day_entities(metadata_dir: Path, snapshot: GraphSnapshot) -> dict[str, np.ndarray]:
    """Every pin and board of the day: metadata ids UNION graph nodes, per type, sorted and unique."""
    columns = {"pin": ("pins", "pin_id"), "board": ("boards", "board_id")}
    node_type = np.asarray(snapshot.node_type)
    node_id = np.asarray(snapshot.node_id)
    out = {}
    for t in NODE_TYPES:
        folder, column = columns[t]
        meta_ids = _read_ids(Path(metadata_dir) / folder, column)
        graph_ids = node_id[node_type == NODE_TYPE_CODE[t]]
        out[t] = np.unique(np.concatenate([meta_ids, graph_ids.astype(np.int64)]))
    return out


def shard_of(entity_type: str, ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Stable shard of each entity: a portable hash of (SHARD_SEED, type, id), never of the day or data."""
    codes = np.full(np.shape(ids), TYPE_CODE[entity_type], dtype=np.int64)
    return entity_hash(SHARD_SEED, codes, np.asarray(ids, dtype=np.int64)) % int(num_shards)


def check_shard_config(num_shards: int, shard_index: int) -> None:
    if num_shards < 1:
        raise ValueError(f"entity_embeddings config field 'num_shards'={num_shards} must be >= 1")
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            f"entity_embeddings config field 'shard_index'={shard_index} must be in [0, num_shards={num_shards})"
        )


def read_user_histories(examples_dir: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """(user_id int64 [U], histories) of every user with a training or evaluation sequence, sorted by user.

    A user is in at most one of the two tables (the held-out hash splits users); a duplicate keeps the
    training row. Users with an empty history have nothing to embed and are left out."""
    ids, histories = [], []
    for name in ("sequences", "eval_sequences"):
        path = Path(examples_dir) / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: {examples_dir} is not a training_examples partition")
        try:
            table = pq.read_table(path, columns=["user_id", "history"])
        except (pa.ArrowInvalid, KeyError) as exc:
            raise ValueError(
                f"{path}: fields 'user_id' (int64) and 'history' (list<int64>) required: {exc}"
            ) from exc
        hist = table.column("history")
        if not (pa.types.is_list(hist.type) or pa.types.is_large_list(hist.type)):
            raise ValueError(f"{path}: field 'history' is {hist.type}, expected list<int64>")
        # Vectorised: one flat value array split at the list boundaries (a null history has length 0).
        lengths = pc.fill_null(pc.list_value_length(hist), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(hist).to_numpy(zero_copy_only=False).astype(np.int64)
        ids.append(table.column("user_id").to_numpy().astype(np.int64))
        histories += np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []
    user_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    _, first = np.unique(user_ids, return_index=True)  # sorted unique users, first occurrence (training row)
    keep = [int(i) for i in first if histories[i].size > 0]
    return user_ids[keep], [histories[i] for i in keep]


def _list_array(emb: np.ndarray) -> pa.Array:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * d, pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1), pa.float32()))


def entity_table(entity_type: str, ids: np.ndarray, emb: np.ndarray, version: str) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "entity_type": pa.array([entity_type] * n, pa.string()),
            "entity_id": pa.array(np.asarray(ids, np.int64)),
            "embedding": _list_array(emb.reshape(n, -1) if n else np.zeros((0, 0), np.float32)),
            "model_version": pa.array([version] * n, pa.string()),
        },
        schema=EMBEDDING_SCHEMA,
    )


def user_table(ids: np.ndarray, emb: np.ndarray, version: str) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "user_id": pa.array(np.asarray(ids, np.int64)),
            "embedding": _list_array(emb.reshape(n, -1) if n else np.zeros((0, 0), np.float32)),
            "model_version": pa.array([version] * n, pa.string()),
        },
        schema=USER_EMBEDDING_SCHEMA,
    )


def _check_embeddings(emb: np.ndarray, n: int, what: str) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"{what}: the model returned shape {emb.shape}, expected ({n}, d)")
    if n and not np.isfinite(emb).all():
        bad = int((~np.isfinite(emb).all(axis=1)).sum())
        raise ValueError(f"{what}: {bad} of {n} embeddings are not finite; refusing to publish them")
    return emb


@dataclass
class DayInputs:
    """The published inputs of day D that the embeddings are computed from."""

    metadata_dir: Path
    graph_dir: Path
    features_dir: Path
    examples_dir: Path | None

    @classmethod
    def resolve(cls, settings: Settings, day: str, with_users: bool) -> "DayInputs":
        return cls(
            metadata_dir=require_published(settings.warehouse_dataset("entity_metadata"), day),
            graph_dir=require_published(settings.graph_dir, day),
            features_dir=require_published(settings.features_dir, day),
            examples_dir=require_published(settings.warehouse_dataset("training_examples"), day)
            if with_users
            else None,
        )

    def fingerprint(self, with_users: bool) -> str:
        """Names of the published versions (each publish makes a new one) + the options that change content."""
        parts = [
            str(p.name)
            for p in (self.metadata_dir, self.graph_dir, self.features_dir, self.examples_dir)
            if p
        ]
        return hashlib.sha1(json.dumps([parts, with_users]).encode()).hexdigest()[:12]


@dataclass
class DayEmbeddings:
    entities: pa.Table
    users: pa.Table | None
    stats: dict = field(default_factory=dict)


def champion_builder(loaded, graph_dir: Path, features_dir: Path, log=None) -> BatchBuilder:
    """A BatchBuilder over one day's graph snapshot and feature store with the neighbourhood layout and token
    width ``loaded`` was trained with (embeddings, the recall report). Checks the image width."""
    log = log or (lambda msg: None)
    model = loaded.model
    snapshot = GraphSnapshot.open(graph_dir)
    cache = NeighborhoodCache.open(graph_dir / NEIGHBORHOODS_DIR, snapshot)
    layout = champion_layout(loaded, cache.layout)
    if layout == cache.layout:
        neighborhoods = cache
    else:
        # The champion was trained with another layout: sample this day's neighbourhoods on the fly with the
        # champion's layout and the cache's random-walk settings (slower, but the model sees what it expects).
        log(f"champion layout {layout} differs from the cached {cache.layout}: sampling on the fly")
        neighborhoods = NeighborSampler(
            snapshot, layout, restart_prob=cache.restart_prob, budget=cache.budget
        )
    # in memory when the day's decoded features fit the default budget (graph_engine.feature_table)
    featurizer = open_features(features_dir, max_tokens=champion_max_tokens(loaded), snapshot=snapshot)
    model_image_dim = int(getattr(getattr(model, "config", None), "image_dim", 0) or 0)
    if model_image_dim and model_image_dim != featurizer.image_dim:
        raise ValueError(
            f"model version {champion_version(loaded)} expects image vectors of length {model_image_dim}, but "
            f"the feature store {features_dir} holds field 'image_embedding' of length {featurizer.image_dim}"
        )
    return BatchBuilder(snapshot, neighborhoods, featurizer, layout)


def embed_day(
    loaded,
    inputs: DayInputs,
    *,
    num_shards: int = 1,
    shard_index: int = 0,
    batch_size: int = 512,
    user_batch_size: int = 256,
    with_users: bool = True,
    log=None,
    log_every: int = 50_000,
) -> DayEmbeddings:
    """Embed this shard's entities (and users) of one day with ``loaded.model``. Dagster-free."""
    from ml.inference import embed_entities

    check_shard_config(num_shards, shard_index)
    log = log or (lambda msg: None)
    model = loaded.model
    version = champion_version(loaded)
    builder = champion_builder(loaded, inputs.graph_dir, inputs.features_dir, log)
    snapshot, featurizer = builder.snapshot, builder.featurizer

    entities = day_entities(inputs.metadata_dir, snapshot)
    stats = {"entities_total_day": int(sum(len(v) for v in entities.values()))}
    if num_shards > 1:
        entities = {t: ids[shard_of(t, ids, num_shards) == shard_index] for t, ids in entities.items()}
    shard_total = int(sum(len(v) for v in entities.values()))
    for t, ids in entities.items():
        stats[f"entities_{t}"] = len(ids)
        stats[f"entities_{t}_outside_graph"] = int(
            (np.asarray(snapshot.lookup(np.int8(NODE_TYPE_CODE[t]), ids)) < 0).sum()
        )
    tables = []
    pin_table = None
    t0 = time.perf_counter()
    done = 0
    step = max(int(log_every), int(batch_size))
    for t, ids in entities.items():
        chunks = []
        for lo in range(0, len(ids), step):
            part = ids[lo : lo + step]
            emb = embed_entities(model, builder, t, part, batch_size=batch_size)
            chunks.append(_check_embeddings(emb, len(part), f"embed_entities({t!r})"))
            done += len(part)
            rate = done / max(time.perf_counter() - t0, 1e-9)
            log(f"embedded {done}/{shard_total} entities ({t}), {rate:.0f} entities/s")
        emb = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
        tables.append(entity_table(t, ids, emb, version))
        if t == "pin":
            pin_table = (ids, emb)  # history items of the user embeddings below: each pin embedded once
    entity_seconds = time.perf_counter() - t0
    stats.update(
        entities=int(shard_total),
        entities_outside_graph=int(sum(stats[f"entities_{t}_outside_graph"] for t in NODE_TYPES)),
        entity_seconds=round(entity_seconds, 3),
        entities_per_second=round(shard_total / entity_seconds, 1) if entity_seconds > 0 else 0.0,
    )
    dims = {len(tb.column("embedding")[0]) for tb in tables if tb.num_rows}
    stats["embedding_dim"] = dims.pop() if len(dims) == 1 else 0

    users = None
    if with_users and "user_entity" not in getattr(model, "tasks", {}):
        log("the champion has no user_entity task (no sequence transformer): no user embeddings this day")
    elif with_users:
        shard = (num_shards, shard_index)
        users = _embed_day_users(
            model, builder, inputs, shard, pin_table, version, user_batch_size, stats, log
        )
    featurizer.close()
    return DayEmbeddings(pa.concat_tables(tables), users, stats)


def _embed_day_users(model, builder, inputs: DayInputs, shard, pin_table, version, batch_size, stats, log):
    """The window's active users of this shard (U_t from the day's pin table) -> their table; fills ``stats``."""
    from ml.inference import embed_users

    num_shards, shard_index = shard
    user_ids, histories = read_user_histories(inputs.examples_dir)
    if num_shards > 1:
        keep = np.flatnonzero(shard_of("user", user_ids, num_shards) == shard_index)
        user_ids, histories = user_ids[keep], [histories[i] for i in keep]
    t1 = time.perf_counter()
    emb = np.zeros((0, 0), np.float32)
    if len(user_ids):
        emb = embed_users(model, builder, histories, batch_size=batch_size, item_table=pin_table)
        emb = _check_embeddings(emb, len(user_ids), "embed_users")
    user_seconds = time.perf_counter() - t1
    stats.update(
        users=len(user_ids),
        user_seconds=round(user_seconds, 3),
        users_per_second=round(len(user_ids) / user_seconds, 1) if user_seconds > 0 else 0.0,
    )
    log(f"embedded {len(user_ids)} users, {stats['users_per_second']:.0f} users/s")
    return user_table(user_ids, emb, version)


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
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def publish_unsharded(
    settings: Settings, day: str, result: DayEmbeddings, manifest: dict, validate=None
) -> None:
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


def run_day(
    settings: Settings,
    loaded,
    day: str,
    *,
    num_shards: int = 1,
    shard_index: int = 0,
    batch_size: int = 512,
    user_batch_size: int = 256,
    with_users: bool = True,
    log=None,
    log_every: int = 50_000,
    norm_tolerance: float = 1e-3,
) -> dict:
    """Embed (this shard of) day D and publish (when complete). Returns the day's figures and, under
    ``check_results``, the blocking ``embeddings_valid`` check evaluated on the staged partition before it
    was published (none when this shard waits for others)."""
    from assets.checks import StagedGate, embeddings_valid

    check_shard_config(num_shards, shard_index)
    inputs = DayInputs.resolve(settings, day, with_users)
    version = champion_version(loaded)
    training_partition = champion_training_partition(loaded)
    stage_key = f"v{version}-{inputs.fingerprint(with_users)}"
    t0 = time.perf_counter()
    result = embed_day(
        loaded,
        inputs,
        num_shards=num_shards,
        shard_index=shard_index,
        batch_size=batch_size,
        user_batch_size=user_batch_size,
        with_users=with_users,
        log=log,
        log_every=log_every,
    )
    manifest = {
        "partition": day,
        "model_version": version,
        "model_run_id": str(getattr(loaded, "run_id", "") or ""),
        "training_partition": training_partition,
        "before_training_cutoff": bool(training_partition and day < training_partition),
        "num_shards": num_shards,
        "stage_key": stage_key,
        "inputs": {k: str(v) for k, v in vars(inputs).items() if v is not None},
        "embedding_dim": result.stats.get("embedding_dim", 0),
    }
    expected = result.stats["entities_total_day"]
    gate = StagedGate(day, lambda staged: [embeddings_valid(staged, expected, version, norm_tolerance)])
    if num_shards == 1:
        publish_unsharded(settings, day, result, {**manifest, **_count_fields(result.stats)}, validate=gate)
        outcome = "published"
    else:
        stage = shard_stage_dir(settings, day, stage_key)
        stage_shard(stage, result, shard_index, num_shards)
        outcome = publish_if_complete(
            settings, day, stage, num_shards, shard_index, with_users, manifest, gate
        )
    return {
        "check_results": gate.results,
        **manifest,
        **result.stats,
        "shard_index": shard_index,
        "publish": outcome,
        "partition_complete": outcome in ("published", "already_published"),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _count_fields(stats: dict) -> dict:
    return {
        k: stats[k]
        for k in ("entities", "entities_pin", "entities_board", "entities_outside_graph", "users")
        if k in stats
    }


# --------------------------------------------------------------------------------------------------------
# The asset
# --------------------------------------------------------------------------------------------------------
@dg.asset(
    partitions_def=daily_partitions,
    backfill_policy=DAILY_BACKFILL_POLICY,
    deps=[
        # Unpartitioned: every day depends on the (latest) model; the champion alias picks the version.
        dg.AssetDep("omnisage_model"),
        dg.AssetDep("graph_snapshot"),
        dg.AssetDep("feature_store"),
        dg.AssetDep("entity_metadata"),
        dg.AssetDep("training_examples"),
    ],
    check_specs=[
        dg.AssetCheckSpec(
            "embeddings_valid",
            asset="entity_embeddings",
            blocking=True,
            description="finite, unit-norm, one per entity of the day, all from the champion version the run resolved",
        )
    ],
    # A shard that waits for the others publishes nothing: no output, no materialization (assets.daily).
    output_required=False,
    group_name="inference",
    kinds={"pytorch", "parquet"},
    owners=["team:omnisage-ml"],
    tags={"layer": "inference"},
    code_version="entity-embeddings-2",
    description="Embeddings of every pin and board of the day (metadata + graph; zero-imputed neighbours "
    "outside the graph, paper 3.5) and of the window's active users, with the MLflow champion.",
)
def entity_embeddings(
    context: dg.AssetExecutionContext,
    config: EmbeddingsConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
):
    check_shard_config(config.num_shards, config.shard_index)
    settings = storage.settings
    loaded = load_champion(mlflow.tracking_uri, mlflow.registered_model_name)
    device = resolve_device(config.device)
    loaded.model.to(device).eval()
    context.log.info(
        f"champion: version {champion_version(loaded)} (run {getattr(loaded, 'run_id', '?')}, trained on "
        f"dt={champion_training_partition(loaded)}) on {device}; shard {config.shard_index}/{config.num_shards}"
    )

    def one_day(day: str) -> DayResult:
        figures = run_day(
            settings,
            loaded,
            day,
            num_shards=config.num_shards,
            shard_index=config.shard_index,
            batch_size=config.batch_size,
            user_batch_size=config.user_batch_size,
            with_users=config.user_embeddings,
            log=lambda msg: context.log.info(f"entity_embeddings dt={day}: {msg}"),
            log_every=config.log_every,
            norm_tolerance=config.norm_tolerance,
        )
        checks = figures.pop("check_results")
        if figures["publish"] != "published":
            # Nothing of this day was published by this worker, so there was nothing to check; Dagster
            # still takes one result per check and step.
            checks = [dg.AssetCheckResult(
                asset_key="entity_embeddings", check_name="embeddings_valid", passed=True,
                severity=dg.AssetCheckSeverity.WARN, metadata={"evaluated": False, "publish": figures["publish"]},
                description=f"not evaluated: shard {config.shard_index} {figures['publish']}; the worker that "
                "publishes the partition checks it",
            )]  # fmt: skip
        if figures["before_training_cutoff"]:
            context.log.warning(
                f"dt={day} is before the champion's training partition dt={figures['training_partition']}: "
                "embedded with a model that has seen later engagement (backfill)"
            )
        if figures["publish"] == "waiting":
            context.log.info(
                f"dt={day}: shard {config.shard_index} of {config.num_shards} staged; the partition is published "
                "by the worker that completes the set"
            )
        metadata = {k: v for k, v in figures.items() if k != "inputs"}
        metadata["training_partition"] = figures["training_partition"] or ""
        metadata["inputs"] = dg.MetadataValue.json(figures["inputs"])
        metadata["path"] = dg.MetadataValue.path(str(settings.embeddings_dir / f"dt={day}"))
        metadata["user_path"] = dg.MetadataValue.path(str(settings.user_embeddings_dir / f"dt={day}"))
        if figures["partition_complete"]:
            metadata[ROW_COUNT] = int(figures["entities_total_day"])
        return DayResult(metadata, checks, published=figures["partition_complete"])

    yield from materialize_days(context, one_day, settings=settings, retain=("embeddings", "user_embeddings"))
