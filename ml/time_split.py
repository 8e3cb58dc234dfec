"""The time split: entity pairs first engaged in the last days of the window, held out of training.

The hash-held-out sets of paper 4.2.1 (``graph_engine.holdout``) ask a model to recover pairs of the same
period as its training data, which rewards reconstructing the graph. What the product needs is the next
engagement: ``training_examples`` therefore also writes ``future_pairs`` - the engagement and co-engagement
pairs whose first event of the window falls in its last ``eval_horizon_days`` (none before, in either
direction). With ``validation_split = "time"`` a training run takes its validation pairs from them (at most
``validation_fraction`` of their sources' pairs: ``ml.validation.time_split_pairs``), drops every training
pair with the same unordered ends (every source: a graph pair drawn over the same edge included), and
selects its step, and the promotion gate compares candidate and champion, on those pairs; the recall report
scores them beside the held-out sets (``omnisage_pipeline.evaluation.report``).

A pair is unordered here as in ``graph_engine.holdout``: (u, v) and (v, u) are one pair.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_KEY = ("_t1", "_i1", "_t2", "_i2")


def _keyed(pairs: pa.Table) -> pa.Table:
    """``pairs`` plus its unordered key: the (type, id) ends in a fixed order (the smaller first)."""
    qt, qi, pt, pi = (pairs[c] for c in ("query_type", "query_id", "pos_type", "pos_id"))
    swap = pc.or_(pc.greater(qt, pt), pc.and_(pc.equal(qt, pt), pc.greater(qi, pi)))
    return (
        pairs.append_column(_KEY[0], pc.if_else(swap, pt, qt))
        .append_column(_KEY[1], pc.if_else(swap, pi, qi))
        .append_column(_KEY[2], pc.if_else(swap, qt, pt))
        .append_column(_KEY[3], pc.if_else(swap, qi, pi))
    )


def without_pairs(pairs: pa.Table, drop: pa.Table) -> pa.Table:
    """The rows of ``pairs`` whose unordered pair is not a pair of ``drop`` (rows keep their order)."""
    if pairs.num_rows == 0 or drop.num_rows == 0:
        return pairs
    keys = _keyed(drop).select(list(_KEY)).group_by(list(_KEY)).aggregate([])
    keyed = _keyed(pairs).append_column("_row", pa.array(np.arange(pairs.num_rows, dtype=np.int64)))
    kept = keyed.join(keys, keys=list(_KEY), join_type="left anti")
    rows = pc.sort_indices(kept["_row"])
    return pairs.take(pc.take(kept["_row"], rows))
