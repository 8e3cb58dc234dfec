"""Inputs and masks shared by the naive (``ml.losses``) and the chunked (``ml.chunked_softmax``) sampled
softmax, and the shared entity key space: both loss paths import this module, neither imports the other's
internals. The math and the masking rules are described in ``ml.losses``' module docstring.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "NUM_TYPE_CODES",
    "SoftmaxInputs",
    "accidental_hit_mask",
    "candidate_log_q",
    "compute_dtype",
    "duplicate_columns",
    "empty_batch_loss",
    "entity_key",
    "prepare_inputs",
    "target_rows",
]

# entity_key reserves 2 bits for the type code: pin = 0, board = 1 (graph_engine.batch.NODE_TYPE_CODE),
# leaving room for e.g. user = 2.
NUM_TYPE_CODES = 4
_ID_BITS = (1 << 62) - 1  # fold(ids) * 4 must stay inside int64
_ID_SIGN = 1 << 61


def _fold_id(ids: torch.Tensor) -> torch.Tensor:
    """int64 ids -> [-2**61, 2**61), the identity inside that range (two's-complement wrap of 62 bits)."""
    return ((ids & _ID_BITS) ^ _ID_SIGN) - _ID_SIGN


def entity_key(type_code: Any, ids: Any) -> torch.Tensor:
    """One int64 key space for (entity_type, entity_id): ``fold(ids) * 4 + type_code``.

    ``fold`` maps an int64 id into [-2**61, 2**61) (the identity there, so keys of such ids decode as
    ``key >> 2``); ids outside it - the contract allows any int64 - share a key with the id 2**62 away, which
    at worst merges two entities' sketch counts or accidental-hit masks, never drops one.

    Used for accidental-hit masking and as the count-min-sketch key, so that sketch counts refer to the
    entity itself and survive the daily re-indexing of the graph (dense node indices change every day).
    ``type_code`` is an int or an array/tensor of codes in [0, 4) (graph_engine.batch.NODE_TYPE_CODE);
    ``ids`` an int64 array/tensor (numpy or torch) or int. Returns a torch.int64 tensor shaped like the
    broadcast of both (on ``ids``' device when it is a tensor).
    """
    ids_t = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids)
    if ids_t.dtype.is_floating_point or ids_t.dtype == torch.bool or ids_t.is_complex():
        raise TypeError(f"entity_key: ids must be integers, got dtype {ids_t.dtype}")
    ids_t = ids_t.to(torch.int64)
    tc = type_code
    on_host = ids_t.device.type == "cpu"  # device tensors were checked on the host: no sync per step
    if isinstance(tc, int) and not isinstance(tc, bool):
        if not 0 <= tc < NUM_TYPE_CODES:
            raise ValueError(f"entity_key: type_code must lie in [0, {NUM_TYPE_CODES}), got {tc}")
        return _fold_id(ids_t) * NUM_TYPE_CODES + tc
    if isinstance(tc, torch.Tensor):
        tc_t = tc.to(device=ids_t.device)
    else:
        tc_t = torch.as_tensor(np.asarray(tc), device=ids_t.device)
    if tc_t.dtype.is_floating_point or tc_t.dtype == torch.bool:
        raise TypeError(f"entity_key: type_code must be integers, got dtype {tc_t.dtype}")
    tc_t = tc_t.to(torch.int64)
    if on_host and tc_t.numel() and (int(tc_t.min()) < 0 or int(tc_t.max()) >= NUM_TYPE_CODES):
        raise ValueError(f"entity_key: type_code must lie in [0, {NUM_TYPE_CODES}), got {tc_t.unique().tolist()[:8]}")
    return _fold_id(ids_t) * NUM_TYPE_CODES + tc_t


class SoftmaxInputs:
    """Validated, normalised inputs of the sampled softmax (shared by the naive and the chunked path).

    Attributes: query [n,d], positive [B,d], negatives [M,d] (M may be 0), scale (0-dim tensor),
    positive_log_q [B] | None, negative_log_q [M] | None, positive_keys [B] | None, negative_keys [M] | None,
    query_keys [n] | None, targets [n] | None (None: n == B and query i's target is positive i),
    weights [n] | None, duplicates [B + M] bool | None (``duplicate_columns``).
    """

    __slots__ = (
        "duplicates",
        "negative_keys",
        "negative_log_q",
        "negatives",
        "positive",
        "positive_keys",
        "positive_log_q",
        "query",
        "query_keys",
        "scale",
        "targets",
        "weights",
    )

    def __init__(self, **kw: Any) -> None:
        for k in self.__slots__:
            setattr(self, k, kw[k])


def _check_vec(name: str, t: Any, n: int, device: torch.device, *, integer: bool = False) -> torch.Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t, device=device)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"sampled_softmax_loss: {name} must have shape [{n}], got {tuple(t.shape)}")
    if integer:
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"sampled_softmax_loss: {name} must be an integer (int64) tensor, got {t.dtype}")
        return t.to(torch.int64)
    if not t.dtype.is_floating_point:
        t = t.to(torch.float32)
    return t


