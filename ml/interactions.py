"""Training interactions and engagement pairs from the engagement logs, and the users x items matrix the
item baselines fit on (ALS: ``ml.als``, EASE: ``ml.ease``).

Pairs are compared by unordered pair keys (``_pair_keys``: type code and id of both ends, the smaller end
first), so a held-out pair excludes the events of either direction, as the graph drops the pair's edge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from graph_engine.batch import NODE_TYPE_CODE
from ml.training_examples_reader import list_column

#: Item types of the interaction matrix (its columns: the pins, then the boards).
ALS_ITEM_TYPES = ("pin", "board")
INTERACTION_SCHEMA = pa.schema([("user_id", pa.int64()), ("entity_type", pa.string()), ("entity_id", pa.int64())])
PAIR_COLUMNS = ("query_type", "query_id", "pos_type", "pos_id")


def _pair_keys(types_a, ids_a, types_b, ids_b) -> np.ndarray:
    """[n, 4] int64 unordered pair keys (type code, id) of the smaller end first, so {a, b} == {b, a}."""
    ca = np.array([NODE_TYPE_CODE[t] for t in np.asarray(types_a, dtype=object)], dtype=np.int64).reshape(-1)
    cb = np.array([NODE_TYPE_CODE[t] for t in np.asarray(types_b, dtype=object)], dtype=np.int64).reshape(-1)
    ia, ib = np.asarray(ids_a, np.int64).reshape(-1), np.asarray(ids_b, np.int64).reshape(-1)
    a_first = (ca < cb) | ((ca == cb) & (ia <= ib))
    return np.stack(
        [np.where(a_first, ca, cb), np.where(a_first, ia, ib), np.where(a_first, cb, ca), np.where(a_first, ib, ia)],
        axis=1,
    )


def _rows_in(keys: np.ndarray, of: np.ndarray) -> np.ndarray:
    """bool [len(keys)]: the row of ``keys`` is a row of ``of`` (both [n, 4] int64)."""
    if keys.shape[0] == 0 or of.shape[0] == 0:
        return np.zeros(keys.shape[0], dtype=bool)
    _, inverse = np.unique(np.concatenate([of, keys]), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    return np.isin(inverse[of.shape[0] :], inverse[: of.shape[0]])


def _table_pair_keys(pairs) -> np.ndarray:
    """Pair keys of a table with ``query_type, query_id, pos_type, pos_id`` (``ml.training_examples``' pairs,
    ``eval_pairs``, the MovieLens importer's ``heldout_pairs``)."""
    if pairs is None or pairs.num_rows == 0:
        return np.zeros((0, 4), dtype=np.int64)
    cols = [pairs.column(c).to_numpy(zero_copy_only=False) for c in PAIR_COLUMNS]
    return _pair_keys(*cols)


def _ids_and_mask(column) -> tuple[np.ndarray, np.ndarray]:
    """(int64 ids, bool valid) of a nullable id column: a mask, not a sentinel (any int64 is an id)."""
    ids = pc.fill_null(column, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return ids, pc.is_valid(column).to_numpy(zero_copy_only=False)


def _event_pairs(logs: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The contract's edges of each event (README "Edges"): (pin-pin key, has one, pin-board key, has one)."""
    n = logs.num_rows
    action = np.asarray(logs.column("action").to_numpy(zero_copy_only=False), dtype=object)
    surface = np.asarray(logs.column("surface").to_numpy(zero_copy_only=False), dtype=object)
    pin = logs.column("pin_id").to_numpy(zero_copy_only=False).astype(np.int64)
    query, has_query = _ids_and_mask(logs.column("query_pin_id"))
    board, has_board = _ids_and_mask(logs.column("board_id"))
    pp = (surface == "related_pins") & np.isin(action, ["save", "click"]) & has_query & (query != pin)
    pb = (action == "save") & has_board
    pins = np.full(n, "pin", dtype=object)
    return (_pair_keys(pins, query, pins, pin), pp, _pair_keys(np.full(n, "board", dtype=object), board, pins, pin), pb)


def engagement_pairs_from_logs(logs: pa.Table) -> pa.Table:
    """The distinct engagement pairs of the logs in the pair columns, one row per unordered pair: pin -> pin
    (related-pins saves/clicks; the smaller id is the query) and board -> pin (saves). A validation split is
    carved from these, as the evaluation's engagement pairs are."""
    pp_key, pp, pb_key, pb = _event_pairs(logs)
    pin_pin = np.unique(pp_key[pp], axis=0) if pp.any() else np.zeros((0, 4), np.int64)
    board_pin = np.unique(pb_key[pb], axis=0) if pb.any() else np.zeros((0, 4), np.int64)
    # canonical keys put the pin (code 0) first: a board -> pin pair is (board = end 2, pin = end 1)
    n_pp, n_pb = pin_pin.shape[0], board_pin.shape[0]
    return pa.table(
        {
            "query_type": pa.array(["pin"] * n_pp + ["board"] * n_pb, pa.string()),
            "query_id": pa.array(np.concatenate([pin_pin[:, 1], board_pin[:, 3]]), pa.int64()),
            "pos_type": pa.array(["pin"] * (n_pp + n_pb), pa.string()),
            "pos_id": pa.array(np.concatenate([pin_pin[:, 3], board_pin[:, 1]]), pa.int64()),
        }
    )


def interactions_from_logs(
    logs: pa.Table,
    exclude_pairs: pa.Table | None = None,
    exclude_users: Sequence[int] | np.ndarray | None = None,
) -> pa.Table:
    """(user_id, entity_type, entity_id) rows: each event's pin, and its board when it is a save. An event whose
    pin-pin or pin-board edge is an excluded pair is dropped whole (its user row then holds the two ends only
    through other events), and so is every event of an excluded user (evaluation users are embedded from their
    history, never fitted)."""
    keep = np.ones(logs.num_rows, dtype=bool)
    excluded = _table_pair_keys(exclude_pairs)
    if excluded.shape[0]:
        pp_key, pp, pb_key, pb = _event_pairs(logs)
        keep &= ~(pp & _rows_in(pp_key, excluded)) & ~(pb & _rows_in(pb_key, excluded))
    user = logs.column("user_id").to_numpy(zero_copy_only=False).astype(np.int64)
    if exclude_users is not None and len(exclude_users):
        keep &= ~np.isin(user, np.asarray(exclude_users, dtype=np.int64))
    pin = logs.column("pin_id").to_numpy(zero_copy_only=False).astype(np.int64)[keep]
    board, has_board = (a[keep] for a in _ids_and_mask(logs.column("board_id")))
    is_save = np.asarray(logs.column("action").to_numpy(zero_copy_only=False), dtype=object)[keep] == "save"
    user = user[keep]
    saved = is_save & has_board
    return pa.table(
        {
            "user_id": pa.array(np.concatenate([user, user[saved]]), pa.int64()),
            "entity_type": pa.array(["pin"] * user.size + ["board"] * int(saved.sum()), pa.string()),
            "entity_id": pa.array(np.concatenate([pin, board[saved]]), pa.int64()),
        }
    )


def interactions_from_sequences(sequences: pa.Table) -> pa.Table:
    """(user_id, "pin", pin) rows of ``ml.training_examples`` sequences (history and future of training users)."""
    rows_user, rows_pin = [], []
    for name in ("history", "future"):
        offsets, values = list_column(sequences, name)
        rows_user.append(np.repeat(sequences.column("user_id").to_numpy().astype(np.int64), np.diff(offsets)))
        rows_pin.append(np.asarray(values, np.int64))
    user, pin = np.concatenate(rows_user), np.concatenate(rows_pin)
    return pa.table(
        {
            "user_id": pa.array(user, pa.int64()),
            "entity_type": pa.array(["pin"] * user.size, pa.string()),
            "entity_id": pa.array(pin, pa.int64()),
        }
    )


@dataclass
class InteractionMatrix:
    """users x items counts (float32 CSR); columns are the pins, then the boards, each type sorted by id."""

    matrix: sp.csr_matrix
    user_ids: np.ndarray
    item_ids: dict[str, np.ndarray]

    @property
    def offsets(self) -> dict[str, int]:
        return {"pin": 0, "board": int(self.item_ids["pin"].size)}

    def columns(self, entity_type: str, ids) -> np.ndarray:
        """Column of each (entity_type, id); -1 when the entity has no column."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        known = self.item_ids.get(entity_type, np.zeros(0, np.int64))
        if known.size == 0:
            return np.full(ids.size, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(known, ids), 0, known.size - 1)
        return np.where(known[pos] == ids, pos + self.offsets[entity_type], -1).astype(np.int64)

    def item_rows(self, entity_type: str, ids) -> sp.csr_matrix:
        """[len(ids) is one row] a single row of counts over the columns (for a user's history)."""
        cols = self.columns(entity_type, ids)
        cols = cols[cols >= 0]
        return sp.csr_matrix(
            (np.ones(cols.size, np.float32), (np.zeros(cols.size, np.int64), cols)), shape=(1, self.matrix.shape[1])
        )


def build_interaction_matrix(
    interactions: pa.Table, universe: Mapping[str, np.ndarray] | None = None
) -> InteractionMatrix:
    """Count matrix of ``interactions`` (INTERACTION_SCHEMA rows; repeats add up). ``universe``: extra pin and
    board ids that get a column even without interactions (they embed to the zero-interaction solution)."""
    types = np.asarray(interactions.column("entity_type").to_numpy(zero_copy_only=False), dtype=object)
    ids = interactions.column("entity_id").to_numpy(zero_copy_only=False).astype(np.int64)
    users = interactions.column("user_id").to_numpy(zero_copy_only=False).astype(np.int64)
    unknown = set(np.unique(types).tolist()) - set(ALS_ITEM_TYPES)
    if unknown:
        raise ValueError(f"build_interaction_matrix: entity types {sorted(unknown)}; expected {ALS_ITEM_TYPES}")
    item_ids = {}
    for t in ALS_ITEM_TYPES:
        extra = np.asarray((universe or {}).get(t, np.zeros(0)), dtype=np.int64)
        item_ids[t] = np.unique(np.concatenate([ids[types == t], extra]))
    user_ids = np.unique(users)
    index = InteractionMatrix(sp.csr_matrix((user_ids.size, 0), dtype=np.float32), user_ids, item_ids)
    cols = np.zeros(ids.size, dtype=np.int64)
    for t in ALS_ITEM_TYPES:
        sel = types == t
        cols[sel] = index.columns(t, ids[sel])
    n_items = sum(v.size for v in item_ids.values())
    matrix = sp.coo_matrix(
        (np.ones(ids.size, np.float32), (np.searchsorted(user_ids, users), cols)), shape=(user_ids.size, n_items)
    ).tocsr()
    matrix.sum_duplicates()
    matrix.sort_indices()
    index.matrix = matrix
    return index
