"""Training batches (one per task, paper 3.3): their types, their conversion to tensors, and building them.

Training batches are built from ``EntityBatch`` objects, so any caller holding a
``graph_engine.batch_builder.BatchBuilder`` (``build(entity_type, entity_ids) -> EntityBatch``) can produce
them from id arrays: ``make_pair_batch``, ``make_feature_batch``, ``make_sequence_batch``. The entity fields
become ``ml.entity_tensors.EntityTensors`` with ``tensorize`` / ``tensorize_step``.

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

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Protocol

import numpy as np
import torch

from graph_engine.batch import CompactEntityBatch, EntityBatch
from ml.entity_tensors import EntityLike, EntityTensors, memoized
from ml.sequence_ids import dedupe_sequences


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
            raise ValueError(f"PairBatch: query has {len(self.query)} rows but positive has {len(self.positive)}")
        if self.random_negatives is not None and self.random_negatives.entity_type != self.positive.entity_type:
            raise ValueError(
                f"PairBatch.random_negatives: type {self.random_negatives.entity_type!r} must be the positive's "
                f"type {self.positive.entity_type!r} (eq. 2 samples negatives of type t_p)"
            )
        if self.weights is not None and tuple(np.shape(self.weights)) != (len(self.query),):
            raise ValueError(f"PairBatch.weights has shape {np.shape(self.weights)}, expected ({len(self.query)},)")

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
    sequence_index: np.ndarray | torch.Tensor  # int64 [U, T] rows of ``entities``; -1 = padding (after the valid part)
    future_index: np.ndarray | torch.Tensor | None = None  # int64 [U] the future positive u_t' (eq. 5); -1 = none
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
            raise ValueError("SequenceBatch.sequence_index: padding (-1) must come after the valid entries of a row")
        if self.future_index is not None:
            fut = (
                np.asarray(self.future_index)
                if not isinstance(self.future_index, torch.Tensor)
                else self.future_index.cpu().numpy()
            )
            if fut.shape != (seq.shape[0],):
                raise ValueError(f"SequenceBatch.future_index has shape {fut.shape}, expected ({seq.shape[0]},)")
            if fut.size and (fut.max() >= e or fut.min() < -1):
                raise ValueError(f"SequenceBatch.future_index: values must be in [-1, {e})")
        if self.random_negatives is not None and self.random_negatives.entity_type != self.entities.entity_type:
            raise ValueError("SequenceBatch.random_negatives must have the entities' type")

    def __len__(self) -> int:
        return int(np.shape(self.sequence_index)[0])


TrainingBatch = PairBatch | FeatureTaskBatch | SequenceBatch


def tensorize(batch: TrainingBatch, memo: dict | None = None) -> TrainingBatch:
    """Converts every entity-batch field to ``EntityTensors`` (e.g. inside a DataLoader worker). ``memo``
    keeps objects shared between fields or batches (negatives, step tables) shared after conversion."""
    memo = {} if memo is None else memo
    out = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, (EntityBatch, CompactEntityBatch)):
            where = f"{type(batch).__name__}.{f.name}"
            v = memoized(memo, v, lambda v=v, where=where: EntityTensors.from_batch(v, where, memo))
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
            return memoized(memo, v, lambda: entity_fn(v, memo))
        return tensor_fn(v) if isinstance(v, torch.Tensor) else v

    return {name: replace(b, **{f.name: one(getattr(b, f.name)) for f in fields(b)}) for name, b in step.items()}


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


class BuildsEntityBatches(Protocol):
    """What the ``make_*_batch`` functions need: a ``graph_engine.batch_builder.BatchBuilder``."""

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
        random_negatives=None if negative_ids is None else builder.build(node_type, np.asarray(negative_ids, np.int64)),
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