def prepare_inputs(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None,
    *,
    scale: float | torch.Tensor,
    positive_log_q: torch.Tensor | None = None,
    negative_log_q: torch.Tensor | float | None = None,
    positive_keys: torch.Tensor | None = None,
    negative_keys: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    query_keys: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> SoftmaxInputs:
    """Validate shapes/dtypes and normalise optional arguments (clear errors naming the argument)."""
    if not isinstance(query, torch.Tensor) or not isinstance(positive, torch.Tensor):
        raise TypeError("sampled_softmax_loss: query and positive must be torch tensors")
    if query.dim() != 2:
        raise ValueError(f"sampled_softmax_loss: query must be [B, d], got shape {tuple(query.shape)}")
    if targets is None and positive.shape != query.shape:
        raise ValueError(
            f"sampled_softmax_loss: positive must have the query's shape {tuple(query.shape)}, got {tuple(positive.shape)}"
        )
    if targets is not None and (positive.dim() != 2 or positive.shape[1] != query.shape[1]):
        raise ValueError(f"sampled_softmax_loss: positive must be [B, {query.shape[1]}], got {tuple(positive.shape)}")
    if query_keys is not None and positive_keys is None:
        raise ValueError("sampled_softmax_loss: query_keys need positive_keys (the candidates' keys)")
    n, d = query.shape
    b = positive.shape[0]
    dev = query.device
    if negatives is None:
        negatives = query.new_zeros((0, d))
    if not isinstance(negatives, torch.Tensor) or negatives.dim() != 2 or negatives.shape[1] != d:
        shape = tuple(negatives.shape) if isinstance(negatives, torch.Tensor) else type(negatives).__name__
        raise ValueError(f"sampled_softmax_loss: negatives must be [M, {d}], got {shape}")
    m = negatives.shape[0]
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"sampled_softmax_loss: scale (lambda) must be a scalar, got shape {tuple(scale.shape)}")
        scale_t = scale.reshape(())
    else:
        scale_t = torch.tensor(float(scale), device=dev)
    if isinstance(negative_log_q, (int, float)):
        negative_log_q = torch.full((m,), float(negative_log_q), device=dev)
    pos_keys = _check_vec("positive_keys", positive_keys, b, dev, integer=True)
    neg_keys = _check_vec("negative_keys", negative_keys, m, dev, integer=True)
    return SoftmaxInputs(
        query=query,
        positive=positive,
        negatives=negatives,
        scale=scale_t,
        positive_log_q=_check_vec("positive_log_q", positive_log_q, b, dev),
        negative_log_q=_check_vec("negative_log_q", negative_log_q, m, dev),
        positive_keys=pos_keys,
        negative_keys=neg_keys,
        duplicates=duplicate_columns(pos_keys, neg_keys, m),
        query_keys=_check_vec("query_keys", query_keys, n, dev, integer=True),
        targets=_check_vec("targets", targets, n, dev, integer=True),
        weights=_check_vec("weights", weights, n, dev),
    )


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (never half: see module docstring)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def candidate_log_q(
    positive_log_q: torch.Tensor | None,
    negative_log_q: torch.Tensor | None,
    b: int,
    m: int,
    like: torch.Tensor,
) -> torch.Tensor | None:
    """log Q of the B + M candidates (None when neither sampler has a correction)."""
    if positive_log_q is None and negative_log_q is None:
        return None
    pq = positive_log_q.to(like.dtype) if positive_log_q is not None else like.new_zeros(b)
    nq = negative_log_q.to(like.dtype) if negative_log_q is not None else like.new_zeros(m)
    return torch.cat([pq, nq])


def target_rows(targets: torch.Tensor | None, rows: slice, device: torch.device) -> torch.Tensor:
    """Candidate index of the target of each query in ``rows`` (query i -> positive i without ``targets``)."""
    if targets is not None:
        return targets[rows]
    return torch.arange(rows.start, rows.stop, device=device)


def duplicate_columns(
    positive_keys: torch.Tensor | None, negative_keys: torch.Tensor | None, m: int
) -> torch.Tensor | None:
    """Bool [B + M]: True for a keyed candidate column that is not the last one with its entity key (module
    docstring: one column per distinct entity; random negatives come last, so they are the ones kept).
    Random negatives without keys are never duplicates; None without ``positive_keys``."""
    if positive_keys is None:
        return None
    keys = positive_keys if negative_keys is None else torch.cat([positive_keys, negative_keys])
    # a stable sort keeps equal keys in column order: an entry followed by an equal key is not the last
    sorted_keys, order = torch.sort(keys, stable=True)
    later = torch.zeros_like(sorted_keys, dtype=torch.bool)
    later[:-1] = sorted_keys[:-1] == sorted_keys[1:]
    dup = torch.empty_like(later)
    dup[order] = later
    if negative_keys is None and m:
        dup = torch.cat([dup, dup.new_zeros(m)])
    return dup


def accidental_hit_mask(
    positive_keys: torch.Tensor | None,
    negative_keys: torch.Tensor | None,
    rows: slice,
    b: int,
    m: int,
    *,
    query_keys: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    duplicates: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Bool [rows, B + M]: True where candidate j is not query i's target but has the key of its positive
    or (with ``query_keys``) of the query entity itself, or is a ``duplicates`` column (logit -> -inf)."""
    if positive_keys is None:
        return None
    cand_keys = positive_keys
    if m:
        cand_keys = torch.cat(
            [positive_keys, negative_keys if negative_keys is not None else positive_keys.new_full((m,), -1)]
        )
    tgt = target_rows(targets, rows, positive_keys.device)
    mask = positive_keys[tgt][:, None] == cand_keys[None, :]
    if query_keys is not None:
        mask |= query_keys[rows][:, None] == cand_keys[None, :]
    if negative_keys is None and m:
        mask[:, b:] = False  # no keys for the random negatives: they cannot be recognised as hits
    if duplicates is not None:
        mask |= duplicates[None, :]
    r = torch.arange(tgt.shape[0], device=mask.device)
    mask[r, tgt] = False  # the target itself is never masked
    return mask


def empty_batch_loss(x: SoftmaxInputs) -> torch.Tensor:
    """The loss of a batch without queries: zero, but connected to every input (no None grads for callers)."""
    return (x.query.sum() + x.positive.sum() + x.negatives.sum()) * 0.0 + x.scale * 0.0
