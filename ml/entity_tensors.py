"""From the graph engine's ``EntityBatch`` (numpy) to the model's torch tensors: ``EntityTensors``.

A ``graph_engine.batch.EntityBatch`` (dense) or ``CompactEntityBatch`` becomes one ``EntityTensors`` in the
compact form (each distinct entity's raw features once, rows indexing them); ``as_entity_tensors`` converts
and moves, ``cat_entity_tensors`` concatenates batches of one type. The training batches holding them are in
``ml.batches``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from graph_engine.batch import NODE_TYPE_CODE, CompactEntityBatch, EntityBatch, FeatureArrays


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
            neighbor_row = np.where(batch.neighbor_mask, b + np.arange(b * k, dtype=np.int64).reshape(b, k), -1)
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
            table=memoized(memo, table, lambda: FeatureTensors.from_arrays(table, f"{where}.features")),
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
                v = memoized(memo, v, lambda v=v: fn(v))
            elif isinstance(v, torch.Tensor):
                v = fn(v)
            out[f.name] = v
        return EntityTensors(**out)

    def to(self, device: torch.device | str, non_blocking: bool = False, memo: dict | None = None) -> EntityTensors:
        return self._map(lambda v: v.to(device, non_blocking=non_blocking), memo)

    def pin_memory(self, memo: dict | None = None) -> EntityTensors:
        return self._map(lambda v: v.pin_memory(), memo)


def memoized(memo: dict | None, key_obj, make):
    """``make()``, once per ``key_obj`` in ``memo`` (None: no memo): objects shared before a conversion stay
    shared after it."""
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
        neighbor_row=torch.cat([torch.where(t.neighbor_row >= 0, t.neighbor_row + o, -1) for t, o in zip(ts, offsets)]),
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


def as_entity_tensors(x: EntityLike, device: torch.device | str | None = None, where: str = "batch") -> EntityTensors:
    """Tensors on ``device``; an ``EntityTensors`` already there is returned as is (identity matters: the
    model embeds a batch object shared by several tasks once per step)."""
    t = x if isinstance(x, EntityTensors) else EntityTensors.from_batch(x, where)
    if device is None or t.entity_ids.device == torch.device(device):
        return t
    return t.to(device, non_blocking=True)
