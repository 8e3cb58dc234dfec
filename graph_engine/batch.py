"""The one interface between the graph engine and the model (paper 3.2, 3.4.1).

An ``EntityBatch`` holds B nodes of ONE entity type (each type has its own embedder f_t, 3.2): the node's
own features, and the features of its sampled neighbourhood N(u, H) laid out in fixed blocks.

Neighbour block layout. ``NeighborhoodLayout`` lists blocks ``(subset, node_type, k)`` in configuration
order (defaults, paper 4.1: (pin_board, pin, 25), (pin_board, board, 75), (pin_pin, pin, 50)). Block b
occupies columns ``[offsets[b], offsets[b] + k_b)`` of every ``neighbor_*`` array; inside a block the
neighbours are in descending proximity score (3.2 needs the order), real entries first, then padding.
Padding entries have ``neighbor_mask == False``, zero features and score 0. A node outside the graph has
all-padding neighbourhoods ("impute zeros for their neighbor features", 3.5).

Features of one entity (``FeatureArrays``):
- ``token_ids``   int64  [..., L]  uint32 text-hash ids (graph_engine.tokenizer), 0-padded after
                                   ``token_lengths`` (id values are hash values, so 0 is only padding
                                   by position, never by value: use the lengths)
- ``token_lengths`` int32 [...]
- ``image``       float32 [..., D] D may be 0 when the data set has no image vectors
- ``image_mask``  bool   [...]     True when the entity has an image vector
- ``degree``      float32 [...]    degree in the day's pruned graph (0 when absent)
- ``present``     bool   [...]     True when the feature store holds a record for the entity

The model consumes this object unchanged; ``ml.entity_tensors`` converts it to tensors. This module stays
numpy-only (no torch) so the graph engine can be used and tested without the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np

ENTITY_TYPES = ("pin", "board", "user")
NODE_TYPES = ("pin", "board")
NODE_TYPE_CODE = {"pin": 0, "board": 1}


@dataclass(frozen=True)
class NeighborBlock:
    subset: str  # relation subset name, e.g. "pin_board" (contract "Names")
    node_type: str  # neighbour node type t
    k: int  # k_t: how many top-proximity neighbours of this type (paper 3.1.1)


@dataclass(frozen=True)
class NeighborhoodLayout:
    blocks: tuple[NeighborBlock, ...]

    @classmethod
    def paper_default(cls) -> NeighborhoodLayout:
        # Paper 4.1: top 25 pins and 75 boards on {pin-board}, top 50 pins on {pin-pin}.
        return cls(
            (
                NeighborBlock("pin_board", "pin", 25),
                NeighborBlock("pin_board", "board", 75),
                NeighborBlock("pin_pin", "pin", 50),
            )
        )

    @property
    def width(self) -> int:
        return sum(b.k for b in self.blocks)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for b in self.blocks:
            out.append(acc)
            acc += b.k
        return tuple(out)

    def block_index(self) -> np.ndarray:
        """int8 [width]: the block number of every neighbour column."""
        return np.repeat(np.arange(len(self.blocks), dtype=np.int8), [b.k for b in self.blocks])

    def column_node_type(self) -> np.ndarray:
        """int8 [width]: NODE_TYPE_CODE of every neighbour column."""
        return np.repeat(
            np.array([NODE_TYPE_CODE[b.node_type] for b in self.blocks], dtype=np.int8),
            [b.k for b in self.blocks],
        )

    def halved(self) -> NeighborhoodLayout:
        """Table 13's ablation: every k_t halved."""
        return NeighborhoodLayout(tuple(NeighborBlock(b.subset, b.node_type, max(1, b.k // 2)) for b in self.blocks))


@dataclass
class FeatureArrays:
    token_ids: np.ndarray
    token_lengths: np.ndarray
    image: np.ndarray
    image_mask: np.ndarray
    degree: np.ndarray
    present: np.ndarray

    def __len__(self) -> int:
        return int(self.token_lengths.shape[0])

    def take(self, index: np.ndarray) -> FeatureArrays:
        """Rows by index; ``index`` may have any shape (the result gains that leading shape)."""
        return FeatureArrays(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def empty(cls, shape: tuple[int, ...], max_tokens: int, image_dim: int) -> FeatureArrays:
        return cls(
            token_ids=np.zeros(shape + (max_tokens,), dtype=np.int64),
            token_lengths=np.zeros(shape, dtype=np.int32),
            image=np.zeros(shape + (image_dim,), dtype=np.float32),
            image_mask=np.zeros(shape, dtype=bool),
            degree=np.zeros(shape, dtype=np.float32),
            present=np.zeros(shape, dtype=bool),
        )


@dataclass
class EntityBatch:
    """B nodes of one entity type with their neighbourhoods. Shapes: B nodes, K = layout.width, L tokens,
    D image dims."""

    entity_type: str  # "pin" or "board"
    entity_ids: np.ndarray  # int64 [B]
    features: FeatureArrays  # [B, ...]
    neighbor_ids: np.ndarray  # int64 [B, K], -1 for padding
    neighbor_features: FeatureArrays  # [B, K, ...]
    neighbor_scores: np.ndarray  # float32 [B, K] proximity score (0 for padding)
    neighbor_mask: np.ndarray  # bool [B, K], True = real neighbour
    layout: NeighborhoodLayout = field(default_factory=NeighborhoodLayout.paper_default)

    def __post_init__(self) -> None:
        b = self.entity_ids.shape[0]
        k = self.layout.width
        if self.entity_type not in NODE_TYPES:
            raise ValueError(f"entity_type {self.entity_type!r} not in {NODE_TYPES}")
        for name, arr, shape in (
            ("neighbor_ids", self.neighbor_ids, (b, k)),
            ("neighbor_scores", self.neighbor_scores, (b, k)),
            ("neighbor_mask", self.neighbor_mask, (b, k)),
            ("features.token_lengths", self.features.token_lengths, (b,)),
            ("neighbor_features.token_lengths", self.neighbor_features.token_lengths, (b, k)),
        ):
            if arr.shape != shape:
                raise ValueError(f"EntityBatch.{name} has shape {arr.shape}, expected {shape}")

    def __len__(self) -> int:
        return int(self.entity_ids.shape[0])

    @property
    def max_tokens(self) -> int:
        return int(self.features.token_ids.shape[-1])

    @property
    def image_dim(self) -> int:
        return int(self.features.image.shape[-1])

    @property
    def neighbor_block(self) -> np.ndarray:
        return self.layout.block_index()

    @property
    def neighbor_node_type(self) -> np.ndarray:
        return self.layout.column_node_type()


@dataclass
class CompactEntityBatch:
    """An ``EntityBatch`` whose features are stored once per distinct entity of the batch (the training and
    inference form): a node's neighbourhoods overlap heavily, so B x K neighbour slots name far fewer
    entities, and the model encodes each entity's raw features once (``ml.entity_tensors.EntityTensors``).

    ``table`` holds U rows; ``own_row`` [B] and ``neighbor_row`` [B, K] index it (-1 for padding slots,
    whose features are never read). Every other field is as in ``EntityBatch``."""

    entity_type: str
    entity_ids: np.ndarray  # int64 [B]
    table: FeatureArrays  # [U, ...]
    own_row: np.ndarray  # int64 [B]
    neighbor_row: np.ndarray  # int64 [B, K], -1 = padding
    neighbor_ids: np.ndarray  # int64 [B, K], -1 for padding
    neighbor_scores: np.ndarray  # float32 [B, K]
    neighbor_mask: np.ndarray  # bool [B, K]
    layout: NeighborhoodLayout = field(default_factory=NeighborhoodLayout.paper_default)
    #: int64 [U, 2] (type code, entity id) of every table row, (-1, -1) for the padding row; lets several
    #: batches of one step share one table (``share_tables``)
    table_keys: np.ndarray | None = None
    #: int64 [U] the snapshot's dense node index of every table row, -1 for the padding row and for entities
    #: outside the graph; lets inference encode each graph node's features once per pass
    #: (``ml.inference.EncodedFeatureCache``)
    table_nodes: np.ndarray | None = None

    def __post_init__(self) -> None:
        b, k = self.entity_ids.shape[0], self.layout.width
        if self.entity_type not in NODE_TYPES:
            raise ValueError(f"entity_type {self.entity_type!r} not in {NODE_TYPES}")
        for name, arr, shape in (
            ("own_row", self.own_row, (b,)),
            ("neighbor_row", self.neighbor_row, (b, k)),
            ("neighbor_ids", self.neighbor_ids, (b, k)),
            ("neighbor_scores", self.neighbor_scores, (b, k)),
            ("neighbor_mask", self.neighbor_mask, (b, k)),
        ):
            if arr.shape != shape:
                raise ValueError(f"CompactEntityBatch.{name} has shape {arr.shape}, expected {shape}")
        if self.table_nodes is not None and self.table_nodes.shape != (len(self.table),):
            raise ValueError(
                f"CompactEntityBatch.table_nodes has shape {self.table_nodes.shape}, expected {(len(self.table),)}"
            )

    def __len__(self) -> int:
        return int(self.entity_ids.shape[0])

    @property
    def max_tokens(self) -> int:
        return int(self.table.token_ids.shape[-1])

    @property
    def image_dim(self) -> int:
        return int(self.table.image.shape[-1])

    def dense(self) -> EntityBatch:
        """The same batch with one feature row per slot (padding slots zero, as ``EntityBatch`` requires)."""
        empty = FeatureArrays.empty((1,), self.max_tokens, self.image_dim)
        padded = FeatureArrays(
            **{
                f.name: np.concatenate([getattr(self.table, f.name), getattr(empty, f.name)])
                for f in fields(FeatureArrays)
            }
        )
        pad_row = len(self.table)
        nb = np.where(self.neighbor_mask & (self.neighbor_row >= 0), self.neighbor_row, pad_row)
        return EntityBatch(
            entity_type=self.entity_type,
            entity_ids=self.entity_ids,
            features=padded.take(self.own_row),
            neighbor_ids=self.neighbor_ids,
            neighbor_features=padded.take(nb),
            neighbor_scores=self.neighbor_scores,
            neighbor_mask=self.neighbor_mask,
            layout=self.layout,
        )


def share_tables(batches: list[CompactEntityBatch]) -> list[CompactEntityBatch]:
    """The same batches over ONE table holding each distinct entity once (rows re-indexed): every batch of a
    training step that one embedder f_t reads shares its table, so each entity's raw features are encoded
    once per step (queries, positives, negatives and sequences overlap heavily). Needs ``table_keys``."""
    if len(batches) < 2:
        return list(batches)
    keys = np.concatenate([b.table_keys for b in batches])
    uniq, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    stacked = FeatureArrays(
        **{f.name: np.concatenate([getattr(b.table, f.name) for b in batches]) for f in fields(FeatureArrays)}
    )
    table = stacked.take(first)
    nodes = None
    if all(b.table_nodes is not None for b in batches):
        nodes = np.concatenate([b.table_nodes for b in batches])[first]
    out, offset = [], 0
    for b in batches:
        remap = inverse[offset : offset + len(b.table)]
        offset += len(b.table)
        out.append(
            replace(
                b,
                table=table,
                table_keys=uniq,
                table_nodes=nodes,
                own_row=remap[b.own_row],
                neighbor_row=np.where(b.neighbor_row >= 0, remap[np.maximum(b.neighbor_row, 0)], -1),
            )
        )
    return out


def parse_blocks(blocks: list[str]) -> NeighborhoodLayout:
    """A layout from its text form, one 'subset:node_type:k' per block (the graph_snapshot config)."""
    out = []
    for spec in blocks:
        parts = spec.split(":")
        if len(parts) != 3 or not parts[2].strip().isdigit():
            raise ValueError(f"graph_snapshot config field 'blocks': {spec!r} is not 'subset:node_type:k'")
        out.append(NeighborBlock(parts[0].strip(), parts[1].strip(), int(parts[2])))
    return NeighborhoodLayout(tuple(out))
