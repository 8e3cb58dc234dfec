"""recall@k of the evaluation protocol (paper section 4.2.1; contract "Evaluation protocol").

    recall_k(Q, P, N) = 1/|Q| * sum_i 1{ |{n in N : s(Q_i, n) >= s(Q_i, P_i)}| < k },   s(a, b) = a.b

i.e. the share of queries whose positive is outscored (score >= the positive's, so ties count against the
positive) by fewer than k of the negatives. The negative pool of query i excludes the query itself and its
positive: with ``query_keys`` / ``positive_keys`` / ``negative_keys`` (``ml.losses.entity_key``) every
negative whose key equals query i's key or its positive's key is left out of query i's count. Without keys
the caller must pass a pool that already excludes them.

Scores are computed block-wise - ``chunk_size`` queries against at most ``_BLOCK_ELEMS // chunk_size``
negatives at a time - so |Q| x |N| is never materialised. They are computed in float64 from the (float32)
embeddings: a product of two float32 numbers is exact in float64, and a negative n counts when
s(q, n) >= s(q, p) - tol with tol = 2 * d * 2^-53 * |q| * max(|p|, |n|), the forward-error bound of two
float64 dot products of length d; this makes exact ties (e.g. a negative with the positive's embedding)
count regardless of the summation order of the matrix product, while any two scores that differ at float32
resolution are still told apart.

No queries -> recall None and n = 0 (the contract: the task is left out of any mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["RecallResult", "recall_at_k", "recall_at_k_sparse"]

_BLOCK_ELEMS = 1 << 22  # float64 scores per block: 32 MiB


@dataclass
class RecallResult:
    recall: float | None  # None when there are no queries
    n: int  # number of queries
    hits: torch.Tensor  # bool [n]: query i counted as a hit
    outscored: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # int64 [n]

    def as_dict(self, k: int = 10) -> dict:
        return {f"recall@{k}": self.recall, "n": self.n}


def _keys(name: str, t, n: int, device) -> torch.Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t, device=device)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"recall_at_k: {name} must be integer entity keys, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"recall_at_k: {name} must have shape [{n}], got {tuple(t.shape)}")
    return t.to(torch.int64)


@torch.no_grad()
def recall_at_k(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    k: int = 10,
    query_keys: torch.Tensor | None = None,
    positive_keys: torch.Tensor | None = None,
    negative_keys: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> RecallResult:
    """recall@k of 4.2.1 (module docstring). query, positive: [|Q|, d]; negatives: [|N|, d]."""
    query = torch.as_tensor(query)
    positive = torch.as_tensor(positive)
    negatives = torch.as_tensor(negatives)
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"recall_at_k: k must be a positive int, got {k!r}")
    if chunk_size < 1:
        raise ValueError(f"recall_at_k: chunk_size must be >= 1, got {chunk_size}")
    if query.dim() != 2:
        raise ValueError(f"recall_at_k: query must be [|Q|, d], got shape {tuple(query.shape)}")
    nq, d = query.shape
    if positive.shape != query.shape:
        raise ValueError(
            f"recall_at_k: positive must have the query's shape {tuple(query.shape)}, got {tuple(positive.shape)}"
        )
    if negatives.dim() != 2 or negatives.shape[1] != d:
        raise ValueError(f"recall_at_k: negatives must be [|N|, {d}], got shape {tuple(negatives.shape)}")
    dev = query.device
    nn = negatives.shape[0]
    qk = _keys("query_keys", query_keys, nq, dev)
    pk = _keys("positive_keys", positive_keys, nq, dev)
    nk = _keys("negative_keys", negative_keys, nn, dev)
    if nq == 0:
        return RecallResult(None, 0, torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.int64))

    Q = query.to(torch.float64)
    P = positive.to(dev, torch.float64)
    N = negatives.to(dev, torch.float64)
    u = 2.0**-53
    n_norm_max = N.norm(dim=1).max() if nn else torch.zeros((), dtype=torch.float64, device=dev)
    neg_chunk = max(1, _BLOCK_ELEMS // max(1, chunk_size))
    outscored = torch.zeros(nq, dtype=torch.int64, device=dev)
    for qs in range(0, nq, chunk_size):
        qe = min(qs + chunk_size, nq)
        Qc = Q[qs:qe]
        pos = (Qc * P[qs:qe]).sum(dim=1)
        tol = 2.0 * d * u * Qc.norm(dim=1) * torch.maximum(P[qs:qe].norm(dim=1), n_norm_max)
        threshold = (pos - tol)[:, None]
        for ns in range(0, nn, neg_chunk):
            ne = min(ns + neg_chunk, nn)
            beats = (Qc @ N[ns:ne].T) >= threshold  # [chunk, neg_chunk]
            if nk is not None:
                kk = nk[ns:ne][None, :]
                if qk is not None:
                    beats &= kk != qk[qs:qe, None]
                if pk is not None:
                    beats &= kk != pk[qs:qe, None]
            outscored[qs:qe] += beats.sum(dim=1)
    hits = outscored < k
    return RecallResult(float(hits.double().mean()), int(nq), hits.cpu(), outscored.cpu())


def recall_at_k_sparse(
    query,
    positive,
    negatives,
    *,
    k: int = 10,
    query_keys=None,
    positive_keys=None,
    negative_keys=None,
    chunk_size: int = 1024,
) -> RecallResult:
    """``recall_at_k`` for ``scipy.sparse`` vectors (count-valued baselines such as item co-occurrence):
    the same definition - ties count against the positive, the query and positive keys leave the pool - with
    scores from sparse products, exact for the small integer counts these baselines hold."""
    import numpy as np
    import scipy.sparse as sp

    query, positive, negatives = (sp.csr_matrix(m) for m in (query, positive, negatives))
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"recall_at_k_sparse: k must be a positive int, got {k!r}")
    nq = query.shape[0]
    if positive.shape != query.shape or negatives.shape[1] != query.shape[1]:
        raise ValueError(
            f"recall_at_k_sparse: shapes query {query.shape}, positive {positive.shape}, negatives {negatives.shape}"
        )
    keys = [
        None if t is None else np.asarray(torch.as_tensor(t).cpu(), dtype=np.int64)
        for t in (query_keys, positive_keys, negative_keys)
    ]
    qk, pk, nk = keys
    if nq == 0:
        return RecallResult(None, 0, torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.int64))
    negatives_t = negatives.T.tocsc()
    outscored = np.zeros(nq, dtype=np.int64)
    for qs in range(0, nq, chunk_size):
        qe = min(qs + chunk_size, nq)
        qc = query[qs:qe]
        pos = np.asarray(qc.multiply(positive[qs:qe]).sum(axis=1), dtype=np.float64).reshape(-1)
        scores = (qc @ negatives_t).toarray()
        beats = scores >= pos[:, None]
        if nk is not None:
            if qk is not None:
                beats &= nk[None, :] != qk[qs:qe, None]
            if pk is not None:
                beats &= nk[None, :] != pk[qs:qe, None]
        outscored[qs:qe] = beats.sum(axis=1)
    hits = outscored < k
    return RecallResult(float(hits.mean()), int(nq), torch.from_numpy(hits), torch.from_numpy(outscored))
