"""Random, valid batches for tests and smoke runs (as ``torch_geometric.testing``): never used by the
pipeline itself."""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from graph_engine.batch import EntityBatch, FeatureArrays, NeighborBlock, NeighborhoodLayout
from ml.batches import FeatureTaskBatch, PairBatch, SequenceBatch, TrainingBatch


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
            f.image[...] = np.where(f.image_mask[..., None], rng.standard_normal(shape + (d,)).astype(np.float32), 0)
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
    ids = np.asarray(entity_ids, dtype=np.int64) if entity_ids is not None else rng.choice(10**6, size=b, replace=False)
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
        entities=random_entity_batch(rng, "pin", n_ent, entity_ids=rng.choice(10**6, n_ent, replace=False), **kw),
        sequence_index=seq,
        future_index=fut,
        random_negatives=random_entity_batch(rng, "pin", num_negatives, **kw),
        random_negative_log_q=float(np.log(num_negatives / 1e6)),
    )
    return {"entity_entity": pair, "entity_feature": feat, "user_entity": sequence}
