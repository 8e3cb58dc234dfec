"""The validation split: examples carved out of one ``training_examples`` partition's training tables.

Model selection (which step's weights a run keeps) and the registry's promotion gate read this split; the
held-out test sets of paper 4.2.1 (``eval_*`` tables: pairs the graph never saw, users after their cutoff)
are only reported. A row goes to validation by a stateless hash of what it is about - the unordered pair of
entities, the user, the entity - seeded and compared with ``fraction``, so

- every row of one pair (both directions, every source), of one user or of one entity lands on the same
  side: nothing validated on is trained on;
- the split does not depend on the rest of the day's data: the same pairs, users and entities are carved
  out every day, so yesterday's champion never trained on today's validation rows (given the same
  ``fraction`` and ``seed``) and the gate compares both models on data neither has fitted.

The time split (``split="time"``, the default of a training run; ``ml.time_split``) takes the entity-entity
validation pairs from the partition's ``future_pairs`` instead - pairs first engaged in the window's last
days, at most ``fraction`` of the pairs (``time_split_pairs``) - and drops every training pair with the same
unordered ends, so the step kept and the champion promoted are the ones that predict the next engagement
best; users and feature nodes are carved by hash as above.
It falls back to the hash split when the partition has no future pair (``validation.manifest
["validation_split"]`` says which was used).

Validation pairs keep their graph edge (only the test pairs are dropped from the graph); the evaluator
removes the positive from the query's neighbourhood (and the query from the positive's) when it embeds a
pair, as it does for the test pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from graph_engine.batch import NODE_TYPE_CODE
from ml.time_split import without_pairs
from ml.training_examples_reader import TrainingData

_U64 = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (wrapping uint64 arithmetic): a stateless, well-spread 64-bit hash."""
    with np.errstate(over="ignore"):
        z = x.astype(_U64) + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def _node_hash(types: pa.ChunkedArray | pa.Array, ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    names = np.asarray(types.to_numpy(zero_copy_only=False)).astype(str)
    codes = np.full(names.size, 255, dtype=np.int64)
    for name, code in NODE_TYPE_CODE.items():
        codes[names == name] = code
    raw = np.asarray(ids.to_numpy(), dtype=np.int64).view(_U64)
    return _mix(raw ^ (codes.astype(_U64) << _U64(56)))


def _chosen(keys: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """bool mask: the rows whose (seeded) key hash falls below ``fraction`` of the 64-bit range."""
    with np.errstate(over="ignore"):
        h = _mix(keys ^ _mix(np.array([seed], dtype=np.int64).view(_U64)))
    return (h >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53)) < fraction


def _pair_mask(pairs: pa.Table, fraction: float, seed: int) -> np.ndarray:
    q = _node_hash(pairs["query_type"], pairs["query_id"])
    p = _node_hash(pairs["pos_type"], pairs["pos_id"])
    with np.errstate(over="ignore"):
        unordered = _mix(q) + _mix(p)  # commutative: (u, v) and (v, u) share a key
    return _chosen(unordered, fraction, seed)


def _split(table: pa.Table, mask: np.ndarray) -> tuple[pa.Table, pa.Table]:
    keep = pa.array(~mask)
    return table.filter(keep), table.filter(pa.array(mask))


def time_split_pairs(data: TrainingData, fraction: float, seed: int = 0) -> pa.Table:
    """The time split's validation pairs: the partition's ``future_pairs``, at most ``fraction`` of the pairs
    of their sources (engagement, co-engagement) - where there are more (a short window, whose last days hold
    most first engagements), a stateless hash of the unordered pair keeps each with probability ``fraction *
    pairs / future_pairs``, so the split never costs those sources more than the hash split would."""
    future = data.future_pairs
    sources = pc.unique(future["source"])
    total = pc.sum(pc.is_in(data.pairs["source"], value_set=sources).cast(pa.int64())).as_py() or 0
    if future.num_rows <= fraction * total:
        return future
    return future.filter(pa.array(_pair_mask(future, fraction * total / future.num_rows, seed)))


def split_validation(
    data: TrainingData, fraction: float, seed: int = 0, split: Literal["hash", "time"] = "hash"
) -> tuple[TrainingData, TrainingData]:
    """-> (training data without the validation rows, validation data).

    The validation ``TrainingData`` holds the carved rows in its ``eval_*`` tables (what ``ml.evaluator``
    reads) and nothing to train on; both keep the partition's universe, and the manifest says which
    ``validation_split`` was used ("none" for ``fraction`` 0, which carves nothing with either split: the
    validation tables are empty)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction {fraction}: need 0 <= fraction < 1")
    by_time = split == "time" and fraction > 0 and data.future_pairs.num_rows > 0
    users = np.asarray(data.sequences["user_id"].to_numpy(), dtype=np.int64).view(_U64)
    seq_mask = _chosen(_mix(users), fraction, seed + 1)
    fnodes = data.feature_nodes
    node_mask = _chosen(_node_hash(fnodes["entity_type"], fnodes["entity_id"]), fraction, seed + 2)
    if by_time:
        val_pairs = time_split_pairs(data, fraction, seed)
        train_pairs = without_pairs(data.pairs, val_pairs)
    else:
        train_pairs, val_pairs = _split(data.pairs, _pair_mask(data.pairs, fraction, seed))
    train_seqs, val_seqs = _split(data.sequences, seq_mask)
    train_nodes, val_nodes = _split(fnodes, node_mask)
    train = dataclasses.replace(data, pairs=train_pairs, sequences=train_seqs, feature_nodes=train_nodes)
    validation = dataclasses.replace(
        data,
        manifest={**data.manifest, "validation_split": "time" if by_time else "hash" if fraction else "none"},
        pairs=data.pairs.slice(0, 0),
        sequences=data.sequences.slice(0, 0),
        feature_nodes=fnodes.slice(0, 0),
        eval_pairs=val_pairs,
        eval_sequences=val_seqs,
        eval_feature_nodes=val_nodes,
    )
    return train, validation


def validation_counts(validation: TrainingData) -> dict[str, int]:
    """Rows of each task in a validation split (users with a history and a future for user-entity)."""
    seqs = validation.eval_sequences
    users = 0
    if seqs.num_rows:
        has_history = pc.greater(pc.list_value_length(seqs["history"]), 0)
        has_future = pc.greater(pc.list_value_length(seqs["future"]), 0)
        users = int(pc.sum(pc.and_(has_history, has_future).cast(pa.int64())).as_py() or 0)
    return {
        "entity_entity": validation.eval_pairs.num_rows,
        "entity_feature": validation.eval_feature_nodes.num_rows,
        "user_entity": users,
    }


def keep_trained_sources(validation: TrainingData, source_weights: dict[str, float] | None) -> TrainingData:
    """Validation pairs only of the pair sources the run trains on (eq. 2 weight w_i > 0; sources the
    mapping does not name keep the partition's weights): a run that weighs only engagement pairs is selected
    on engagement pairs, not on graph pairs it was told to ignore."""
    if not source_weights:
        return validation
    off = [s for s, w in source_weights.items() if w <= 0]
    if not off:
        return validation
    pairs = validation.eval_pairs
    keep = pc.invert(pc.is_in(pairs["source"], value_set=pa.array(off, pa.string())))
    return dataclasses.replace(validation, eval_pairs=pairs.filter(keep))
