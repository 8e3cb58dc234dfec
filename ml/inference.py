"""Batch inference with a trained ``OmniSageModel`` (paper 3.5): entity embeddings f_t(u) and user
embeddings U_t.

- ``embed_entities(model, builder, entity_type, ids)`` -> float32 [n, d], unit rows: the day's cached
  neighbourhoods and features through ``BatchBuilder``, forward in batches under ``torch.no_grad`` in eval
  mode on the model's device. Entities outside the graph get all-padding neighbourhoods (3.5's zero
  imputation, done by the BatchBuilder).
- ``exclude_neighbor_ids`` (int64 [n], any int64 id): entity i is embedded as if ``exclude_neighbor_ids[i]``
  were not in its neighbourhood (``exclude_neighbors``; an id that is not there removes nothing): the
  evaluator uses it so an evaluation query is never embedded with the evaluation pair's own edge (contract
  "Evaluation protocol").
- ``EncodedFeatureCache``: each graph node's encoded features, computed the first time a batch reads the node
  and gathered after that; ``embed_entities`` makes one per call, or takes one that lives across calls.
- ``embed_users(model, builder, histories)`` -> the user-entity transformer's output U_t at each user's last
  history step (3.3.3; ``OmniSageModel.user_embeddings``).
"""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import torch

from graph_engine.batch import CompactEntityBatch, EntityBatch, FeatureArrays
from ml.batches import build_entities
from ml.sequence_ids import padded_ids


def exclude_neighbors(
    batch: EntityBatch | CompactEntityBatch, exclude_ids, where=None
) -> EntityBatch | CompactEntityBatch:
    """``batch`` with entity ``exclude_ids[i]`` removed from row i's neighbourhood (any block it appears in),
    for the rows where ``where`` (bool [B], default all) holds: any int64 is an id, so "nothing to remove"
    is ``where[i] = False``, not an id value. Each block is compacted afterwards - the remaining neighbours
    move up one rank, real entries first then padding, as the batch layout requires - so the row looks like
    the neighbourhood would without that node (up to the proximity scores of the others, which are kept).
    Matching is by id: the layout's blocks hold one node type each and ids of different types are
    assumed not to collide (true of the contract's data sets unless a pin and a board share an id, in which
    case the other one is dropped too - harmless for evaluation)."""
    ex = np.asarray(exclude_ids, dtype=np.int64).reshape(-1)
    b = len(batch)
    if ex.shape[0] != b:
        raise ValueError(f"exclude_neighbor_ids has {ex.shape[0]} entries for {b} entities")
    hit = batch.neighbor_mask & (batch.neighbor_ids == ex[:, None])
    if where is not None:
        rows_on = np.asarray(where, dtype=bool).reshape(-1)
        if rows_on.shape[0] != b:
            raise ValueError(f"exclude_neighbors: where has {rows_on.shape[0]} entries for {b} entities")
        hit &= rows_on[:, None]
    if not hit.any():
        return batch
    mask = batch.neighbor_mask & ~hit
    # per-block stable compaction: order = (block, not real, column) inside each row
    k = batch.layout.width
    block = batch.layout.block_index().astype(np.int64)
    col = np.arange(k)
    sort_key = block[None, :] * (2 * k) + (~mask) * k + col[None, :]
    perm = np.argsort(sort_key, axis=1, kind="stable")
    rows = np.arange(b)[:, None]
    new_mask = mask[rows, perm]

    def take(a: np.ndarray, pad) -> np.ndarray:
        out = a[rows, perm]
        m = new_mask.reshape(new_mask.shape + (1,) * (out.ndim - 2))
        return np.where(m, out, pad).astype(a.dtype, copy=False)

    common = {
        "neighbor_ids": take(batch.neighbor_ids, -1),
        "neighbor_scores": take(batch.neighbor_scores, 0),
        "neighbor_mask": new_mask,
    }
    if isinstance(batch, CompactEntityBatch):
        return replace(batch, neighbor_row=take(batch.neighbor_row, -1), **common)
    nf = batch.neighbor_features
    new_nf = FeatureArrays(**{f.name: take(getattr(nf, f.name), 0) for f in fields(FeatureArrays)})
    return replace(batch, neighbor_features=new_nf, **common)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def inference_autocast(model):
    """fp16 autocast on CUDA (A.3.3's mixed precision, here for inference too); a no-op on CPU. Embeddings
    are L2-normalised in fp32 (``ml.encoders.l2_normalize``) whatever the autocast."""
    device = _device(model)
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


