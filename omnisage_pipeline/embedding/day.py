"""One day of embeddings, Dagster-free (the ``entity_embeddings`` asset's service): daily batch inference
with the registry's champion (paper 3.4.1 "Inference", 3.5), plus user embeddings (beyond the paper).

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

The inputs are read under reader leases (``DayInputs.leased``, ``omnisage_pipeline.storage.leases``): the
versions resolved when the day starts stay on disk until it has been read, whatever retention or a re-publish
of an input does meanwhile.

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
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from graph_engine.batch import NODE_TYPE_CODE, NODE_TYPES
from graph_engine.holdout import TYPE_CODE, entity_hash
from graph_engine.snapshot import GraphSnapshot
from omnisage_pipeline.embedding.champion import champion_builder, champion_version
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.leases import read_lease

#: Seed of the shard hash. Fixed forever: changing it would move entities between shards of a running day.
SHARD_SEED = 0x5EED

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
            raise ValueError(f"{path}: fields 'user_id' (int64) and 'history' (list<int64>) required: {exc}") from exc
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
    @contextmanager
    def leased(cls, settings: Settings, day: str, with_users: bool) -> Iterator[DayInputs]:
        """The published inputs of ``day``, each under a reader lease for the ``with`` block: neither
        retention nor a re-publish of an input deletes the versions resolved here while they are read."""
        with ExitStack() as stack:

            def lease(dataset: Path) -> Path:
                return stack.enter_context(read_lease(dataset, day))

            yield cls(
                metadata_dir=lease(settings.warehouse_dataset("entity_metadata")),
                graph_dir=lease(settings.graph_dir),
                features_dir=lease(settings.features_dir),
                examples_dir=lease(settings.warehouse_dataset("training_examples")) if with_users else None,
            )

    def fingerprint(self, with_users: bool) -> str:
        """Names of the published versions (each publish makes a new one) + the options that change content."""
        parts = [str(p.name) for p in (self.metadata_dir, self.graph_dir, self.features_dir, self.examples_dir) if p]
        return hashlib.sha1(json.dumps([parts, with_users]).encode()).hexdigest()[:12]


@dataclass
class DayEmbeddings:
    entities: pa.Table
    users: pa.Table | None
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EmbedOptions:
    """How one worker embeds a day (the ``entity_embeddings`` config, less the device)."""

    num_shards: int = 1
    shard_index: int = 0
    batch_size: int = 512  # entities per forward pass
    user_batch_size: int = 256  # user sequences per forward pass
    with_users: bool = True  # also user_embeddings/dt=D
    log_every: int = 50_000  # log progress (entities/s) every this many entities
    norm_tolerance: float = 1e-3  # embeddings_valid: largest allowed | ||e|| - 1 |

    def check(self) -> None:
        check_shard_config(self.num_shards, self.shard_index)


def _no_log(msg: str) -> None:
    pass


def _shard_entities(entities: dict[str, np.ndarray], options: EmbedOptions) -> dict[str, np.ndarray]:
    if options.num_shards <= 1:
        return entities
    return {t: ids[shard_of(t, ids, options.num_shards) == options.shard_index] for t, ids in entities.items()}


def _embed_entities(model, builder, entities, options: EmbedOptions, version: str, stats: dict, log):
    """Every entity of this shard, in chunks of ``log_every`` (a progress line each) -> (tables, pin table)."""
    from ml.inference import EncodedFeatureCache, embed_entities

    shard_total = int(sum(len(v) for v in entities.values()))
    tables = []
    pin_table = None
    t0 = time.perf_counter()
    done = 0
    step = max(int(options.log_every), int(options.batch_size))
    # every graph node encoded once per embedder over the whole shard, not once per chunk
    cache = EncodedFeatureCache.for_builder(builder)
    for t, ids in entities.items():
        chunks = []
        for lo in range(0, len(ids), step):
            part = ids[lo : lo + step]
            emb = embed_entities(model, builder, t, part, batch_size=options.batch_size, feature_cache=cache)
            chunks.append(_check_embeddings(emb, len(part), f"embed_entities({t!r})"))
            done += len(part)
            rate = done / max(time.perf_counter() - t0, 1e-9)
            log(f"embedded {done}/{shard_total} entities ({t}), {rate:.0f} entities/s")
        emb = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
        tables.append(entity_table(t, ids, emb, version))
        if t == "pin":
            pin_table = (ids, emb)  # history items of the user embeddings: each pin embedded once
    entity_seconds = time.perf_counter() - t0
    stats.update(
        entities=int(shard_total),
        entities_outside_graph=int(sum(stats[f"entities_{t}_outside_graph"] for t in NODE_TYPES)),
        entity_seconds=round(entity_seconds, 3),
        entities_per_second=round(shard_total / entity_seconds, 1) if entity_seconds > 0 else 0.0,
    )
    dims = {len(tb.column("embedding")[0]) for tb in tables if tb.num_rows}
    stats["embedding_dim"] = dims.pop() if len(dims) == 1 else 0
    return tables, pin_table


def embed_day(loaded, inputs: DayInputs, options: EmbedOptions | None = None, log=None) -> DayEmbeddings:
    """Embed this shard's entities (and users) of one day with ``loaded.model``."""
    options = options or EmbedOptions()
    options.check()
    log = log or _no_log
    model = loaded.model
    version = champion_version(loaded)
    builder = champion_builder(loaded, inputs.graph_dir, inputs.features_dir, log)
    snapshot = builder.snapshot

    entities = day_entities(inputs.metadata_dir, snapshot)
    stats = {"entities_total_day": int(sum(len(v) for v in entities.values()))}
    entities = _shard_entities(entities, options)
    for t, ids in entities.items():
        stats[f"entities_{t}"] = len(ids)
        stats[f"entities_{t}_outside_graph"] = int(
            (np.asarray(snapshot.lookup(np.int8(NODE_TYPE_CODE[t]), ids)) < 0).sum()
        )
    tables, pin_table = _embed_entities(model, builder, entities, options, version, stats, log)

    users = None
    if options.with_users and "user_entity" not in getattr(model, "tasks", {}):
        log("the champion has no user_entity task (no sequence transformer): no user embeddings this day")
    elif options.with_users:
        user_ids, histories = _shard_users(read_user_histories(inputs.examples_dir), options)
        emb = _embed_users(model, builder, user_ids, histories, pin_table, options, stats, log)
        users = user_table(user_ids, emb, version)
    builder.featurizer.close()
    return DayEmbeddings(pa.concat_tables(tables), users, stats)


