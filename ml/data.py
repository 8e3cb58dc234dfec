"""From the graph engine's ``EntityBatch`` (numpy) to the model's torch tensors, and the training batches.

Training batches (one per task, paper 3.3) are built from ``EntityBatch`` objects, so any caller holding a
``graph_engine.batch_builder.BatchBuilder`` (``build(entity_type, entity_ids) -> EntityBatch``) can produce
them from id arrays: ``make_pair_batch``, ``make_feature_batch``, ``make_sequence_batch``.

- ``PairBatch``        entity-entity (3.3.1, eq. 2): query (type t_q), positive and random negatives (type t_p),
                       per-example weight w_i of the pair's source, source ids.
- ``FeatureTaskBatch`` entity-feature (3.3.2, eq. 3): the nodes u (their own + neighbour raw features are the
                       queries g_x(u); f(u) is the positive), random negatives of u's type.
- ``SequenceBatch``    user-entity (3.3.3, eqs. 4-5): the UNIQUE entities of the batch (embedded once, with
                       gradients), ``sequence_index`` [U, T] into them (-1 = padding, valid entries first),
                       ``future_index`` [U] (-1 = none), random negatives.

Random negatives carry the log-probability with which their sampler drew them (``random_negative_log_q``):
the logQ correction (eq. 1, ref [6]) needs each candidate's own sampler's probability.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import numpy as np
import torch

from graph_engine.batch import (
    NODE_TYPE_CODE,
    CompactEntityBatch,
    EntityBatch,
    FeatureArrays,
    NeighborBlock,
    NeighborhoodLayout,
)
from ml.sequence_ids import dedupe_sequences


# ----------------------------------------------------------------------------------------------------------
# EntityBatch -> tensors
# ----------------------------------------------------------------------------------------------------------
@dataclass
class FeatureTensors:
    token_ids: torch.Tensor  # int64 [..., L]
    token_lengths: torch.Tensor  # int64 [...]
    image: torch.Tensor  # float32 [..., D]
    image_mask: torch.Tensor  # bool [...]
    degree: torch.Tensor  # float32 [...]
    present: torch.Tensor  # bool [...]

    @classmethod
    def from_arrays(cls, f: FeatureArrays, where: str) -> FeatureTensors:
        try:
            return cls(
                token_ids=torch.as_tensor(np.ascontiguousarray(f.token_ids), dtype=torch.int64),
                token_lengths=torch.as_tensor(np.ascontiguousarray(f.token_lengths)).to(torch.int64),
                image=torch.as_tensor(np.ascontiguousarray(f.image), dtype=torch.float32),
                image_mask=torch.as_tensor(np.ascontiguousarray(f.image_mask)).to(torch.bool),
                degree=torch.as_tensor(np.ascontiguousarray(f.degree), dtype=torch.float32),
                present=torch.as_tensor(np.ascontiguousarray(f.present)).to(torch.bool),
            )
        except (TypeError, ValueError) as exc:  # e.g. object arrays
            raise ValueError(f"{where}: cannot convert feature arrays to tensors: {exc}") from exc

    def to(self, device: torch.device | str, non_blocking: bool = False) -> FeatureTensors:
        return FeatureTensors(
            **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        )

    def pin_memory(self) -> FeatureTensors:
        return FeatureTensors(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def __len__(self) -> int:
        return int(self.token_lengths.shape[0])

    def take(self, index: torch.Tensor) -> FeatureTensors:
        """Rows by index (any shape: the result gains it as leading shape). ``F.embedding``-style gathers
        (index_select) whose backward accumulates with index_add, not the serialising indexing backward."""
        flat = index.reshape(-1)
        return FeatureTensors(
            **{
                f.name: getattr(self, f.name)
                .index_select(0, flat)
                .reshape(tuple(index.shape) + tuple(getattr(self, f.name).shape[1:]))
                for f in fields(self)
            }
        )


@dataclass
class EntityTensors:
    """An entity batch as tensors in the compact form (``graph_engine.batch.CompactEntityBatch``): ``table``
    holds each distinct entity's raw features once, ``own_row`` [B] and ``neighbor_row`` [B, K] index it, so
    the model encodes text and images per distinct entity, not per neighbour slot. A dense ``EntityBatch``
    converts with one table row per slot. Plus the per-column layout indices the embedder needs."""

    entity_type: str
    type_code: int
    entity_ids: torch.Tensor  # int64 [B]
    table: FeatureTensors  # [U, ...]
    own_row: torch.Tensor  # int64 [B]
    neighbor_row: torch.Tensor  # int64 [B, K], -1 = padding
    neighbor_ids: torch.Tensor  # int64 [B, K]
    neighbor_scores: torch.Tensor  # float32 [B, K]
    neighbor_mask: torch.Tensor  # bool [B, K]
    column_block: torch.Tensor  # int64 [K] block number of every neighbour column
    column_node_type: torch.Tensor  # int64 [K] NODE_TYPE_CODE of every column
    column_rank: torch.Tensor  # int64 [K] position inside its block (0 = highest proximity)
    layout_key: tuple = ()  # the layout's blocks as plain values (no device sync to compare layouts)
    table_nodes: torch.Tensor | None = None  # int64 [U] snapshot node index per table row, -1 = none

    def __len__(self) -> int:
        return int(self.entity_ids.shape[0])

    @property
    def num_blocks(self) -> int:
        return len(self.layout_key)

    @property
    def features(self) -> FeatureTensors:
        """Own raw features [B, ...] (gathered from the table)."""
        return self.table.take(self.own_row)

    @property
    def neighbor_features(self) -> FeatureTensors:
        """Neighbour raw features [B, K, ...]; padding slots hold some table row (never read unmasked)."""
        return self.table.take(self.neighbor_row.clamp_min(0))

    @classmethod
    def from_batch(
        cls, batch: EntityBatch | CompactEntityBatch, where: str = "EntityBatch", memo: dict | None = None
    ) -> EntityTensors:
        """``memo`` (id -> FeatureTensors): tables shared by several batches convert once and stay shared."""
        if isinstance(batch, EntityBatch):
            b, k = batch.neighbor_mask.shape
            table = FeatureArrays(
                **{
                    f.name: np.concatenate(
                        [
                            getattr(batch.features, f.name),
                            getattr(batch.neighbor_features, f.name).reshape(
                                (b * k,) + getattr(batch.features, f.name).shape[1:]
                            ),
                        ]
                    )
                    for f in fields(FeatureArrays)
                }
            )
            own_row = np.arange(b, dtype=np.int64)
            neighbor_row = np.where(
                batch.neighbor_mask, b + np.arange(b * k, dtype=np.int64).reshape(b, k), -1
            )
            nodes = None
        elif isinstance(batch, CompactEntityBatch):
            table, own_row, neighbor_row = batch.table, batch.own_row, batch.neighbor_row
            nodes = batch.table_nodes
        else:
            raise TypeError(f"{where}: expected graph_engine.batch.EntityBatch, got {type(batch).__name__}")
        layout = batch.layout
        ranks = (
            np.concatenate([np.arange(blk.k, dtype=np.int64) for blk in layout.blocks])
            if layout.blocks
            else np.zeros(0, np.int64)
        )
        as_long = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64)
        return cls(
            entity_type=batch.entity_type,
            type_code=NODE_TYPE_CODE[batch.entity_type],
            entity_ids=as_long(batch.entity_ids),
            table=_memoized(memo, table, lambda: FeatureTensors.from_arrays(table, f"{where}.features")),
            own_row=as_long(own_row),
            neighbor_row=as_long(neighbor_row),
            neighbor_ids=as_long(batch.neighbor_ids),
            neighbor_scores=torch.as_tensor(np.ascontiguousarray(batch.neighbor_scores), dtype=torch.float32),
            neighbor_mask=torch.as_tensor(np.ascontiguousarray(batch.neighbor_mask)).to(torch.bool),
            column_block=torch.as_tensor(layout.block_index().astype(np.int64)),
            column_node_type=torch.as_tensor(layout.column_node_type().astype(np.int64)),
            column_rank=torch.as_tensor(ranks),
            layout_key=tuple((blk.subset, blk.node_type, blk.k) for blk in layout.blocks),
            table_nodes=None if nodes is None else as_long(nodes),
        )

    def _map(self, fn, memo: dict | None = None) -> EntityTensors:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, FeatureTensors):
                v = _memoized(memo, v, lambda v=v: fn(v))
            elif isinstance(v, torch.Tensor):
                v = fn(v)
            out[f.name] = v
        return EntityTensors(**out)

    def to(
        self, device: torch.device | str, non_blocking: bool = False, memo: dict | None = None
    ) -> EntityTensors:
        return self._map(lambda v: v.to(device, non_blocking=non_blocking), memo)

    def pin_memory(self, memo: dict | None = None) -> EntityTensors:
        return self._map(lambda v: v.pin_memory(), memo)


def _memoized(memo: dict | None, key_obj, make):
    if memo is None:
        return make()
    if id(key_obj) not in memo:
        memo[id(key_obj)] = (key_obj, make())  # the key object is kept alive: its id stays unique
    return memo[id(key_obj)][1]


def cat_entity_tensors(ts: list[EntityTensors]) -> EntityTensors:
    """Row-wise concatenation of batches of one type and layout (tables stacked and row indices offset,
    unless every batch already shares one table)."""
    first = ts[0]
    shared = all(t.table is first.table for t in ts)
    offsets = [0] * len(ts) if shared else np.cumsum([0] + [len(t.table) for t in ts[:-1]]).tolist()
    table = (
        first.table
        if shared
        else FeatureTensors(
            **{f.name: torch.cat([getattr(t.table, f.name) for t in ts]) for f in fields(FeatureTensors)}
        )
    )
    return EntityTensors(
        entity_type=first.entity_type,
        type_code=first.type_code,
        entity_ids=torch.cat([t.entity_ids for t in ts]),
        table=table,
        own_row=torch.cat([t.own_row + o for t, o in zip(ts, offsets)]),
        # padding stays -1 whatever the offset
        neighbor_row=torch.cat(
            [torch.where(t.neighbor_row >= 0, t.neighbor_row + o, -1) for t, o in zip(ts, offsets)]
        ),
        neighbor_ids=torch.cat([t.neighbor_ids for t in ts]),
        neighbor_scores=torch.cat([t.neighbor_scores for t in ts]),
        neighbor_mask=torch.cat([t.neighbor_mask for t in ts]),
        column_block=first.column_block,
        column_node_type=first.column_node_type,
        column_rank=first.column_rank,
        layout_key=first.layout_key,
        table_nodes=_cat_table_nodes(ts, shared),
    )


def _cat_table_nodes(ts: list[EntityTensors], shared: bool) -> torch.Tensor | None:
    if any(t.table_nodes is None for t in ts):
        return None
    return ts[0].table_nodes if shared else torch.cat([t.table_nodes for t in ts])


EntityLike = EntityBatch | CompactEntityBatch | EntityTensors


def as_entity_tensors(
    x: EntityLike, device: torch.device | str | None = None, where: str = "batch"
) -> EntityTensors:
    """Tensors on ``device``; an ``EntityTensors`` already there is returned as is (identity matters: the
    model embeds a batch object shared by several tasks once per step)."""
    t = x if isinstance(x, EntityTensors) else EntityTensors.from_batch(x, where)
    if device is None or t.entity_ids.device == torch.device(device):
        return t
    return t.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------
# Training batches
# ----------------------------------------------------------------------------------------------------------
def _log_q_tensor(v: Any, n: int, where: str) -> torch.Tensor | None:
    if v is None:
        return None
    t = torch.as_tensor(v, dtype=torch.float32)
    if t.ndim == 0:
        return t.expand(n).clone()
    if t.shape != (n,):
        raise ValueError(
            f"{where}: random_negative_log_q has shape {tuple(t.shape)}, expected ({n},) or a scalar"
        )
    return t


@dataclass
class PairBatch:
    """Entity-entity pairs (eq. 2) of one (t_q, t_p) type pair."""

    query: EntityLike  # B entities of type t_q
    positive: EntityLike  # B entities of type t_p
    random_negatives: EntityLike | None = None  # M entities of type t_p
    weights: np.ndarray | torch.Tensor | None = None  # float32 [B]: w_i of each pair's source (eq. 2)
    source_ids: np.ndarray | torch.Tensor | None = None  # int [B]: which D_pair^(i) the pair came from
    random_negative_log_q: np.ndarray | torch.Tensor | float | None = None  # log Q of the random sampler

    def __post_init__(self) -> None:
        if len(self.query) != len(self.positive):
            raise ValueError(
                f"PairBatch: query has {len(self.query)} rows but positive has {len(self.positive)}"
            )
        if (
            self.random_negatives is not None
            and self.random_negatives.entity_type != self.positive.entity_type
        ):
            raise ValueError(
                f"PairBatch.random_negatives: type {self.random_negatives.entity_type!r} must be the positive's "
                f"type {self.positive.entity_type!r} (eq. 2 samples negatives of type t_p)"
            )
        if self.weights is not None and tuple(np.shape(self.weights)) != (len(self.query),):
            raise ValueError(
                f"PairBatch.weights has shape {np.shape(self.weights)}, expected ({len(self.query)},)"
            )

    def __len__(self) -> int:
        return len(self.query)


@dataclass
class FeatureTaskBatch:
    """Entity-feature nodes (eq. 3)."""

    nodes: EntityLike
    random_negatives: EntityLike | None = None
    random_negative_log_q: np.ndarray | torch.Tensor | float | None = None

    def __post_init__(self) -> None:
        if self.random_negatives is not None and self.random_negatives.entity_type != self.nodes.entity_type:
            raise ValueError(
                f"FeatureTaskBatch.random_negatives: type {self.random_negatives.entity_type!r} must be the nodes' "
                f"type {self.nodes.entity_type!r}"
            )

    def __len__(self) -> int:
        return len(self.nodes)


@dataclass
class SequenceBatch:
    """User-entity sequences (eqs. 4-5); ``entities`` holds each entity of the batch once."""

    entities: EntityLike  # E unique entities
    sequence_index: (
        np.ndarray | torch.Tensor
    )  # int64 [U, T] rows of ``entities``; -1 = padding (after the valid part)
    future_index: np.ndarray | torch.Tensor | None = (
        None  # int64 [U] the future positive u_t' (eq. 5); -1 = none
    )
    random_negatives: EntityLike | None = None
    random_negative_log_q: np.ndarray | torch.Tensor | float | None = None
    user_ids: np.ndarray | torch.Tensor | None = None  # int64 [U] (for user embeddings at inference)

    def __post_init__(self) -> None:
        seq = (
            np.asarray(self.sequence_index)
            if not isinstance(self.sequence_index, torch.Tensor)
            else self.sequence_index.cpu().numpy()
        )
        if seq.ndim != 2:
            raise ValueError(f"SequenceBatch.sequence_index must be 2-D [U, T], got shape {seq.shape}")
        e = len(self.entities)
        if seq.size and (seq.max() >= e or seq.min() < -1):
            raise ValueError(
                f"SequenceBatch.sequence_index: values must be in [-1, {e}), got [{seq.min()}, {seq.max()}]"
            )
        valid = seq >= 0
        # valid entries first: a -1 followed by a valid entry would break the causal model's positions
        if valid.shape[1] > 1 and np.any(~valid[:, :-1] & valid[:, 1:]):
            raise ValueError(
                "SequenceBatch.sequence_index: padding (-1) must come after the valid entries of a row"
            )
        if self.future_index is not None:
            fut = (
                np.asarray(self.future_index)
                if not isinstance(self.future_index, torch.Tensor)
                else self.future_index.cpu().numpy()
            )
            if fut.shape != (seq.shape[0],):
                raise ValueError(
                    f"SequenceBatch.future_index has shape {fut.shape}, expected ({seq.shape[0]},)"
                )
            if fut.size and (fut.max() >= e or fut.min() < -1):
                raise ValueError(f"SequenceBatch.future_index: values must be in [-1, {e})")
        if (
            self.random_negatives is not None
            and self.random_negatives.entity_type != self.entities.entity_type
        ):
            raise ValueError("SequenceBatch.random_negatives must have the entities' type")

    def __len__(self) -> int:
        return int(np.shape(self.sequence_index)[0])


TrainingBatch = PairBatch | FeatureTaskBatch | SequenceBatch


def num_examples(batch: TrainingBatch) -> int:
    """Queries-level example count for throughput (pairs, nodes, user sequences)."""
    return len(batch)


def tensorize(batch: TrainingBatch, memo: dict | None = None) -> TrainingBatch:
    """Converts every entity-batch field to ``EntityTensors`` (e.g. inside a DataLoader worker). ``memo``
    keeps objects shared between fields or batches (negatives, step tables) shared after conversion."""
    memo = {} if memo is None else memo
    out = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, (EntityBatch, CompactEntityBatch)):
            where = f"{type(batch).__name__}.{f.name}"
            v = _memoized(memo, v, lambda v=v, where=where: EntityTensors.from_batch(v, where, memo))
        out[f.name] = v
    return replace(batch, **out)


def tensorize_step(step: Mapping[str, TrainingBatch], pin_memory: bool = False) -> dict[str, TrainingBatch]:
    """A training step ({task batch name: batch}) as tensors; shared objects converted once."""
    memo: dict = {}
    out = {name: tensorize(b, memo=memo) for name, b in step.items()}
    return pin_step(out) if pin_memory else out


def _map_step(step: Mapping[str, TrainingBatch], entity_fn, tensor_fn) -> dict:
    """Every tensor field of every batch of a step converted; an ``EntityTensors`` shared by several batches
    (and a table shared by several of those) is converted once and stays shared."""
    memo: dict = {}

    def one(v):
        if isinstance(v, EntityTensors):
            return _memoized(memo, v, lambda: entity_fn(v, memo))
        return tensor_fn(v) if isinstance(v, torch.Tensor) else v

    return {
        name: replace(b, **{f.name: one(getattr(b, f.name)) for f in fields(b)}) for name, b in step.items()
    }


def move_step(step: Mapping[str, TrainingBatch], device: torch.device, non_blocking: bool = True) -> dict:
    """A tensorized step on ``device`` (asynchronous copies from pinned memory)."""
    return _map_step(
        step,
        lambda v, memo: v.to(device, non_blocking=non_blocking, memo=memo),
        lambda t: t.to(device, non_blocking=non_blocking),
    )


def pin_step(step: Mapping[str, TrainingBatch]) -> dict:
    """Page-locked copies of a tensorized step (the DataLoader's pin-memory thread calls this)."""
    return _map_step(step, lambda v, memo: v.pin_memory(memo), lambda t: t.pin_memory())


# ----------------------------------------------------------------------------------------------------------
# Building training batches from id arrays with a BatchBuilder
# ----------------------------------------------------------------------------------------------------------
class BuildsEntityBatches(Protocol):
    def build(self, entity_type: str, entity_ids: np.ndarray) -> EntityBatch: ...


def build_entities(builder, entity_type: str, ids: np.ndarray, compact: bool = True):
    """``builder.build``, in the compact form when the builder offers it (``supports_compact``)."""
    if compact and getattr(builder, "supports_compact", False):
        return builder.build(entity_type, ids, compact=True)
    return builder.build(entity_type, ids)


@dataclass
class UniformNegativeSampler:
    """Random negatives drawn uniformly with replacement from a type's ids.

    log Q: the expected number of times a given entity is drawn in a sample of M out of N, log(M / N) -
    the same "expected occurrences in one batch" quantity the count-min sketch estimates for in-batch
    candidates, so the two corrections are on one scale (ref [6])."""

    ids: np.ndarray
    seed: int = 0

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if self.ids.size == 0:
            raise ValueError("UniformNegativeSampler: empty id array")
        self._rng = np.random.default_rng(self.seed)

    def sample(self, m: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, float]:
        g = rng if rng is not None else self._rng
        return self.ids[g.integers(0, self.ids.size, size=m)], float(np.log(m / self.ids.size))


def make_pair_batch(
    builder: BuildsEntityBatches,
    query_type: str,
    query_ids: np.ndarray,
    positive_type: str,
    positive_ids: np.ndarray,
    negative_ids: np.ndarray | None = None,
    *,
    negative_log_q: float | np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> PairBatch:
    return PairBatch(
        query=builder.build(query_type, np.asarray(query_ids, dtype=np.int64)),
        positive=builder.build(positive_type, np.asarray(positive_ids, dtype=np.int64)),
        random_negatives=None
        if negative_ids is None
        else builder.build(positive_type, np.asarray(negative_ids, np.int64)),
        weights=None if weights is None else np.asarray(weights, dtype=np.float32),
        random_negative_log_q=negative_log_q,
    )


def make_feature_batch(
    builder: BuildsEntityBatches,
    node_type: str,
    node_ids: np.ndarray,
    negative_ids: np.ndarray | None = None,
    *,
    negative_log_q: float | np.ndarray | None = None,
) -> FeatureTaskBatch:
    return FeatureTaskBatch(
        nodes=builder.build(node_type, np.asarray(node_ids, dtype=np.int64)),
        random_negatives=None
        if negative_ids is None
        else builder.build(node_type, np.asarray(negative_ids, np.int64)),
        random_negative_log_q=negative_log_q,
    )


def make_sequence_batch(
    builder: BuildsEntityBatches,
    entity_type: str,
    sequences: np.ndarray,
    future_ids: np.ndarray | None = None,
    negative_ids: np.ndarray | None = None,
    *,
    negative_log_q: float | np.ndarray | None = None,
    user_ids: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    future_valid: np.ndarray | None = None,
) -> SequenceBatch:
    """A ``SequenceBatch`` from entity ids; ``valid`` / ``future_valid`` mark padding (``dedupe_sequences``)."""
    uniq, index, fut_index = dedupe_sequences(sequences, future_ids, valid=valid, future_valid=future_valid)
    return SequenceBatch(
        entities=builder.build(entity_type, uniq),
        sequence_index=index,
        future_index=fut_index,
        random_negatives=None
        if negative_ids is None
        else builder.build(entity_type, np.asarray(negative_ids, np.int64)),
        random_negative_log_q=negative_log_q,
        user_ids=user_ids,
    )


# ----------------------------------------------------------------------------------------------------------
# Combining batches; synthetic batches for tests and demos
# ----------------------------------------------------------------------------------------------------------
def concat_entity_batches(batches: list[EntityBatch]) -> EntityBatch:
    """Row-wise concatenation (same type, layout, L and D)."""
    first = batches[0]
    for b in batches[1:]:
        if b.entity_type != first.entity_type or b.layout != first.layout:
            raise ValueError("concat_entity_batches: batches differ in entity_type or layout")

    def cat_f(fs: list[FeatureArrays]) -> FeatureArrays:
        return FeatureArrays(
            **{f.name: np.concatenate([getattr(x, f.name) for x in fs]) for f in fields(FeatureArrays)}
        )

    return EntityBatch(
        entity_type=first.entity_type,
        entity_ids=np.concatenate([b.entity_ids for b in batches]),
        features=cat_f([b.features for b in batches]),
        neighbor_ids=np.concatenate([b.neighbor_ids for b in batches]),
        neighbor_features=cat_f([b.neighbor_features for b in batches]),
        neighbor_scores=np.concatenate([b.neighbor_scores for b in batches]),
        neighbor_mask=np.concatenate([b.neighbor_mask for b in batches]),
        layout=first.layout,
    )


def small_layout() -> NeighborhoodLayout:
    """The paper's three blocks (4.1) at tiny k, for tests and the CPU demo."""
    return NeighborhoodLayout(
        (
            NeighborBlock("pin_board", "pin", 3),
            NeighborBlock("pin_board", "board", 3),
            NeighborBlock("pin_pin", "pin", 2),
        )
    )


_RANDOM_VOCAB, _RANDOM_FILL = 1 << 32, 0.7  # random_entity_batch's token id range and real-slot rate


def random_entity_batch(
    rng: np.random.Generator,
    entity_type: str,
    batch_size: int,
    *,
    layout: NeighborhoodLayout | None = None,
    max_tokens: int = 8,
    image_dim: int = 0,
    entity_ids: np.ndarray | None = None,
) -> EntityBatch:
    """A valid random ``EntityBatch`` (real neighbours first in each block, in descending score; about
    ``_RANDOM_FILL`` of each block's slots real, token ids below ``_RANDOM_VOCAB``)."""
    layout = layout or small_layout()
    b, k, ell, d = batch_size, layout.width, max_tokens, image_dim

    def feats(shape: tuple[int, ...], live: np.ndarray) -> FeatureArrays:
        f = FeatureArrays.empty(shape, ell, d)
        f.present[...] = live & (rng.random(shape) < 0.9)
        f.token_lengths[...] = np.where(f.present, rng.integers(0, ell + 1, size=shape), 0)
        ids = rng.integers(1, _RANDOM_VOCAB, size=shape + (ell,), dtype=np.int64)
        f.token_ids[...] = np.where(np.arange(ell) < f.token_lengths[..., None], ids, 0)
        if d:
            f.image_mask[...] = f.present & (rng.random(shape) < 0.8)
            f.image[...] = np.where(
                f.image_mask[..., None], rng.standard_normal(shape + (d,)).astype(np.float32), 0
            )
        f.degree[...] = np.where(live, rng.integers(0, 50, size=shape), 0).astype(np.float32)
        return f

    mask = np.zeros((b, k), dtype=bool)
    scores = np.zeros((b, k), dtype=np.float32)
    for off, blk in zip(layout.offsets, layout.blocks):
        n_real = rng.binomial(blk.k, _RANDOM_FILL, size=b)
        mask[:, off : off + blk.k] = np.arange(blk.k) < n_real[:, None]
        s = -np.sort(-rng.random((b, blk.k)).astype(np.float32), axis=1)
        scores[:, off : off + blk.k] = np.where(mask[:, off : off + blk.k], s, 0)
    nb_ids = np.where(mask, rng.integers(0, 10**6, size=(b, k)), -1)
    ids = (
        np.asarray(entity_ids, dtype=np.int64)
        if entity_ids is not None
        else rng.choice(10**6, size=b, replace=False)
    )
    return EntityBatch(
        entity_type=entity_type,
        entity_ids=ids,
        features=feats((b,), np.ones(b, dtype=bool)),
        neighbor_ids=nb_ids,
        neighbor_features=feats((b, k), mask),
        neighbor_scores=scores,
        neighbor_mask=mask,
        layout=layout,
    )


# ----------------------------------------------------------------------------------------------------------
# torch Dataset / collate wrapper
# ----------------------------------------------------------------------------------------------------------
BatchFactory = Callable[[int], Iterable[Mapping[str, TrainingBatch]]]


class TaskBatchDataset(torch.utils.data.IterableDataset):
    """Wraps a batch factory ``factory(epoch) -> iterable of {task name: batch}`` for a ``DataLoader``
    (batch_size=None, collate_fn=collate_task_batches). Batches arrive already batched (one EntityBatch
    per task holds B examples), so the loader only parallelises building and tensorising them. With
    several workers each worker takes every num_workers-th batch."""

    def __init__(self, factory: BatchFactory, epoch: int = 0, tensorize_batches: bool = True):
        self.factory, self.epoch, self.tensorize_batches = factory, epoch, tensorize_batches

    def __iter__(self) -> Iterator[dict[str, TrainingBatch]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, batches in enumerate(self.factory(self.epoch)):
            if i % nw != wid:
                continue
            yield {k: tensorize(v) if self.tensorize_batches else v for k, v in batches.items()}


def collate_task_batches(item: dict[str, TrainingBatch]) -> dict[str, TrainingBatch]:
    return item


def synthetic_task_batches(
    rng: np.random.Generator,
    *,
    batch_size: int = 8,
    num_negatives: int = 8,
    num_users: int = 4,
    seq_len: int = 5,
    image_dim: int = 0,
    max_tokens: int = 6,
    layout: NeighborhoodLayout | None = None,
) -> dict[str, TrainingBatch]:
    """One random batch per task (random ids, features and neighbourhoods): shapes for tests and smoke runs."""
    kw = {"layout": layout, "max_tokens": max_tokens, "image_dim": image_dim}
    pair = PairBatch(
        query=random_entity_batch(rng, "pin", batch_size, **kw),
        positive=random_entity_batch(rng, "board", batch_size, **kw),
        random_negatives=random_entity_batch(rng, "board", num_negatives, **kw),
        weights=rng.uniform(0.5, 1.5, batch_size).astype(np.float32),
        source_ids=rng.integers(0, 2, batch_size),
        random_negative_log_q=float(np.log(num_negatives / 1e6)),
    )
    feat = FeatureTaskBatch(
        nodes=random_entity_batch(rng, "pin", batch_size, **kw),
        random_negatives=random_entity_batch(rng, "pin", num_negatives, **kw),
        random_negative_log_q=float(np.log(num_negatives / 1e6)),
    )
    n_ent = max(2, num_users * seq_len // 2)
    seq = rng.integers(0, n_ent, size=(num_users, seq_len))
    lengths = rng.integers(2, seq_len + 1, size=num_users)
    seq = np.where(np.arange(seq_len) < lengths[:, None], seq, -1)
    fut = np.where(rng.random(num_users) < 0.8, rng.integers(0, n_ent, num_users), -1)
    sequence = SequenceBatch(
        entities=random_entity_batch(
            rng, "pin", n_ent, entity_ids=rng.choice(10**6, n_ent, replace=False), **kw
        ),
        sequence_index=seq,
        future_index=fut,
        random_negatives=random_entity_batch(rng, "pin", num_negatives, **kw),
        random_negative_log_q=float(np.log(num_negatives / 1e6)),
    )
    return {"entity_entity": pair, "entity_feature": feat, "user_entity": sequence}
