"""Sampling the training steps: training examples (``ml.training_examples``) -> each step's batches for
``ml.train.Trainer``.

    data = load_training_examples(published_dir)                     # ml.training_examples_reader
    factory = make_batch_iterator_factory(data, builder, BatchConfig(batch_size=256, num_random_negatives=256))
    model, result = ml.train.train(model_config, train_config, factory)

``factory(epoch)`` is deterministic for a given (seed, epoch, rank) - the trainer's resume contract - and
yields ``steps_per_epoch`` dicts ``{batch name: PairBatch | FeatureTaskBatch | SequenceBatch}`` with the
same names, in the same order, at every step (DDP needs every rank to run the same tasks):

- ``entity_entity/<t_q>_<t_p>`` one ``PairBatch`` per (query type, positive type) (eq. 2). The step's
  ``batch_size`` pairs are split over the pair sources D_pair^(i) in proportion to their weights w_i
  (largest-remainder rounding, fixed per step), and each source's share is drawn from it uniformly over its
  distinct pairs (the default: the evaluator scores distinct pairs) or, with ``pair_sampling="count"``, in
  proportion to the pairs' ``count`` (an engaged pair seen 5 times is 5 examples, as a co-occurrence count
  weighs it): the step is a sample of eq. 2's weighted sum of per-source expectations. A source's weight is thus realised
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
sampler's log Q = log(M / N) (``ml.batches.UniformNegativeSampler``) for the logQ correction of eq. 1.

Pair neighbourhoods: with ``exclude_pair_edges`` (default) the positive of a GRAPH pair is masked out of
the query's neighbourhood and the query out of the positive's (``ml.inference.exclude_neighbors``), exactly
as the evaluator embeds held-out graph pairs. Graph pairs are drawn FROM the query's neighbourhood, so
without this the model could solve them by spotting its own positive among its neighbours - a shortcut
that does not exist at evaluation time. Engagement pairs keep their edge: it is there because the pair was
engaged, as a repeat engagement of a pair finds it in production (on MovieLens-100k 48 % of the time-split
test pairs were engaged before), and masking it taught the model to ignore co-engagement in N(u).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from dataclasses import fields as dc_fields
from dataclasses import replace as dc_replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from graph_engine.batch import CompactEntityBatch, share_tables
from ml.batches import (
    FeatureTaskBatch,
    PairBatch,
    SequenceBatch,
    UniformNegativeSampler,
    build_entities,
)
from ml.config import TASK_NAMES
from ml.inference import exclude_neighbors
from ml.sequence_ids import dedupe_sequences
from ml.train import dist_info
from ml.training_examples_reader import TrainingData, list_column


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


def padded_histories(
    offsets: np.ndarray, values: np.ndarray, rows: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """(int64 ids [len(rows), T], bool valid [len(rows), T]): each row's LAST ``max_len`` entries,
    left-aligned (T = longest). Any int64 is an id, so the mask - not a value - marks the padding."""
    lo, hi = offsets[rows], offsets[rows + 1]
    lo = np.maximum(lo, hi - max_len)
    lengths = hi - lo
    t = int(lengths.max()) if lengths.size else 0
    out = np.full((len(rows), max(t, 1)), -1, dtype=np.int64)
    valid = np.arange(out.shape[1])[None, :] < lengths[:, None]
    if t:
        out[valid] = values[(lo[:, None] + np.arange(t)[None, :])[valid]]
    return out, valid


# ----------------------------------------------------------------------------------------------------------
# the batch iterator factory
# ----------------------------------------------------------------------------------------------------------
GRAPH_SOURCE_PREFIX = "graph_"  # ml.training_examples.GRAPH_SOURCES


@dataclass
class _PairSource:
    name: str
    query_type: str
    pos_type: str
    query_ids: np.ndarray
    pos_ids: np.ndarray
    weight: float
    cumulative_counts: np.ndarray | None = None  # None: distinct pairs drawn uniformly

    def draw(self, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
        """n pairs (query ids, positive ids), with replacement, in proportion to their counts."""
        if self.cumulative_counts is None:
            pick = rng.integers(0, self.query_ids.size, size=n)
        else:
            pick = np.searchsorted(self.cumulative_counts, rng.random(n) * self.cumulative_counts[-1], side="right")
        return self.query_ids[pick], self.pos_ids[pick]


def _cumulative_counts(t: pa.Table) -> np.ndarray:
    counts = np.asarray(pc.fill_null(t["count"], 1).to_numpy(), dtype=np.float64)
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError("pairs: column 'count' holds negative or non-finite values")
    return np.cumsum(np.maximum(counts, 0.0) if counts.sum() > 0 else np.ones_like(counts))


def _pair_sources(pairs: pa.Table, weights: dict[str, float] | None, by_count: bool = True) -> list[_PairSource]:
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
            _PairSource(
                name,
                qt[0],
                pt[0],
                t["query_id"].to_numpy().astype(np.int64),
                t["pos_id"].to_numpy().astype(np.int64),
                w,
                _cumulative_counts(t) if by_count and "count" in t.column_names else None,
            )
        )
    return out


@dataclass(frozen=True)
class BatchConfig:
    """What a step draws: the options of ``make_batch_iterator_factory``.

    ``source_weights``: w_i per pair source (default: the ``weight`` column). ``feature_batch_size``
    (default ``batch_size``) and ``sequence_batch_size`` (users per step; default ``max(2, batch_size //
    max_sequence_length)``) size the other tasks. ``max_sequence_length`` must not exceed the model's
    ``SequenceConfig.max_len``. ``steps_per_epoch`` defaults to one pass over the training pairs (or the
    largest other task when entity_entity is off). ``compact``: entity batches in the compact form
    (``graph_engine.batch.CompactEntityBatch``). ``pair_sampling``: "uniform" draws a source's distinct pairs
    uniformly, "count" in proportion to their ``count`` column (each engagement one example).
    """

    tasks: Sequence[str] = TASK_NAMES
    batch_size: int = 256
    num_random_negatives: int = 256
    seed: int = 0
    source_weights: dict[str, float] | None = None
    feature_batch_size: int | None = None
    sequence_batch_size: int | None = None
    max_sequence_length: int = 16
    steps_per_epoch: int | None = None
    exclude_pair_edges: bool = True
    compact: bool = True
    pair_sampling: str = "uniform"

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASK_NAMES]
        if unknown:
            raise ValueError(f"BatchConfig: unknown task(s) {unknown}; known: {TASK_NAMES}")
        if self.batch_size < 1 or self.num_random_negatives < 0:
            raise ValueError("BatchConfig: batch_size must be >= 1 and num_random_negatives >= 0")
        if self.pair_sampling not in ("count", "uniform"):
            raise ValueError(f"BatchConfig: pair_sampling must be 'count' or 'uniform', got {self.pair_sampling!r}")


def make_batch_iterator_factory(
    data: TrainingData,
    builder,
    config: BatchConfig | None = None,
    universe: dict[str, np.ndarray] | None = None,
) -> StepBatches:
    """-> a ``StepBatches``: ``factory(epoch, start=0)`` iterates the epoch's batches for ``ml.train.Trainer``.

    ``builder``: a ``graph_engine.batch_builder.BatchBuilder`` of the partition's snapshot and features.
    ``config``: a ``BatchConfig`` (default: its defaults). ``universe``: entity ids per type for the random
    negatives (default: ``data.universe()``).
    """
    c = config or BatchConfig()
    universe = universe if universe is not None else data.universe()
    plan = _StepPlan(
        samplers={t: UniformNegativeSampler(ids) for t, ids in universe.items() if len(ids)},
        num_random_negatives=c.num_random_negatives,
        batch_size=c.batch_size,
        max_sequence_length=c.max_sequence_length,
        exclude_pair_edges=c.exclude_pair_edges,
        compact=c.compact,
    )
    by_count = c.pair_sampling == "count"
    plan.add_pairs(_pair_sources(data.pairs, c.source_weights, by_count) if "entity_entity" in c.tasks else [])
    fnodes = data.feature_nodes if "entity_feature" in c.tasks else data.feature_nodes.slice(0, 0)
    plan.add_feature_nodes(fnodes, c.feature_batch_size or c.batch_size)
    seqs = data.sequences if "user_entity" in c.tasks else data.sequences.slice(0, 0)
    plan.add_sequences(seqs, c.sequence_batch_size or max(2, c.batch_size // max(1, c.max_sequence_length)))
    steps = plan.default_steps(data.pairs.num_rows) if c.steps_per_epoch is None else c.steps_per_epoch
    where = f"{data.path or 'the training data'}"
    return StepBatches(plan, builder, seed=c.seed, steps_per_epoch=steps, tasks=tuple(c.tasks), where=where)


@dataclass
class _StepPlan:
    """What each step draws (sources, allocations, sequences); ``StepBatches`` makes the draws."""

    samplers: dict[str, UniformNegativeSampler]
    num_random_negatives: int
    batch_size: int
    max_sequence_length: int
    exclude_pair_edges: bool
    compact: bool
    sources: list = field(default_factory=list)
    alloc: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    type_pairs: list = field(default_factory=list)
    feat_ids: dict = field(default_factory=dict)
    feat_alloc: dict = field(default_factory=dict)
    seq: tuple | None = None  # (history offsets, values, future offsets, values, kept rows, user ids, users/step)

    def add_pairs(self, sources: list[_PairSource]) -> None:
        self.sources = sources
        if sources:
            self.alloc = allocate(self.batch_size, np.array([s.weight for s in sources]))
        for s, n in zip(sources, self.alloc):
            if n and (s.query_type, s.pos_type) not in self.type_pairs:
                self.type_pairs.append((s.query_type, s.pos_type))

    def add_feature_nodes(self, fnodes: pa.Table, fb: int) -> None:
        feat_ids = {
            t: np.asarray(fnodes.filter(pc.equal(fnodes["entity_type"], t))["entity_id"].to_numpy(), np.int64)
            for t in ("pin", "board")
        }
        self.feat_ids = {t: v for t, v in feat_ids.items() if v.size}
        sizes = np.array([v.size for v in self.feat_ids.values()], np.float64)
        self.feat_alloc = {t: int(n) for t, n in zip(self.feat_ids, allocate(fb, sizes)) if n}

    def add_sequences(self, seqs: pa.Table, users_per_step: int) -> None:
        if not seqs.num_rows:
            return
        h_off, h_val = list_column(seqs, "history")
        f_off, f_val = list_column(seqs, "future")
        keep = np.flatnonzero(np.diff(h_off) >= 2)  # eq. 4 needs at least one (t, t+1) step
        if keep.size:
            user_ids = seqs["user_id"].to_numpy().astype(np.int64)
            self.seq = (h_off, h_val, f_off, f_val, keep, user_ids, users_per_step)

    def default_steps(self, num_pairs: int) -> int:
        sizes = [math.ceil(num_pairs / self.batch_size)] if self.sources else []
        if not sizes:
            sizes = [math.ceil(v.size / max(1, self.feat_alloc.get(t, 1))) for t, v in self.feat_ids.items()]
            sizes += [math.ceil(self.seq[4].size / self.seq[6])] if self.seq else []
        return max([1, *sizes])

    def batch_names(self) -> list[str]:
        return (
            [f"entity_entity/{qt}_{pt}" for qt, pt in self.type_pairs]
            + [f"entity_feature/{t}" for t in self.feat_alloc]
            + (["user_entity"] if self.seq else [])
        )


class StepBatches:
    """The training batches of one partition, keyed: the batch of (seed, epoch, global step index) is drawn
    from ``np.random.default_rng([seed, epoch, index])`` alone, so it is the same whichever process builds
    it, in whatever order - loader workers and DDP ranks build disjoint step indices, and a resumed run
    starts at its step without building the ones before it.

    Rank r of a world of W takes indices ``step * W + r`` of each epoch (``dist_info``)."""

    resumable = True  # ml.train.Trainer passes ``start`` instead of skipping consumed batches

    def __init__(self, plan: _StepPlan, builder, *, seed: int, steps_per_epoch: int, tasks, where: str):
        self.plan, self.builder, self.seed = plan, builder, int(seed)
        self.steps_per_epoch, self.tasks, self.where = int(steps_per_epoch), tasks, where
        self.batch_names = plan.batch_names()

    def shard(self) -> tuple[int, int]:
        rank, world, _ = dist_info()
        return rank, world

    def step_indices(self, start: int = 0) -> range:
        rank, world = self.shard()
        return range(start * world + rank, self.steps_per_epoch * world, world)

    def __call__(self, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        for index in self.step_indices(start):
            yield self.build_step(epoch, index)

    def build_step(self, epoch: int, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        negatives = self._draw_negatives(rng)
        out = self._pair_batches(rng, negatives)
        out.update(self._feature_batches(rng, negatives))
        if self.plan.seq is not None:
            out["user_entity"] = self._sequence_batch(rng, negatives)
        if not out:
            raise ValueError(
                f"make_batch_iterator_factory: no training examples for tasks {list(self.tasks)} in {self.where}"
            )
        return share_step_tables(out) if self.plan.compact else out

    def _draw_negatives(self, rng) -> dict[str, tuple]:
        """One pool of random negatives per entity type and step, shared by every task whose candidates are
        of that type (embedded once; each loss still sees all of them)."""
        p = self.plan
        wanted = {pt for _, pt in p.type_pairs} | set(p.feat_alloc) | ({"pin"} if p.seq else set())
        out = {}
        for t in sorted(wanted):
            if p.num_random_negatives and t in p.samplers:
                ids, log_q = p.samplers[t].sample(p.num_random_negatives, rng)
                out[t] = (self._build(t, ids), log_q)
        return out

    def _build(self, t: str, ids: np.ndarray):
        return build_entities(self.builder, t, ids, self.plan.compact)

    def _pair_batches(self, rng, negatives: dict) -> dict:
        p, out = self.plan, {}
        if not p.type_pairs:
            return out
        parts: dict[tuple, list] = {tp: [] for tp in p.type_pairs}
        for s, n in zip(p.sources, p.alloc):
            if n:
                q, pos = s.draw(int(n), rng)
                masked = p.exclude_pair_edges and s.name.startswith(GRAPH_SOURCE_PREFIX)
                parts[(s.query_type, s.pos_type)].append((q, pos, np.full(q.size, masked)))
        for qt, pt in p.type_pairs:
            q, pos, masked = (np.concatenate(c) for c in zip(*parts[(qt, pt)]))
            qb, pb = self._build(qt, q), self._build(pt, pos)
            if masked.any():
                qb, pb = exclude_neighbors(qb, pos, where=masked), exclude_neighbors(pb, q, where=masked)
            nb, log_q = negatives.get(pt, (None, None))
            out[f"entity_entity/{qt}_{pt}"] = PairBatch(
                query=qb,
                positive=pb,
                random_negatives=nb,
                weights=np.full(q.size, q.size / p.batch_size, dtype=np.float32),
                random_negative_log_q=log_q,
            )
        return out

    def _feature_batches(self, rng, negatives: dict) -> dict:
        p, out = self.plan, {}
        for t, n in p.feat_alloc.items():
            ids = p.feat_ids[t][rng.integers(0, p.feat_ids[t].size, size=int(n))]
            nb, log_q = negatives.get(t, (None, None))
            out[f"entity_feature/{t}"] = FeatureTaskBatch(
                nodes=self._build(t, ids), random_negatives=nb, random_negative_log_q=log_q
            )
        return out

    def _sequence_batch(self, rng, negatives: dict) -> SequenceBatch:
        p = self.plan
        h_off, h_val, f_off, f_val, keep, user_ids, users_per_step = p.seq
        rows = keep[rng.integers(0, keep.size, size=min(users_per_step, keep.size))]
        hist, valid = padded_histories(h_off, h_val, rows, p.max_sequence_length)
        n_fut = f_off[rows + 1] - f_off[rows]
        pick = f_off[rows] + (rng.random(rows.size) * np.maximum(n_fut, 1)).astype(np.int64)
        fut = np.full(rows.size, -1, dtype=np.int64)
        has = n_fut > 0
        fut[has] = f_val[pick[has]]
        nb, log_q = negatives.get("pin", (None, None))
        uniq, index, fut_index = dedupe_sequences(hist, fut, valid=valid, future_valid=has)
        return SequenceBatch(
            entities=self._build("pin", uniq),
            sequence_index=index,
            future_index=fut_index,
            random_negatives=nb,
            random_negative_log_q=log_q,
            user_ids=user_ids[rows],
        )


def share_step_tables(step: dict) -> dict:
    """Every compact entity batch of one type in the step over one shared table (``share_tables``): the
    embedder f_t then encodes each entity's raw features once per step. Identity is kept: a batch object
    used by several tasks (the shared negatives) stays one object."""
    by_type: dict[str, list] = {}
    seen: set[int] = set()
    for batch in step.values():
        for f in dc_fields(batch):
            v = getattr(batch, f.name)
            if isinstance(v, CompactEntityBatch) and id(v) not in seen:
                seen.add(id(v))
                by_type.setdefault(v.entity_type, []).append(v)
    new: dict[int, CompactEntityBatch] = {}
    for group in by_type.values():
        for old, shared in zip(group, share_tables(group)):
            new[id(old)] = shared
    out = {}
    for name, batch in step.items():
        changes = {
            f.name: new[id(getattr(batch, f.name))] for f in dc_fields(batch) if id(getattr(batch, f.name)) in new
        }
        out[name] = dc_replace(batch, **changes)
    return out