def _shard_users(users: tuple[np.ndarray, list[np.ndarray]], options: EmbedOptions):
    user_ids, histories = users
    if options.num_shards > 1:
        keep = np.flatnonzero(shard_of("user", user_ids, options.num_shards) == options.shard_index)
        user_ids, histories = user_ids[keep], [histories[i] for i in keep]
    return user_ids, histories


def _embed_users(model, builder, user_ids, histories, pin_table, options: EmbedOptions, stats, log) -> np.ndarray:
    """The window's active users of this shard (U_t from the day's pin table); fills ``stats``."""
    from ml.inference import embed_users

    t1 = time.perf_counter()
    emb = np.zeros((0, 0), np.float32)
    if len(user_ids):
        emb = embed_users(model, builder, histories, batch_size=options.user_batch_size, item_table=pin_table)
        emb = _check_embeddings(emb, len(user_ids), "embed_users")
    user_seconds = time.perf_counter() - t1
    stats.update(
        users=len(user_ids),
        user_seconds=round(user_seconds, 3),
        users_per_second=round(len(user_ids) / user_seconds, 1) if user_seconds > 0 else 0.0,
    )
    log(f"embedded {len(user_ids)} users, {stats['users_per_second']:.0f} users/s")
    return emb


def count_fields(stats: dict) -> dict:
    """The counts a whole-day manifest carries."""
    return {
        k: stats[k]
        for k in ("entities", "entities_pin", "entities_board", "entities_outside_graph", "users")
        if k in stats
    }
