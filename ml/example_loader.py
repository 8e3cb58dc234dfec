"""Training examples (``ml.training_examples`` output) -> training batches for ``ml.train.Trainer``.

    data = load_training_examples(published_dir)
    factory = make_batch_iterator_factory(data, builder, batch_size=256, num_random_negatives=256)
    model, result = ml.train.train(model_config, train_config, factory)

``factory(epoch)`` is deterministic for a given (seed, epoch, rank) - the trainer's resume contract - and
yields ``steps_per_epoch`` dicts ``{batch name: PairBatch | FeatureTaskBatch | SequenceBatch}`` with the
same names, in the same order, at every step (DDP needs every rank to run the same tasks):

- ``entity_entity/<t_q>_<t_p>`` one ``PairBatch`` per (query type, positive type) (eq. 2). The step's
  ``batch_size`` pairs are split over the pair sources D_pair^(i) in proportion to their weights w_i
  (largest-remainder rounding, fixed per step), and each source's share is drawn uniformly from it: the
  step is a sample of eq. 2's weighted sum of per-source expectations. A source's weight is thus realised
  by SAMPLING, not by loss weights; the per-pair ``weights`` only undo the split into type-pair batches
  (each batch's loss is a mean, so a batch of B_g pairs gets weight B_g / B: the sum over the batches is
  the mean over all B pairs of the step);
- ``entity_feature/<t>`` one ``FeatureTaskBatch`` per node type (eq. 3), sizes in proportion to the
  training feature nodes of each type;
- ``user_entity`` one ``SequenceBatch`` (eqs. 4-5): histories truncated to their last
  ``max_sequence_length`` entries (the model's t_max), one future positive per user drawn uniformly from
  the user's future engagements (eq. 5's t' in (t_max, t_max + Delta]).

Random negatives: ``num_random_negatives`` entities of the positive's type drawn uniformly (with
replacement) from ALL entities of that type in the day's universe (graph nodes + metadata), with the
sampler's log Q = log(M / N) (``ml.data.UniformNegativeSampler``) for the logQ correction of eq. 1.

Pair neighbourhoods: with ``exclude_pair_edges`` (default) the positive is masked out of the query's
neighbourhood and the query out of the positive's (``ml.inference.exclude_neighbors``), exactly as the
evaluator embeds held-out pairs. Graph pairs are drawn FROM the query's neighbourhood, so without this the
model could solve them by spotting its own positive among its neighbours - a shortcut that does not exist
at evaluation time, where the pair's edge is never in the graph.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ml.data import (
    FeatureTaskBatch,
    PairBatch,
    UniformNegativeSampler,
    make_sequence_batch,
)
from ml.training_examples import (
    NODE_SCHEMA,
    OUTPUT_TABLES,
    PAIR_SCHEMA,
    SEQUENCE_SCHEMA,
)

TASKS = ("entity_entity", "entity_feature", "user_entity")
_SCHEMAS = {
    "pairs": PAIR_SCHEMA,
    "eval_pairs": PAIR_SCHEMA,
    "sequences": SEQUENCE_SCHEMA,
    "eval_sequences": SEQUENCE_SCHEMA,
    "feature_nodes": NODE_SCHEMA,
    "eval_feature_nodes": NODE_SCHEMA,
    "universe": NODE_SCHEMA,
}


@dataclass
class TrainingData:
    """One ``training_examples`` partition in memory (Arrow tables; schemas of ml.training_examples)."""

    pairs: pa.Table
    eval_pairs: pa.Table
    sequences: pa.Table
    eval_sequences: pa.Table
    feature_nodes: pa.Table
    eval_feature_nodes: pa.Table
    manifest: dict = field(default_factory=dict)
    universe_table: pa.Table | None = None  # entity_type, entity_id: every pin and board of the day
    path: Path | None = None

    def universe(self) -> dict[str, np.ndarray]:
        """Entity ids per type (sorted) of the day's universe; falls back to every id the tables mention
        when the partition has no ``universe.parquet``."""
        t = self.universe_table
        if t is None or t.num_rows == 0:
            parts = [
                pa.table({"entity_type": x["query_type"], "entity_id": x["query_id"]})
                for x in (self.pairs, self.eval_pairs)
            ]
            parts += [
                pa.table({"entity_type": x["pos_type"], "entity_id": x["pos_id"]})
                for x in (self.pairs, self.eval_pairs)
            ]
            parts += [x.select(["entity_type", "entity_id"]) for x in (self.feature_nodes, self.eval_feature_nodes)]
            t = pa.concat_tables([p.cast(NODE_SCHEMA) for p in parts])
        out = {}
        for name in ("pin", "board"):
            ids = t.filter(pc.equal(t["entity_type"], name))["entity_id"].to_numpy()
            out[name] = np.unique(np.asarray(ids, dtype=np.int64))
        return out

    @property
    def day(self) -> str | None:
        return self.manifest.get("window_end")


def _read(path: Path, name: str, required: bool) -> pa.Table | None:
    f = path / f"{name}.parquet"
    if not f.is_file():
        if required:
            raise FileNotFoundError(f"{f} not found: {path} is not a training_examples partition")
        return None
    t = pq.read_table(f)
    want = _SCHEMAS[name]
    missing = [c for c in want.names if c not in t.column_names]
    if missing:
        raise ValueError(f"{f}: column(s) {missing} missing (expected {want.names})")
    try:
        return t.select(want.names).cast(want)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{f}: columns do not cast to {want}: {exc}") from exc


def load_training_examples(path: Path | str) -> TrainingData:
    """Read a directory written by ``ml.training_examples.build_training_examples``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"training examples directory {path} does not exist")
    tables = {name: _read(path, name, name != "universe") for name in OUTPUT_TABLES}
    mpath = path / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
    return TrainingData(
        pairs=tables["pairs"],
        eval_pairs=tables["eval_pairs"],
        sequences=tables["sequences"],
        eval_sequences=tables["eval_sequences"],
        feature_nodes=tables["feature_nodes"],
        eval_feature_nodes=tables["eval_feature_nodes"],
        manifest=manifest,
        universe_table=tables["universe"],
        path=path,
    )