class _EvalMode:
    """Eval mode for the duration, the previous mode restored after (inference inside a training run)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)


class EncodedFeatureCache:
    """Graph nodes' encoded raw features (``EntityFeatureEncoder``: text, image, degree), per embedder f_t,
    over one inference pass.

    A node's encoding reads its own features only - not its batch, slot or neighbourhood - so encoding it
    the first time a batch holds it and gathering it afterwards gives the same tokens (up to float summation
    order). Without the cache a batch encodes every distinct entity it names once: B nodes and their B x K
    neighbour slots, so encoder work per embedded node grows with the graph as neighbourhoods overlap less
    (distinct neighbours per slot over batches of 512: 0.08 on 5K nodes, 0.42 on 52K). With it every graph
    node is encoded once per embedder, whatever the graph size. Rows are float32, node-indexed by the
    snapshot's dense index (``CompactEntityBatch.table_nodes``); entities outside the graph are encoded
    per batch as before. ``max_bytes`` bounds the table per embedder: past it, batches encode as without
    the cache. Valid only while the model's weights do not change (inference, evaluation): one cache serves
    one model (another model's encoder is refused), and nothing is cached while autograd records."""

    def __init__(self, num_nodes: int, max_bytes: int = 4 << 30):
        self.num_nodes, self.max_bytes = int(num_nodes), int(max_bytes)
        # per embedder: (the encoder that fills the rows, values [n, width] or None past max_bytes, filled [n])
        self._tables: dict[str, tuple] = {}

    @classmethod
    def for_builder(cls, builder, max_bytes: int = 4 << 30) -> EncodedFeatureCache | None:
        snapshot = getattr(builder, "snapshot", None)
        node_id = getattr(snapshot, "node_id", None)
        return None if node_id is None else cls(len(node_id), max_bytes)

    def encode(self, entity_type: str, encoder, x) -> dict[str, torch.Tensor]:
        """``encoder(x.table)``'s text / image / degree entries (float32), graph nodes read from the cache."""
        nodes = x.table_nodes
        # under autograd a cached row would chain the graphs of several batches: training never caches
        if nodes is None or torch.is_grad_enabled():
            return encoder(x.table)
        values, filled = self._table(entity_type, encoder, nodes.device)
        if values is None:
            return encoder(x.table)
        safe = nodes.clamp_min(0)
        miss = torch.nonzero((nodes < 0) | ~filled[safe]).reshape(-1)
        rows = values.index_select(0, safe)
        if miss.numel():
            enc = encoder(x.table.take(miss))
            rows.index_copy_(0, miss, torch.cat([enc[name].float() for name in _ENCODED if name in enc], -1))
            new = miss[nodes[miss] >= 0]
            values.index_copy_(0, nodes[new], rows[new])
            filled[nodes[new]] = True
        text_dim, image_dim = encoder.text_dim, encoder.image_out
        out = {"text": rows[:, :text_dim], "degree": rows[:, text_dim + image_dim :]}
        if image_dim:
            out["image"] = rows[:, text_dim : text_dim + image_dim]
        return out

    def _table(self, entity_type: str, encoder, device) -> tuple:
        """(values, filled) of this embedder's rows, allocated on first use; (None, None) past ``max_bytes``.
        Rows are read only where ``filled``, so the values need no zeroing."""
        if entity_type not in self._tables:
            width = encoder.text_dim + encoder.image_out + 2  # degree = (log1p(degree), present)
            fits = self.num_nodes * width * 4 <= self.max_bytes
            values = torch.empty(self.num_nodes, width, device=device) if fits else None
            filled = torch.zeros(self.num_nodes, dtype=torch.bool, device=device) if fits else None
            self._tables[entity_type] = (encoder, values, filled)
        owner, values, filled = self._tables[entity_type]
        if owner is not encoder:
            raise ValueError(f"EncodedFeatureCache: the {entity_type!r} rows were encoded by another model's encoder")
        return values, filled


_ENCODED = ("text", "image", "degree")  # EntityFeatureEncoder's entries the embedder reads, in row order


def embed_entities(
    model,
    builder,
    entity_type: str,
    ids,
    *,
    batch_size: int = 512,
    exclude_neighbor_ids=None,
    feature_cache: EncodedFeatureCache | None = None,
) -> np.ndarray:
    """f_t(u) of every id (any order, repeats allowed) -> float32 [n, out_dim]. ``feature_cache``: one that
    lives across calls with the same model and builder (default: a new one for this call when it takes more
    than one batch)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ex = None if exclude_neighbor_ids is None else np.asarray(exclude_neighbor_ids, np.int64).reshape(-1)
    if ex is not None and ex.shape != ids.shape:
        raise ValueError(f"embed_entities: exclude_neighbor_ids has {ex.shape[0]} entries for {ids.shape[0]} ids")
    if batch_size < 1:
        raise ValueError(f"embed_entities: batch_size must be >= 1, got {batch_size}")
    out = np.zeros((ids.size, model.config.out_dim), dtype=np.float32)
    cache = feature_cache
    if cache is None and ids.size > batch_size:
        cache = EncodedFeatureCache.for_builder(builder)
    with _EvalMode(model), torch.no_grad(), inference_autocast(model):
        for lo in range(0, ids.size, batch_size):
            hi = min(ids.size, lo + batch_size)
            batch = build_entities(builder, entity_type, ids[lo:hi])
            if ex is not None:
                batch = exclude_neighbors(batch, ex[lo:hi])
            emb = model.embed(batch, f"embed_entities({entity_type})", feature_cache=cache)
            out[lo:hi] = emb.float().cpu().numpy()
    return out


def embed_users(
    model, builder, histories, *, batch_size: int = 256, entity_type: str = "pin", item_table=None
) -> np.ndarray:
    """U_t at each user's last history step -> float32 [len(histories), out_dim].

    ``histories``: one int64 array of engaged entity ids per user, oldest first; longer than the model's
    t_max (``SequenceConfig.max_len``) keeps the most recent t_max. A user with an empty history gets a
    zero vector (no state to read). ``item_table`` = (ids, vectors): f_t of the history items already
    computed by this model (daily inference embeds every pin first); items missing from it are embedded
    here once, so every history item is embedded once, not once per user who engaged with it."""
    from ml.batches import make_sequence_batch

    if "user_entity" not in getattr(model, "tasks", {}):
        raise ValueError("embed_users: the model has no user_entity task (no sequence transformer)")
    t_max = int(model.config.sequence.max_len)
    hist = [np.asarray(h, dtype=np.int64).reshape(-1)[-t_max:] for h in histories]
    out = np.zeros((len(hist), model.config.out_dim), dtype=np.float32)
    nonempty = np.flatnonzero([h.size > 0 for h in hist])
    if item_table is not None and nonempty.size:
        item_ids, item_vectors = _complete_item_table(model, builder, entity_type, hist, item_table)
    with _EvalMode(model), torch.no_grad(), inference_autocast(model):
        for lo in range(0, nonempty.size, batch_size):
            rows = nonempty[lo : lo + batch_size]
            seq, valid = padded_ids([hist[r] for r in rows])
            if item_table is None:
                batch = make_sequence_batch(builder, entity_type, seq, valid=valid)
                out[rows] = model.user_embeddings(batch).float().cpu().numpy()
                continue
            device = _device(model)
            items = torch.from_numpy(item_vectors[np.searchsorted(item_ids, seq) * valid]).to(device)
            mask = torch.from_numpy(valid).to(device)
            out[rows] = model.user_embeddings_from_items(items, mask).float().cpu().numpy()
    return out


def _complete_item_table(model, builder, entity_type: str, hist, item_table) -> tuple[np.ndarray, np.ndarray]:
    """-> (sorted ids, their vectors) covering every history item: the given table plus the missing ids."""
    ids = np.asarray(item_table[0], dtype=np.int64)
    vectors = np.asarray(item_table[1], dtype=np.float32)
    vectors = vectors.reshape(ids.size, -1) if ids.size else np.zeros((0, model.config.out_dim), np.float32)
    if vectors.shape[1] != model.config.out_dim:  # an empty table
        vectors = np.zeros((ids.size, model.config.out_dim), np.float32)
    order = np.argsort(ids, kind="stable")
    ids, vectors = ids[order], vectors[order]
    wanted = np.unique(np.concatenate([h for h in hist if h.size]))
    missing = wanted[~np.isin(wanted, ids)]
    if missing.size:
        ids = np.concatenate([ids, missing])
        vectors = np.concatenate([vectors, embed_entities(model, builder, entity_type, missing)])
        order = np.argsort(ids, kind="stable")
        ids, vectors = ids[order], vectors[order]
    return ids, vectors
