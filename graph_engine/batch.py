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

The model consumes this object unchanged; ``ml.data`` converts it to tensors. This module stays
numpy-only (no torch) so the graph engine can be used and tested without the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

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
