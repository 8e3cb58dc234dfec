"""THE evaluator (paper 4.2.1; contract "Evaluation protocol"): recall@k per task on the held-out sets.

One ``Evaluator`` is built from one ``training_examples`` partition and the day's entity universe; every
embedder evaluated with it - the model, the promotion gate's champion, the report's baselines, the oracle -
sees exactly the same query sets and the same negative pools, so their numbers are comparable and the gate
and the report never disagree.

    ev = Evaluator(data, data.universe(), k=10, pool_size=10_000, seed=0)
    report = ev.evaluate(*model_embedders(model, builder))
    report.to_json()  # {"entity_entity": {"recall@10": x, "n": ..., ...}, "entity_feature": ..., "user_entity": ...}

Negative pool (fixed in ``__init__``): per entity type, ``pool_size`` entities drawn without replacement from
the universe of that type (all of them when fewer) with ``np.random.default_rng(seed)``; the query and the
positive are left out of each query's count by entity key (``ml.metrics.recall_at_k``). recall@k = share of
queries whose positive is outscored (score >= the positive's) by fewer than k pool entities.

Tasks:
- entity_entity (3.3.1): every held-out pair (q, p) - query f_{t_q}(q) against p and the pool of type t_p.
  The query is embedded without p in its neighbourhood and p without q in its own (``exclude_neighbor_ids``):
  the pair's own edge is never in the graph that embeds it. recall = the mean of the graph-pair recall and the
  engagement-pair recall (4.2.1: "the average recall across both the graph neighborhood based pairs and the
  engagement based pairs"), and of the co-engagement pairs' as a third family where they exist (so the many
  windowed pairs do not outweigh the direct engagements), or the ones that exist; ``per_source`` and ``per_segment`` (the positive pin's
  segment) breakdowns alongside.
- entity_feature (3.3.2): held-out feature nodes u; the queries are the entity-feature MLPs' encodings
  g_x(u) of u's own raw x-features (one query per feature type x that u has; training also queries with
  g_x(v) of every sampled neighbour v, each against f(u): ``ml.tasks.entity_feature``), the positive f(u).
  It needs the model's g_x, so an embedder without ``feature_queries`` reports None, n = 0.
  recall = mean over the feature types; ``per_feature`` alongside.
- user_entity (3.3.3): held-out users (disjoint from the training sequences), history before the cutoff,
  U_t at the last history step as the query: next action = the first engagement after the cutoff, future
  action = one later engagement after the cutoff (drawn uniformly with the evaluator's seed; users with one
  future engagement use it). recall = the mean of the two.

A task without examples reports recall None with n = 0 and is left out of ``mean_recall``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from graph_engine.batch import NODE_TYPE_CODE
from ml.config import TASK_NAMES
from ml.losses import entity_key
from ml.metrics import recall_at_k, recall_at_k_sparse
from ml.training_examples_reader import TrainingData, list_column

GRAPH_PREFIX = "graph_"
ENGAGEMENT_PREFIX = "engagement_"


@runtime_checkable
class EntityEmbedder(Protocol):
    def embed(self, entity_type: str, ids: np.ndarray, exclude_neighbor_ids: np.ndarray | None = None) -> np.ndarray:
        """float32 [len(ids), d]; ``exclude_neighbor_ids[i]`` (if given) must not influence row i."""
        ...


@runtime_checkable
class UserEmbedder(Protocol):
    def embed_users(self, histories: list[np.ndarray], user_ids: np.ndarray | None = None) -> np.ndarray:
        """float32 [len(histories), d] in the entity embedding space (``user_ids``: the users, for embedders
        that look users up rather than read their history, e.g. the oracle)."""
        ...


@runtime_checkable
class FeatureQueryEmbedder(Protocol):
    """Optional extra of an ``EntityEmbedder`` (the model): the entity-feature task's queries."""

    def feature_queries(self, entity_type: str, ids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{feature type x: (g_x(u) of u's own x-features, float32 [n, d], u has x bool [n])}."""
        ...


# ----------------------------------------------------------------------------------------------------------
@dataclass
class TaskResult:
    recall: float | None
    n: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self, k: int) -> dict:
        return {f"recall@{k}": self.recall, "n": int(self.n), **self.details}


@dataclass
class EvaluationReport:
    k: int
    pool_sizes: dict[str, int]
    tasks: dict[str, TaskResult]

    @property
    def mean_recall(self) -> float | None:
        vals = [t.recall for t in self.tasks.values() if t.recall is not None]
        return float(np.mean(vals)) if vals else None

    def recall(self, task: str) -> float | None:
        return self.tasks[task].recall if task in self.tasks else None

    def to_json(self) -> dict:
        """The contract's recall.json ``tasks`` shape."""
        return {name: t.to_json(self.k) for name, t in self.tasks.items()}

    def summary(self) -> dict:
        return {
            "k": self.k,
            "mean_recall": self.mean_recall,
            "pool_sizes": dict(self.pool_sizes),
            "tasks": self.to_json(),
        }


def _summary(hits: np.ndarray) -> dict:
    return {"recall": float(hits.mean()) if hits.size else None, "n": int(hits.size)}


def _is_sparse(x) -> bool:
    return hasattr(x, "tocsr") and hasattr(x, "nnz")  # scipy.sparse, without importing scipy here


def _mean_of(parts: Sequence[float | None]) -> float | None:
    vals = [p for p in parts if p is not None]
    return float(np.mean(vals)) if vals else None


# ----------------------------------------------------------------------------------------------------------
class Evaluator:
    def __init__(
        self,
        data: TrainingData,
        universe: dict[str, np.ndarray] | None = None,
        *,
        k: int = 10,
        pool_size: int = 10_000,
        seed: int = 0,
        max_queries: int | None = None,
        chunk_size: int = 1024,
    ):
        """``max_queries``: at most this many queries per task (a fixed random subset, seeded); None = all."""
        if k < 1 or pool_size < 1:
            raise ValueError(f"Evaluator: k={k} and pool_size={pool_size} must be >= 1")
        self.k, self.pool_size, self.seed, self.chunk_size = int(k), int(pool_size), int(seed), chunk_size
        universe = universe if universe is not None else data.universe()
        rng = np.random.default_rng([self.seed, 0])
        self.pools: dict[str, np.ndarray] = {}
        for t in ("pin", "board"):
            ids = np.unique(np.asarray(universe.get(t, np.zeros(0, np.int64)), dtype=np.int64))
            if ids.size > self.pool_size:
                ids = np.sort(rng.choice(ids, size=self.pool_size, replace=False))
            self.pools[t] = ids

        def cap(n: int, stream: int) -> np.ndarray:
            rows = np.arange(n)
            if max_queries is not None and n > max_queries:
                rows = np.sort(np.random.default_rng([self.seed, stream]).choice(n, max_queries, replace=False))
            return rows

        # entity-entity pairs
        ep = data.eval_pairs
        ep = ep.take(pa.array(cap(ep.num_rows, 1)))
        self.pairs = {
            "query_type": np.asarray(ep["query_type"].to_numpy(zero_copy_only=False)).astype(str),
            "query_id": ep["query_id"].to_numpy().astype(np.int64),
            "pos_type": np.asarray(ep["pos_type"].to_numpy(zero_copy_only=False)).astype(str),
            "pos_id": ep["pos_id"].to_numpy().astype(np.int64),
            "source": np.asarray(ep["source"].to_numpy(zero_copy_only=False)).astype(str),
            "segment": np.asarray(pc.fill_null(ep["segment"], "").to_numpy(zero_copy_only=False)).astype(str),
        }
        # entity-feature nodes
        fn = data.eval_feature_nodes
        fn = fn.take(pa.array(cap(fn.num_rows, 2)))
        self.feature_nodes = {
            "entity_type": np.asarray(fn["entity_type"].to_numpy(zero_copy_only=False)).astype(str),
            "entity_id": fn["entity_id"].to_numpy().astype(np.int64),
        }
        # user sequences: users with a history and at least one future engagement
        es = data.eval_sequences
        if es.num_rows:
            h_off, h_val = list_column(es, "history")
            f_off, f_val = list_column(es, "future")
            ok = np.flatnonzero((np.diff(h_off) > 0) & (np.diff(f_off) > 0))
        else:
            h_off = f_off = np.zeros(1, np.int64)
            h_val = f_val = np.zeros(0, np.int64)
            ok = np.zeros(0, np.int64)
        ok = ok[cap(ok.size, 3)]
        self.user_ids = es["user_id"].to_numpy()[ok] if es.num_rows else np.zeros(0, np.int64)
        self.histories = [h_val[h_off[r] : h_off[r + 1]] for r in ok]
        n_fut = f_off[ok + 1] - f_off[ok]
        self.next_ids = f_val[f_off[ok]] if ok.size else np.zeros(0, np.int64)
        # future action: one of the later engagements (index >= 1) when there is one, else the only one
        later = np.maximum(n_fut - 1, 0)
        draw = 1 + (np.random.default_rng([self.seed, 4]).random(ok.size) * np.maximum(later, 1)).astype(np.int64)
        self.future_ids = f_val[f_off[ok] + np.where(later > 0, draw, 0)] if ok.size else np.zeros(0, np.int64)

    # ------------------------------------------------------------------------------------------------
    def _recall(self, query, positive, pos_type: str, pool_emb, query_keys, positive_keys) -> np.ndarray:
        neg_keys = entity_key(NODE_TYPE_CODE[pos_type], torch.as_tensor(self.pools[pos_type]))
        if _is_sparse(query):  # count-valued baselines (ml.baselines.CooccurrenceEmbedder)
            r = recall_at_k_sparse(
                query,
                positive,
                pool_emb,
                k=self.k,
                query_keys=query_keys,
                positive_keys=positive_keys,
                negative_keys=neg_keys,
                chunk_size=self.chunk_size,
            )
            return r.hits.numpy().astype(bool)
        r = recall_at_k(
            torch.as_tensor(np.ascontiguousarray(query, dtype=np.float32)),
            torch.as_tensor(np.ascontiguousarray(positive, dtype=np.float32)),
            torch.as_tensor(np.ascontiguousarray(pool_emb, dtype=np.float32)),
            k=self.k,
            query_keys=query_keys,
            positive_keys=positive_keys,
            negative_keys=neg_keys,
            chunk_size=self.chunk_size,
        )
        return r.hits.numpy().astype(bool)

    def _pool(self, embedder: EntityEmbedder, t: str, cache: dict) -> np.ndarray:
        if t not in cache:
            emb = embedder.embed(t, self.pools[t])
            cache[t] = emb if _is_sparse(emb) else np.asarray(emb, dtype=np.float32)
        return cache[t]

    def evaluate(
        self,
        embedder: EntityEmbedder,
        user_embedder: UserEmbedder | None = None,
        tasks: Sequence[str] = TASK_NAMES,
    ) -> EvaluationReport:
        unknown = [t for t in tasks if t not in TASK_NAMES]
        if unknown:
            raise ValueError(f"Evaluator.evaluate: unknown task(s) {unknown}; known: {TASK_NAMES}")
        cache: dict[str, np.ndarray] = {}
        out: dict[str, TaskResult] = {}
        if "entity_entity" in tasks:
            out["entity_entity"] = self._entity_entity(embedder, cache)
        if "entity_feature" in tasks:
            out["entity_feature"] = self._entity_feature(embedder, cache)
        if "user_entity" in tasks:
            out["user_entity"] = self._user_entity(embedder, user_embedder, cache)
        return EvaluationReport(self.k, {t: int(v.size) for t, v in self.pools.items()}, out)

    # ------------------------------------------------------------------------------------------------
    def _entity_entity(self, embedder: EntityEmbedder, cache: dict) -> TaskResult:
        p = self.pairs
        n = p["query_id"].size
        if n == 0:
            return TaskResult(None, 0)
        hits = np.zeros(n, dtype=bool)
        for qt in np.unique(p["query_type"]):
            for pt in np.unique(p["pos_type"]):
                rows = np.flatnonzero((p["query_type"] == qt) & (p["pos_type"] == pt))
                if rows.size == 0:
                    continue
                if self.pools.get(pt, np.zeros(0)).size == 0:
                    raise ValueError(f"Evaluator: the universe has no {pt!r} entity for the negative pool")
                qid, pid = p["query_id"][rows], p["pos_id"][rows]
                q = embedder.embed(qt, qid, exclude_neighbor_ids=pid)
                pos = embedder.embed(pt, pid, exclude_neighbor_ids=qid)
                hits[rows] = self._recall(
                    q,
                    pos,
                    pt,
                    self._pool(embedder, pt, cache),
                    entity_key(NODE_TYPE_CODE[qt], torch.as_tensor(qid)),
                    entity_key(NODE_TYPE_CODE[pt], torch.as_tensor(pid)),
                )
        src, seg = p["source"], p["segment"]
        per_source = {s: _summary(hits[src == s]) for s in np.unique(src)}
        per_segment = {s: _summary(hits[seg == s]) for s in np.unique(seg) if s}
        graph = _summary(hits[np.char.startswith(src, GRAPH_PREFIX)])
        engagement = _summary(hits[np.char.startswith(src, ENGAGEMENT_PREFIX)])
        other = ~(np.char.startswith(src, GRAPH_PREFIX) | np.char.startswith(src, ENGAGEMENT_PREFIX))
        parts = [graph["recall"], engagement["recall"]]
        if other.any():  # a source of another family counts as its own group
            parts.append(float(hits[other].mean()))
        recall = _mean_of(parts)
        return TaskResult(
            recall,
            n,
            {
                "graph": graph,
                "engagement": engagement,
                "pooled": _summary(hits),
                "per_source": per_source,
                "per_segment": per_segment,
            },
        )

    def _entity_feature(self, embedder: EntityEmbedder, cache: dict) -> TaskResult:
        fq = getattr(embedder, "feature_queries", None)
        f = self.feature_nodes
        if fq is None or f["entity_id"].size == 0:
            return TaskResult(None, 0, {"reason": "no g_x encoders" if fq is None else "no evaluation nodes"})
        per_feature: dict[str, list[np.ndarray]] = {}
        for t in np.unique(f["entity_type"]):
            ids = f["entity_id"][f["entity_type"] == t]
            if self.pools.get(t, np.zeros(0)).size == 0:
                continue
            pos = embedder.embed(t, ids)
            keys = entity_key(NODE_TYPE_CODE[t], torch.as_tensor(ids))
            for x, (q, avail) in fq(t, ids).items():
                avail = np.asarray(avail, dtype=bool)
                if not avail.any():
                    continue
                h = self._recall(q[avail], pos[avail], t, self._pool(embedder, t, cache), keys[avail], keys[avail])
                per_feature.setdefault(x, []).append(h)
        details = {x: _summary(np.concatenate(h)) for x, h in per_feature.items()}
        n = int(sum(d["n"] for d in details.values()))
        return TaskResult(_mean_of([d["recall"] for d in details.values()]), n, {"per_feature": details})

    def _user_entity(self, emb: EntityEmbedder, user_embedder: UserEmbedder | None, cache: dict) -> TaskResult:
        if user_embedder is None or len(self.histories) == 0:
            return TaskResult(
                None, 0, {"reason": "no user embedder" if user_embedder is None else "no evaluation users"}
            )
        if self.pools.get("pin", np.zeros(0)).size == 0:
            return TaskResult(None, 0, {"reason": "no pins in the universe"})
        users = user_embedder.embed_users(self.histories, user_ids=self.user_ids)
        users = users if _is_sparse(users) else np.asarray(users, dtype=np.float32)
        pin_pool = self._pool(emb, "pin", cache)
        parts = {}
        for name, ids in (("next", self.next_ids), ("future", self.future_ids)):
            pos = emb.embed("pin", ids)
            hits = self._recall(
                users, pos, "pin", pin_pool, None, entity_key(NODE_TYPE_CODE["pin"], torch.as_tensor(ids))
            )
            parts[name] = _summary(hits)
        return TaskResult(_mean_of([v["recall"] for v in parts.values()]), len(self.histories), parts)


def evaluate(
    evaluator: Evaluator,
    embedder: EntityEmbedder,
    user_embedder: UserEmbedder | None = None,
    tasks: Sequence[str] = TASK_NAMES,
) -> EvaluationReport:
    return evaluator.evaluate(embedder, user_embedder, tasks)


# ----------------------------------------------------------------------------------------------------------
class ModelEntityEmbedder:
    """``EntityEmbedder`` (+ ``feature_queries``) of an ``OmniSageModel`` over a ``BatchBuilder``."""

    def __init__(self, model, builder, batch_size: int = 512):
        self.model, self.builder, self.batch_size = model, builder, batch_size

    def embed(self, entity_type, ids, exclude_neighbor_ids=None) -> np.ndarray:
        from ml.inference import embed_entities

        return embed_entities(
            self.model,
            self.builder,
            entity_type,
            ids,
            batch_size=self.batch_size,
            exclude_neighbor_ids=exclude_neighbor_ids,
        )

    def feature_queries(self, entity_type, ids) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{x: (g_x(u) of u's own raw x-features, u has x)}: the per-node reading of eq. 3 that training
        uses (``EntityFeatureTask.queries``); the neighbours' queries g_x(v) are training-only."""
        from ml.batches import build_entities
        from ml.entity_tensors import as_entity_tensors
        from ml.inference import _EvalMode

        task = self.model.tasks["entity_feature"] if "entity_feature" in self.model.tasks else None  # noqa: SIM401
        if task is None:
            return {}
        ids = np.asarray(ids, dtype=np.int64)
        out: dict[str, tuple[list, list]] = {}
        with _EvalMode(self.model), torch.no_grad():
            for lo in range(0, ids.size, self.batch_size):
                # compact: the queries read the nodes' own rows only, not B x K neighbour copies
                batch = build_entities(self.builder, entity_type, ids[lo : lo + self.batch_size])
                t = as_entity_tensors(batch, self.model.device)
                for x, (q, avail) in task.queries(t).items():
                    qs, av = out.setdefault(x, ([], []))
                    qs.append(q.float().cpu().numpy())
                    av.append(avail.cpu().numpy())
        return {x: (np.concatenate(q), np.concatenate(a)) for x, (q, a) in out.items()}


class ModelUserEmbedder:
    def __init__(self, model, builder, batch_size: int = 256):
        self.model, self.builder, self.batch_size = model, builder, batch_size

    def embed_users(self, histories, user_ids=None) -> np.ndarray:
        from ml.inference import embed_users

        # an empty item table: every distinct history item is embedded once (one ``embed_entities`` pass
        # with its feature cache), not once per batch of users that holds it
        no_items = (np.zeros(0, np.int64), np.zeros((0, self.model.config.out_dim), np.float32))
        return embed_users(self.model, self.builder, histories, batch_size=self.batch_size, item_table=no_items)


def model_embedders(model, builder, batch_size: int = 512) -> tuple[ModelEntityEmbedder, ModelUserEmbedder | None]:
    """(EntityEmbedder, UserEmbedder or None when the model has no user-entity task) of a trained model."""
    ent = ModelEntityEmbedder(model, builder, batch_size)
    usr = ModelUserEmbedder(model, builder, batch_size) if "user_entity" in model.tasks else None
    return ent, usr


# ----------------------------------------------------------------------------------------------------------
class TableEmbedder:
    """An ``EntityEmbedder`` that looks vectors up in a table: precomputed embeddings (``embeddings/dt=D``),
    the generator's planted latents (the oracle), or random vectors. Ids missing from the table get a zero
    vector (score 0 against everything). ``exclude_neighbor_ids`` is ignored: a table has no graph."""

    def __init__(self, tables: dict[str, tuple[np.ndarray, np.ndarray]], normalize: bool = True):
        self.tables = {}
        for t, (ids, vecs) in tables.items():
            ids = np.asarray(ids, dtype=np.int64)
            vecs = np.asarray(vecs, dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape[0] != ids.size:
                raise ValueError(f"TableEmbedder: {t!r} has {ids.size} ids but vectors of shape {vecs.shape}")
            if normalize:
                vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            order = np.argsort(ids, kind="stable")
            self.tables[t] = (ids[order], vecs[order])
        self.dim = next(iter(self.tables.values()))[1].shape[1] if self.tables else 0

    def embed(self, entity_type, ids, exclude_neighbor_ids=None) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if entity_type not in self.tables:
            return np.zeros((ids.size, self.dim), dtype=np.float32)
        table_ids, vecs = self.tables[entity_type]
        pos = np.clip(np.searchsorted(table_ids, ids), 0, max(table_ids.size - 1, 0))
        found = (table_ids[pos] == ids) if table_ids.size else np.zeros(ids.size, bool)
        out = np.zeros((ids.size, self.dim), dtype=np.float32)
        out[found] = vecs[pos[found]]
        return out


def random_embedder(universe: dict[str, np.ndarray], dim: int = 32, seed: int = 0) -> TableEmbedder:
    """The random-embedding baseline: an independent Gaussian unit vector per entity (its recall@k is the
    chance level, about k / (pool + 1))."""
    rng = np.random.default_rng(seed)
    return TableEmbedder(
        {t: (ids, rng.standard_normal((len(ids), dim)).astype(np.float32)) for t, ids in universe.items()}
    )