# ----------------------------------------------------------------------------------------------------------
# sampling helpers (vectorised)
# ----------------------------------------------------------------------------------------------------------
def allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Largest-remainder split of ``total`` into parts proportional to ``weights`` (ties: lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    if total <= 0 or w.sum() <= 0:
        return np.zeros(w.size, dtype=np.int64)
    exact = total * w / w.sum()
    base = np.floor(exact).astype(np.int64)
    rest = total - int(base.sum())
    order = np.lexsort((np.arange(w.size), -(exact - base)))
    base[order[:rest]] += 1
    return base


def list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list<int64> column -> (offsets int64 [n+1], values int64) with nulls as empty lists."""
    col = table[name].combine_chunks() if table.num_rows else pa.array([], pa.list_(pa.int64()))
    col = pc.fill_null(col, pa.scalar([], pa.list_(pa.int64()))) if col.null_count else col
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    offsets = np.asarray(col.offsets.to_numpy(), dtype=np.int64)
    values = np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.int64)
    # a sliced list array has offsets not starting at 0
    return offsets - offsets[0], values[offsets[0] : offsets[-1]] if offsets.size else values


def padded_histories(
    offsets: np.ndarray, values: np.ndarray, rows: np.ndarray, max_len: int
) -> np.ndarray:
    """int64 [len(rows), T] of each row's LAST ``max_len`` entries, left-aligned, -1 padded (T = longest)."""
    lo, hi = offsets[rows], offsets[rows + 1]
    lo = np.maximum(lo, hi - max_len)
    lengths = hi - lo
    t = int(lengths.max()) if lengths.size else 0
    out = np.full((len(rows), max(t, 1)), -1, dtype=np.int64)
    if t:
        pos = np.arange(t)[None, :]
        valid = pos < lengths[:, None]
        out[valid] = values[(lo[:, None] + pos)[valid]]
    return out


# ----------------------------------------------------------------------------------------------------------
# the batch iterator factory
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _PairSource:
    name: str
    query_type: str
    pos_type: str
    query_ids: np.ndarray
    pos_ids: np.ndarray
    weight: float


def _pair_sources(pairs: pa.Table, weights: dict[str, float] | None) -> list[_PairSource]:
    out = []
    if pairs.num_rows == 0:
        return out
    src = pairs["source"]
    for name in sorted(pc.unique(src).to_pylist()):
        t = pairs.filter(pc.equal(src, name))
        qt = pc.unique(t["query_type"]).to_pylist()
        pt = pc.unique(t["pos_type"]).to_pylist()
        if len(qt) != 1 or len(pt) != 1:
            raise ValueError(f"pairs: source {name!r} mixes type pairs {qt} -> {pt}")
        if weights is not None and name in weights:
            w = float(weights[name])
        else:  # w_i as written by training_examples (one value per source)
            w = float(pc.max(t["weight"]).as_py())
        if w <= 0:
            continue
        out.append(
            _PairSource(name, qt[0], pt[0], t["query_id"].to_numpy().astype(np.int64),
                        t["pos_id"].to_numpy().astype(np.int64), w)
        )
    return out


def make_batch_iterator_factory(
    data: TrainingData,
    builder,
    *,
    tasks: Sequence[str] = TASKS,
    batch_size: int = 256,
    num_random_negatives: int = 256,
    seed: int = 0,
    universe: dict[str, np.ndarray] | None = None,
    source_weights: dict[str, float] | None = None,
    feature_batch_size: int | None = None,
    sequence_batch_size: int | None = None,
    max_sequence_length: int = 16,
    steps_per_epoch: int | None = None,
    exclude_pair_edges: bool = True,
) -> Callable[[int], Iterator[dict]]:
    """-> ``factory(epoch)`` for ``ml.train.Trainer`` (module docstring).

    ``builder``: a ``graph_engine.batch_builder.BatchBuilder`` of the partition's snapshot and features.
    ``universe``: entity ids per type for the random negatives (default: ``data.universe()``).
    ``source_weights``: w_i per pair source (default: the ``weight`` column). ``feature_batch_size``
    (default ``batch_size``) and ``sequence_batch_size`` (users per step; default ``max(2, batch_size //
    max_sequence_length)``) size the other tasks. ``max_sequence_length`` must not exceed the model's
    ``SequenceConfig.max_len``. ``steps_per_epoch`` defaults to one pass over the training pairs (or the
    largest other task when entity_entity is off).
    """
    from ml.inference import exclude_neighbors  # local: inference imports this module's helpers

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"make_batch_iterator_factory: unknown task(s) {unknown}; known: {TASKS}")
    if batch_size < 1 or num_random_negatives < 0:
        raise ValueError("make_batch_iterator_factory: batch_size must be >= 1 and num_random_negatives >= 0")
    universe = universe if universe is not None else data.universe()
    samplers = {t: UniformNegativeSampler(ids) for t, ids in universe.items() if len(ids)}

    sources = _pair_sources(data.pairs, source_weights) if "entity_entity" in tasks else []
    alloc = allocate(batch_size, np.array([s.weight for s in sources])) if sources else np.zeros(0, np.int64)
    type_pairs: list[tuple[str, str]] = []
    for s, n in zip(sources, alloc):
        if n and (s.query_type, s.pos_type) not in type_pairs:
            type_pairs.append((s.query_type, s.pos_type))

    fnodes = data.feature_nodes if "entity_feature" in tasks else data.feature_nodes.slice(0, 0)
    feat_ids = {
        t: np.asarray(fnodes.filter(pc.equal(fnodes["entity_type"], t))["entity_id"].to_numpy(), np.int64)
        for t in ("pin", "board")
    }
    feat_ids = {t: v for t, v in feat_ids.items() if v.size}
    fb = feature_batch_size or batch_size
    feat_alloc = dict(zip(feat_ids, allocate(fb, np.array([v.size for v in feat_ids.values()], np.float64))))
    feat_alloc = {t: n for t, n in feat_alloc.items() if n}

    seqs = data.sequences if "user_entity" in tasks else data.sequences.slice(0, 0)
    if seqs.num_rows:
        h_off, h_val = list_column(seqs, "history")
        f_off, f_val = list_column(seqs, "future")
        keep = np.flatnonzero(np.diff(h_off) >= 2)  # eq. 4 needs at least one (t, t+1) step
    else:
        keep = np.zeros(0, np.int64)
    sb = sequence_batch_size or max(2, batch_size // max(1, max_sequence_length))

    if steps_per_epoch is None:
        sizes = [math.ceil(data.pairs.num_rows / batch_size)] if sources else []
        if not sizes:
            sizes = [math.ceil(v.size / max(1, feat_alloc.get(t, 1))) for t, v in feat_ids.items()]
            sizes += [math.ceil(keep.size / sb)] if keep.size else []
        steps_per_epoch = max([1, *sizes])

    def negatives(rng, t: str):
        if num_random_negatives == 0 or t not in samplers:
            return None, None
        ids, log_q = samplers[t].sample(num_random_negatives, rng)
        return builder.build(t, ids), log_q

    def factory(epoch: int = 0) -> Iterator[dict]:
        from ml.train import dist_info

        rank = dist_info()[0]
        rng = np.random.default_rng([seed, epoch, rank])
        for _ in range(steps_per_epoch):
            out: dict = {}
            if type_pairs:
                q_parts: dict[tuple, list] = {tp: [] for tp in type_pairs}
                for s, n in zip(sources, alloc):
                    if n:
                        pick = rng.integers(0, s.query_ids.size, size=int(n))
                        q_parts[(s.query_type, s.pos_type)].append((s.query_ids[pick], s.pos_ids[pick]))
                for qt, pt in type_pairs:
                    q = np.concatenate([a for a, _ in q_parts[(qt, pt)]])
                    p = np.concatenate([b for _, b in q_parts[(qt, pt)]])
                    qb, pb = builder.build(qt, q), builder.build(pt, p)
                    if exclude_pair_edges:
                        qb, pb = exclude_neighbors(qb, p), exclude_neighbors(pb, q)
                    nb, log_q = negatives(rng, pt)
                    out[f"entity_entity/{qt}_{pt}"] = PairBatch(
                        query=qb,
                        positive=pb,
                        random_negatives=nb,
                        weights=np.full(q.size, q.size / batch_size, dtype=np.float32),
                        random_negative_log_q=log_q,
                    )
            for t, n in feat_alloc.items():
                ids = feat_ids[t][rng.integers(0, feat_ids[t].size, size=int(n))]
                nb, log_q = negatives(rng, t)
                out[f"entity_feature/{t}"] = FeatureTaskBatch(
                    nodes=builder.build(t, ids), random_negatives=nb, random_negative_log_q=log_q
                )
            if keep.size:
                rows = keep[rng.integers(0, keep.size, size=min(sb, keep.size))]
                hist = padded_histories(h_off, h_val, rows, max_sequence_length)
                n_fut = f_off[rows + 1] - f_off[rows]
                pick = f_off[rows] + (rng.random(rows.size) * np.maximum(n_fut, 1)).astype(np.int64)
                fut = np.full(rows.size, -1, dtype=np.int64)
                has = n_fut > 0
                fut[has] = f_val[pick[has]]
                neg_ids, log_q = (None, None)
                if num_random_negatives and "pin" in samplers:
                    neg_ids, log_q = samplers["pin"].sample(num_random_negatives, rng)
                out["user_entity"] = make_sequence_batch(
                    builder, "pin", hist, fut, neg_ids, negative_log_q=log_q,
                    user_ids=seqs["user_id"].to_numpy()[rows],
                )
            if not out:
                raise ValueError(
                    f"make_batch_iterator_factory: no training examples for tasks {list(tasks)} in "
                    f"{data.path or 'the training data'}"
                )
            yield out

    factory.steps_per_epoch = steps_per_epoch  # type: ignore[attr-defined]
    factory.batch_names = (  # type: ignore[attr-defined]
        [f"entity_entity/{qt}_{pt}" for qt, pt in type_pairs]
        + [f"entity_feature/{t}" for t in feat_alloc]
        + (["user_entity"] if keep.size else [])
    )
    return factory
