"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): the item-item linear model
B = argmin ||X - X B||^2 + lambda ||B||^2 subject to diag(B) = 0, in closed form

    P = (X^T X + lambda I)^-1,    B = I - P diag(1 / diag(P))    (B_ij = -P_ij / P_jj, B_jj = 0)

over X = the users x items binary matrix of training interactions (``ml.baselines.build_interaction_matrix``
of ``interactions_from_logs``: an event's pin, a save's board; counts are binarised as in the paper).
lambda is chosen on a validation split (``ml.item_baselines``).

Scores (``ml.pair_scoring.ItemScorer``): s(q, c) = B[q, c], how much engaging q predicts engaging c; a user's
history h (binary x_h) scores c by (x_h B)_c. An item without a column (no training interaction, or not of
``item_types``) scores 0.

B is a dense |items| x |items| inverse: ``max_items`` (default ``EASE_MAX_ITEMS``) caps it. Above the cap,
``restrict=False`` is an error naming the count; ``restrict=True`` keeps the ``max_items`` items with the most
interacting users (ties: pins before boards, then lower id) and every other item scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

__all__ = ["EASE_MAX_ITEMS", "EaseScorer", "ease_weights"]

#: Items of the dense inverse: 5,000 items are a 200 MB float64 B and an inverse of ~10 s on one core.
EASE_MAX_ITEMS = 5_000


def ease_weights(x: sp.spmatrix | np.ndarray, lam: float) -> np.ndarray:
    """B of the module docstring for a users x items matrix ``x`` (used as given), float64 dense."""
    if lam <= 0:
        raise ValueError(f"EASE: lambda must be > 0, got {lam}")
    x = sp.csr_matrix(x, dtype=np.float64)
    gram = (x.T @ x).toarray()
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b


class EaseScorer:
    """EASE on an ``ml.baselines.InteractionMatrix`` (module docstring)."""

    def __init__(
        self,
        interactions,
        lam: float,
        *,
        item_types: Sequence[str] = ("pin", "board"),
        max_items: int = EASE_MAX_ITEMS,
        restrict: bool = False,
    ):
        self.lam, self.item_types = float(lam), tuple(item_types)
        x = interactions.matrix.tocsc()
        degree = np.diff(x.indptr)
        cols, types, ids = [], [], []
        for t in self.item_types:
            known = interactions.item_ids.get(t, np.zeros(0, np.int64))
            c = interactions.columns(t, known)
            used = degree[c] > 0
            cols.append(c[used])
            types.append(np.full(int(used.sum()), t, dtype=object))
            ids.append(known[used])
        cols, types, ids = np.concatenate(cols), np.concatenate(types), np.concatenate(ids)
        self.restricted_from = None
        if cols.size > max_items:
            if not restrict:
                raise ValueError(
                    f"EASE: {cols.size} items of types {self.item_types} exceed max_items={max_items} "
                    f"(a dense {cols.size} x {cols.size} inverse); raise max_items or pass restrict=True"
                )
            keep = np.sort(np.argsort(-degree[cols], kind="stable")[:max_items])
            self.restricted_from = int(cols.size)
            cols, types, ids = cols[keep], types[keep], ids[keep]
        binary = x[:, cols].tocsr()
        binary.data[:] = 1.0
        self.weights = ease_weights(binary, self.lam)
        self._index = {}
        for t in self.item_types:
            sel = np.flatnonzero(types == t)
            order = np.argsort(ids[sel], kind="stable")
            self._index[t] = (ids[sel][order], sel[order])
        self.n_items = int(cols.size)

    def _cols(self, entity_type: str, ids) -> np.ndarray:
        """Row / column of B of each id (-1: none)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        known, where = self._index.get(entity_type, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        if known.size == 0:
            return np.full(ids.size, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(known, ids), 0, known.size - 1)
        return np.where(known[pos] == ids, where[pos], -1)

    def score(self, query_type, query_ids, cand_type, cand_ids) -> np.ndarray:
        """[n_q, n_c] B[q, c] (0 without a column)."""
        rows, cols = self._cols(query_type, query_ids), self._cols(cand_type, cand_ids)
        out = np.zeros((rows.size, cols.size), dtype=np.float64)
        kr, kc = np.flatnonzero(rows >= 0), np.flatnonzero(cols >= 0)
        if kr.size and kc.size:
            out[np.ix_(kr, kc)] = self.weights[np.ix_(rows[kr], cols[kc])]
        return out

    def score_users(self, histories, cand_type, cand_ids, user_ids=None) -> np.ndarray:
        """[n_u, n_c] (x_h B)[c] of each binary history x_h."""
        cols = self._cols(cand_type, cand_ids)
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        flat = np.concatenate([np.asarray(h, np.int64) for h in histories]) if len(histories) else np.zeros(0, np.int64)
        hist = self._cols("pin", flat)
        owner = np.repeat(np.arange(len(histories)), lengths)
        found = hist >= 0
        x = sp.csr_matrix(
            (np.ones(int(found.sum())), (owner[found], hist[found])), shape=(len(histories), self.n_items)
        )
        x.data[:] = 1.0  # binary, as the training matrix (a pin twice in a history counts once)
        out = np.zeros((len(histories), cols.size), dtype=np.float64)
        kc = np.flatnonzero(cols >= 0)
        if kc.size:
            out[:, kc] = x @ self.weights[:, cols[kc]]
        return out
