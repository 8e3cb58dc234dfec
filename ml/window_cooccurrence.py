"""Windowed item co-occurrence: the counting baseline that sees each user's engagement order.

C[a, b] = the number of times pins a and b were engaged by one user within w events of each other: over every
user's time-ordered sequence s (ties in time keep the log's row order), each pair of positions i != j with
|i - j| <= w adds 1 to C[s_i, s_j] (both directions, so C is symmetric; a pin next to itself adds nothing).
w = 1 counts consecutive engagements, the relation MovieLens's pin -> pin pairs are made of; a wider window
adds the user's broader taste. w is chosen on a validation split (``ml.item_baselines``).

Scores (``ml.pair_scoring.ItemScorer``): s(q, c) = C[q, c] + pop(c) / (max pop + 1), pop = the candidate's
event count: the counts are integers, so the fraction only breaks their ties, by popularity (a query the
counts never saw ranks by popularity alone). A user's history h scores c by sum over h of C[h_i, c], the same
tie-break added. Only pins have counts: a board query or candidate scores by the tie-break alone.

Counting is vectorised: one numpy pass per offset d = 1..w over all users at once (pairs of positions d
apart within one user), never a Python loop per event.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

__all__ = ["WindowCooccurrenceScorer", "pin_sequences", "window_counts"]


def pin_sequences(logs: pa.Table, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(user, pin) of the events ``rows`` of ``logs``, ordered by user, then event time, then row."""
    rows = np.asarray(rows, dtype=np.int64)
    user = logs.column("user_id").to_numpy(zero_copy_only=False).astype(np.int64)[rows]
    ts = logs.column("event_ts").to_numpy(zero_copy_only=False).astype("datetime64[us]").astype(np.int64)[rows]
    pin = logs.column("pin_id").to_numpy(zero_copy_only=False).astype(np.int64)[rows]
    order = np.lexsort((rows, ts, user))
    return user[order], pin[order]


def window_counts(users: np.ndarray, items: np.ndarray, n_items: int, windows: Sequence[int]) -> dict:
    """{w: C_w} for every w of ``windows``: symmetric float64 CSR [n_items, n_items] counts of the item pairs
    at most w positions apart in one user's sequence (module docstring). ``users`` / ``items`` (column
    indices in [0, n_items)) are grouped by user in sequence order (``pin_sequences``). One pass: C_w
    accumulates the offsets up to w, and a larger w continues from a smaller one."""
    wanted = sorted({int(w) for w in windows})
    if not wanted or wanted[0] < 1:
        raise ValueError(f"window_counts: windows must be >= 1, got {list(windows)}")
    users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
    acc = sp.csr_matrix((n_items, n_items), dtype=np.float64)
    out, done = {}, 0
    for w in wanted:
        for d in range(done + 1, w + 1):
            if d >= users.size:
                break
            same = (users[d:] == users[:-d]) & (items[d:] != items[:-d])
            a, b = items[:-d][same], items[d:][same]
            both = sp.coo_matrix(
                (np.ones(2 * a.size), (np.concatenate([a, b]), np.concatenate([b, a]))),
                shape=(n_items, n_items),
            )
            acc = (acc + both.tocsr()).tocsr()
        done = w
        out[w] = acc.copy()
    return out


class WindowCooccurrenceScorer:
    """Item-item and user-item scores of windowed co-occurrence counts (module docstring)."""

    def __init__(self, users: np.ndarray, pins: np.ndarray, window: int, counts: sp.csr_matrix | None = None):
        """``users`` / ``pins``: the training events in sequence order (``pin_sequences``); ``counts``: C_w
        when already computed over ``np.unique(pins)`` (``window_counts``), else it is counted here."""
        self.window = int(window)
        self.items, col = np.unique(np.asarray(pins, np.int64), return_inverse=True)
        col = col.reshape(-1)
        self.popularity = np.bincount(col, minlength=self.items.size).astype(np.float64)
        if counts is None:
            counts = window_counts(users, col, self.items.size, [self.window])[self.window]
        if counts.shape != (self.items.size, self.items.size):
            raise ValueError(f"WindowCooccurrenceScorer: counts {counts.shape} for {self.items.size} pins")
        self.counts = counts.tocsr()
        self._tie = self.popularity / (self.popularity.max() + 1.0) if self.items.size else self.popularity

    def _cols(self, entity_type: str, ids) -> np.ndarray:
        """Count index of each id (-1: not a pin with events)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if entity_type != "pin" or self.items.size == 0:
            return np.full(ids.size, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.items, ids), 0, self.items.size - 1)
        return np.where(self.items[pos] == ids, pos, -1)

    def _tie_break(self, cols: np.ndarray) -> np.ndarray:
        out = np.zeros(cols.size, dtype=np.float64)
        out[cols >= 0] = self._tie[cols[cols >= 0]]
        return out

    def score(self, query_type, query_ids, cand_type, cand_ids) -> np.ndarray:
        """[n_q, n_c] C[q, c] plus the popularity tie-break (module docstring)."""
        rows, cols = self._cols(query_type, query_ids), self._cols(cand_type, cand_ids)
        out = np.zeros((rows.size, cols.size), dtype=np.float64)
        kr, kc = np.flatnonzero(rows >= 0), np.flatnonzero(cols >= 0)
        if kr.size and kc.size:
            out[np.ix_(kr, kc)] = self.counts[rows[kr]][:, cols[kc]].toarray()
        return out + self._tie_break(cols)[None, :]

    def score_users(self, histories, cand_type, cand_ids, user_ids=None) -> np.ndarray:
        """[n_u, n_c] sum over each history of C[h_i, c], plus the tie-break."""
        cols = self._cols(cand_type, cand_ids)
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        flat = np.concatenate([np.asarray(h, np.int64) for h in histories]) if len(histories) else np.zeros(0, np.int64)
        hist_cols = self._cols("pin", flat)
        owner = np.repeat(np.arange(len(histories)), lengths)
        found = hist_cols >= 0
        selector = sp.csr_matrix(
            (np.ones(int(found.sum())), (owner[found], hist_cols[found])),
            shape=(len(histories), self.items.size),
        )
        out = np.zeros((len(histories), cols.size), dtype=np.float64)
        kc = np.flatnonzero(cols >= 0)
        if kc.size:
            out[:, kc] = (selector @ self.counts[:, cols[kc]]).toarray()
        return out + self._tie_break(cols)[None, :]
