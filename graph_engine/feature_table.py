"""A day's feature store held in memory as dense arrays (paper 3.4.1 "Featurizer", the fast path).

The RocksDB store (``graph_engine.feature_store``) stays the source of truth. When the decoded store fits a
memory budget, ``open_features`` reads every record once (one sequential scan, decoded by the same compiled
kernel as ``Featurizer``) into ``FeatureArrays`` of N rows plus one all-zero row for missing entities, and
a batch becomes a few vectorised gathers instead of a RocksDB ``multi_get`` per batch:

- ``fetch_nodes(dense)``: rows by the snapshot's dense node index (``node_row``, built once from the
  snapshot's node ids), the path of every in-graph entity;
- ``fetch(type_codes, ids, valid)``: rows by entity key (one ``searchsorted`` per type), the path of
  entities outside the graph; the same contract as ``Featurizer.fetch``.

Over the budget ``open_features`` returns the RocksDB ``Featurizer`` itself: callers use either through the
same ``fetch`` method.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np

from graph_engine.batch import NODE_TYPE_CODE, FeatureArrays
from graph_engine.feature_store import KEY_BYTES, MANIFEST_KEY
from graph_engine.featurizer import DEFAULT_MAX_TOKENS, Featurizer

#: default budget for the in-memory features of one day (decoded arrays)
DEFAULT_MEMORY_BUDGET_MB = 4096


def decoded_bytes(entities: int, max_tokens: int, image_dim: int) -> int:
    """Bytes of the decoded arrays of ``entities`` records (FeatureArrays dtypes)."""
    per_row = 8 * max_tokens + 4 + 4 * image_dim + 1 + 4 + 1
    return int(entities + 1) * per_row


class FeatureTable:
    """In-memory features of one store (module docstring). Rows are in key order; row ``n`` is empty."""

    def __init__(self, arrays: FeatureArrays, type_codes: np.ndarray, ids: np.ndarray, source: Featurizer):
        self.arrays = arrays  # n + 1 rows, the last one all-zero (missing)
        self.type_codes = type_codes
        self.ids = ids
        self.path, self.max_tokens, self.image_dim = source.path, source.max_tokens, source.image_dim
        self.manifest, self.segments = source.manifest, source.segments
        self._sorted_ids = {code: ids[type_codes == code].view(np.uint64) for code in NODE_TYPE_CODE.values()}
        self._first_row = {code: int(np.searchsorted(type_codes, code)) for code in NODE_TYPE_CODE.values()}
        self.node_row: np.ndarray | None = None

    @property
    def missing_row(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self.arrays, f.name).nbytes for f in fields(FeatureArrays))

    @classmethod
    def load(cls, featurizer: Featurizer) -> FeatureTable:
        """Every record of ``featurizer``'s store, decoded (a corrupt record raises as in ``fetch``)."""
        keys, values = [], []
        for k, v in featurizer._store().items():
            if len(k) == KEY_BYTES and k != MANIFEST_KEY:
                keys.append(k)
                values.append(v)
        raw = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES)
        type_codes = raw[:, 0].astype(np.int64)
        ids = raw[:, 1:].copy().view(">i8").reshape(-1).astype(np.int64)
        arrays = featurizer.empty((len(keys) + 1,))
        featurizer._decode(values, keys, np.arange(len(keys), dtype=np.int64), arrays)
        return cls(arrays, type_codes, ids, featurizer)

    def index_nodes(self, node_type: np.ndarray, node_id: np.ndarray) -> FeatureTable:
        """Precomputes the row of every snapshot node (dense index -> row), for ``fetch_nodes``."""
        self.node_row = self.rows(np.asarray(node_type, np.int64), np.asarray(node_id, np.int64))
        return self

    def rows(self, type_codes, ids) -> np.ndarray:
        """Row of each (type code, id); ``missing_row`` where the store has no record."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        codes = np.broadcast_to(np.asarray(type_codes, dtype=np.int64), ids.shape)
        out = np.full(ids.shape, self.missing_row, dtype=np.int64)
        for code, sorted_ids in self._sorted_ids.items():
            sel = np.flatnonzero(codes == code)
            if sel.size == 0 or sorted_ids.size == 0:
                continue
            want = ids[sel].view(np.uint64)
            pos = np.minimum(np.searchsorted(sorted_ids, want), sorted_ids.size - 1)
            hit = sorted_ids[pos] == want
            out[sel[hit]] = self._first_row[code] + pos[hit]
        return out

    def fetch(self, type_codes, ids, valid: np.ndarray | None = None) -> FeatureArrays:
        """As ``Featurizer.fetch``: features in input order, missing (or not ``valid``) rows zero."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        codes = np.broadcast_to(np.asarray(type_codes, dtype=np.int64), ids.shape)
        bad = ~np.isin(codes, list(NODE_TYPE_CODE.values()))
        if valid is not None:
            bad &= np.asarray(valid, dtype=bool).reshape(-1)
        if bad.any():
            raise ValueError(f"FeatureTable.fetch: type code {codes[bad][0]} not in NODE_TYPE_CODE {NODE_TYPE_CODE}")
        rows = self.rows(codes, ids)
        if valid is not None:
            rows = np.where(np.asarray(valid, dtype=bool).reshape(-1), rows, self.missing_row)
        return self.arrays.take(rows)

    def fetch_nodes(self, dense: np.ndarray) -> FeatureArrays:
        """Features of snapshot nodes by dense index (-1 = padding: an all-zero row)."""
        if self.node_row is None:
            raise ValueError("FeatureTable.fetch_nodes: call index_nodes(snapshot.node_type, snapshot.node_id) first")
        dense = np.asarray(dense, dtype=np.int64)
        rows = np.where(dense >= 0, self.node_row[np.maximum(dense, 0)], self.missing_row)
        return self.arrays.take(rows)

    def empty(self, shape: tuple[int, ...]) -> FeatureArrays:
        return FeatureArrays.empty(shape, self.max_tokens, self.image_dim)

    def close(self) -> None:  # the Featurizer interface; nothing to release
        pass


def open_features(
    path: Path | str,
    *,
    max_tokens: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    snapshot=None,
) -> Featurizer | FeatureTable:
    """The day's features: in memory when the decoded store fits ``memory_budget_mb`` (0 = never), else the
    RocksDB ``Featurizer``. With ``snapshot`` the table is indexed by its dense node index."""
    featurizer = Featurizer(path, max_tokens=max_tokens or DEFAULT_MAX_TOKENS)
    entities = int(featurizer.manifest.get("entities", 0))
    need = decoded_bytes(entities, featurizer.max_tokens, featurizer.image_dim)
    if memory_budget_mb <= 0 or need > memory_budget_mb * (1 << 20):
        return featurizer
    table = FeatureTable.load(featurizer)
    featurizer.close()
    if snapshot is not None:
        table.index_nodes(snapshot.node_type, snapshot.node_id)
    return table
