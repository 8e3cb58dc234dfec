"""The quality benchmark's scoring protocol (ml.pair_scoring, ml.quality_protocol): one rule - the one of
ml.metrics.recall_at_k - for embedders and item scorers, every system scored on exactly the same queries and
pools, already-engaged items out of a user's candidates (never the positive), the cold-start slice, the
comparison, and the scorer path agreeing with ml.evaluator.Evaluator on the evaluator's own sets."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from ml.metrics import recall_at_k, recall_at_k_sparse
from ml.pair_scoring import EmbeddingScorer, as_scorer, evaluate_on, pair_hits, user_hits
from ml.quality_protocol import EvaluationSets, cold_mask, compare, recalls, score_system

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Fixed:
    """An item scorer of a fixed [n_items, n_items] matrix over ids 0..n-1 (users: the history's row sum)."""

    def __init__(self, matrix):
        self.m = np.asarray(matrix, dtype=np.float64)

    def score(self, query_type, query_ids, cand_type, cand_ids):
        return self.m[np.ix_(np.asarray(query_ids), np.asarray(cand_ids))]

    def score_users(self, histories, cand_type, cand_ids, user_ids=None):
        return np.stack([self.m[np.asarray(h)].sum(axis=0)[np.asarray(cand_ids)] for h in histories])


class Table:
    """An EntityEmbedder of a fixed table over ids 0..n-1."""

    def __init__(self, vectors):
        self.v = vectors

    def embed(self, entity_type, ids, exclude_neighbor_ids=None):
        return self.v[np.asarray(ids)]


def test_pair_hits_follow_recall_at_k_ties_included():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((60, 8)).astype(np.float32)
    v[7] = v[3]  # an exact tie: a negative with the positive's vector counts against it
    q, p = rng.integers(0, 60, 400), rng.integers(0, 60, 400)
    q[:5], p[:5] = 11, 3
    pool = np.arange(60)
    got = pair_hits(Table(v), ["pin"] * 400, q, ["pin"] * 400, p, {"pin": pool}, k=10)
    key = lambda ids: torch.as_tensor(np.asarray(ids, np.int64) * 4)
    ref = recall_at_k(
        torch.as_tensor(v[q]),
        torch.as_tensor(v[p]),
        torch.as_tensor(v),
        k=10,
        query_keys=key(q),
        positive_keys=key(p),
        negative_keys=key(pool),
    )
    assert np.array_equal(got.hits, ref.hits.numpy()) and np.array_equal(got.outscored, ref.outscored.numpy())
    # the negatives: the pool less the query and the positive (one entity when they are the same)
    assert np.array_equal(got.negatives, 60 - 1 - (q != p))
    counts = sp.random(60, 30, density=0.2, random_state=1, format="csr")
    counts.data = np.round(counts.data * 3) + 1
    got = pair_hits(Table(counts), ["pin"] * 400, q, ["pin"] * 400, p, {"pin": pool}, k=10)
    ref = recall_at_k_sparse(
        counts[q], counts[p], counts, k=10, query_keys=key(q), positive_keys=key(p), negative_keys=key(pool)
    )
    assert np.array_equal(got.outscored, ref.outscored.numpy())


def test_an_item_scorer_and_its_embedding_agree():
    """The same scores as a dot product and as a matrix lookup give the same hits."""
    rng = np.random.default_rng(2)
    v = rng.standard_normal((30, 4))
    q, p = rng.integers(0, 30, 200), rng.integers(0, 30, 200)
    pools = {"pin": np.arange(30)}
    emb = pair_hits(Table(v.astype(np.float32)), ["pin"] * 200, q, ["pin"] * 200, p, pools, k=5)
    f32 = v.astype(np.float32).astype(np.float64)
    item = pair_hits(Fixed(f32 @ f32.T), ["pin"] * 200, q, ["pin"] * 200, p, pools, k=5)
    assert np.array_equal(emb.hits, item.hits)


def test_exclude_history_leaves_engaged_items_out_but_never_the_positive():
    # item 0 is in the history and scores highest; the positive is 2, outscored by 0 and 1 alone
    m = np.zeros((5, 5))
    m[4] = [9, 8, 7, 1, 0]
    histories = [np.array([4, 0]), np.array([4, 2])]
    positives = np.array([2, 2])  # the second user's positive is in their history: it stays a candidate
    plain = user_hits(Fixed(m), histories, positives, np.arange(5), k=2)
    excl = user_hits(Fixed(m), histories, positives, np.arange(5), k=2, exclude_history=True)
    # user 1: history row 4 + row 0 (zeros) -> 0 and 1 outscore 2; with 0 left out only 1 does
    assert plain.outscored.tolist() == [2, 2] and plain.hits.tolist() == [False, False]
    assert excl.outscored.tolist() == [1, 2] and excl.hits.tolist() == [True, False]
    # user 1 leaves out 4 and 0 (and the positive); user 2 leaves out 4 and the positive 2, nothing more
    assert plain.negatives.tolist() == [4, 4] and excl.negatives.tolist() == [2, 3]


def test_cold_mask_and_the_comparison():
    pairs = {
        "query_type": np.array(["pin", "pin", "board"]),
        "query_id": np.array([1, 5, 1]),
        "pos_type": np.array(["pin"] * 3),
        "pos_id": np.array([2, 2, 9]),
    }
    assert cold_mask(pairs, {"pin": np.array([1, 2]), "board": np.array([1])}).tolist() == [False, True, True]
    sets = EvaluationSets(
        k=10,
        pools={"pin": np.arange(10)},
        pairs=pairs,
        pair_users=np.array([7, 7, 8]),
        pair_weights=np.ones(3),
        exclude_pair_edge=False,
        cold=np.array([False, True, True]),
        histories=[],
        user_ids=np.zeros(0),
        next_ids=np.zeros(0),
        future_ids=np.zeros(0),
    )
    out = compare(sets, np.array([1.0, 1.0, 1.0]), {"a": np.array([1, 0, 0]), "b": np.array([1, 1, 0])}, n_boot=100)
    assert out["best_baseline"] == "b" and out["diff"] == pytest.approx(1 / 3)
    assert out["resampled"] == "users" and out["units"] == 2 and len(out["ci95"]) == 2


# ------------------------------------------------------------------------------------ on a tiny pipeline
@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from pipeline_fixtures import build_library_pipeline

    return build_library_pipeline(tmp_path_factory.mktemp("pipe"), scale="tiny", days=3, seed=0)


@pytest.fixture(scope="module")
def evaluator(art):
    from ml.evaluator import Evaluator

    return Evaluator(art.data, art.universe, k=10, pool_size=10_000, seed=0)


class Spy:
    """Records the candidates a scorer was asked about (and whether it scored users)."""

    def __init__(self, inner):
        self.inner, self.candidates, self.queries = inner, set(), set()

    def score(self, query_type, query_ids, cand_type, cand_ids):
        self.queries |= {(query_type, int(i)) for i in query_ids}
        self.candidates |= {(cand_type, int(i)) for i in cand_ids}
        return self.inner.score(query_type, query_ids, cand_type, cand_ids)

    def score_users(self, histories, cand_type, cand_ids, user_ids=None):
        self.candidates |= {(cand_type, int(i)) for i in cand_ids}
        return self.inner.score_users(histories, cand_type, cand_ids, user_ids=user_ids)


class EmbeddingSpy(Spy):
    def pair_scores(self, query_type, query_ids, pos_type, pos_ids, pool):
        self.queries |= {(query_type, int(i)) for i in query_ids}
        self.candidates |= {(pos_type, int(i)) for i in np.concatenate([pool, pos_ids])}
        return self.inner.pair_scores(query_type, query_ids, pos_type, pos_ids, pool)


@pytest.fixture(scope="module")
def systems(art):
    from ml.baselines import (
        AlsEmbedder,
        AlsFitConfig,
        AlsParams,
        CooccurrenceEmbedder,
        PopularityEmbedder,
        build_interaction_matrix,
        random_baseline,
    )
    from ml.content_tfidf import ContentTfidfScorer
    from ml.ease import EaseScorer
    from ml.evaluator import random_embedder
    from ml.item_baselines import TrainingSplit
    from ml.window_cooccurrence import WindowCooccurrenceScorer, pin_sequences

    logs = pa.concat_tables([pq.read_table(d) for d in art.log_dirs])
    split = TrainingSplit.carve(
        logs, art.data.eval_pairs, art.data.eval_sequences["user_id"].to_numpy(), AlsFitConfig()
    )
    matrix = build_interaction_matrix(split.interactions(False), art.universe)
    co, pop = CooccurrenceEmbedder(art.snapshot), PopularityEmbedder(art.snapshot)
    als = AlsEmbedder(matrix, AlsParams(factors=16, iterations=5), num_threads=1)
    fake_model = (
        random_embedder(art.universe, dim=16, seed=5),
        random_baseline(art.universe, dim=16, seed=5)[1],
    )
    return split, {
        "model": fake_model,
        "popularity": (pop, pop),
        "cooccurrence": (co, co),
        "als": (als, als),
        "random": random_baseline(art.universe),
        "window_cooccurrence": WindowCooccurrenceScorer(*pin_sequences(logs, split.rows(False)), window=5),
        "ease": EaseScorer(matrix, 100.0),
        "content_tfidf": ContentTfidfScorer.from_metadata(art.data_root),
    }


def test_every_system_is_scored_on_the_same_queries_and_pool(art, evaluator, systems):
    split, named = systems
    sets = EvaluationSets.from_evaluator(evaluator, split.seen(), exclude_history=True)
    assert sets.pairs["query_id"].size > 0 and sets.histories
    pool = {(t, int(i)) for t, ids in evaluator.pools.items() for i in ids if t in set(sets.pairs["pos_type"])}
    queries = {(str(t), int(i)) for t, i in zip(sets.pairs["query_type"], sets.pairs["query_id"])}
    scored = {}
    for name, system in named.items():
        inner = as_scorer(system)
        spy = (EmbeddingSpy if isinstance(inner, EmbeddingScorer) else Spy)(inner)
        scored[name] = score_system(sets, spy)
        assert pool <= spy.candidates, name  # asked about every pool entity
        assert spy.queries == queries, name
    first = scored["model"]
    for name, s in scored.items():
        for task in ("entity_entity", "user_next", "user_future"):
            got, ref = getattr(s, task), getattr(first, task)
            assert got is not None and got.n == ref.n, (name, task)
            assert np.array_equal(got.negatives, ref.negatives), (name, task)  # the same pool per row
        r = recalls(sets, s)
        assert r["entity_entity"] is not None and r["user_entity"] is not None
    # the users' engaged pins left their pools: fewer negatives than the pool less the positive
    full = evaluator.pools["pin"].size - 1
    assert (first.user_next.negatives <= full).all() and (first.user_next.negatives < full).any()
    # item counts beat chance on the held-out pairs
    chance = recalls(sets, scored["random"])["entity_entity"]
    assert recalls(sets, scored["window_cooccurrence"])["entity_entity"] > 2 * max(chance, 0.01)


def test_the_scorer_path_reports_what_the_evaluator_reports(evaluator, systems):
    """Embedders through ml.pair_scoring give the evaluator's own numbers, breakdowns included."""
    _, named = systems
    tasks = ("entity_entity", "entity_feature", "user_entity")
    for name in ("popularity", "cooccurrence", "random", "als"):
        entity, user = named[name]
        ours = evaluate_on(evaluator, EmbeddingScorer(entity, user), tasks).to_json()
        ref = evaluator.evaluate(entity, user, tasks).to_json()
        assert ours["entity_entity"] == ref["entity_entity"], name
        assert ours["user_entity"] == ref["user_entity"], name
        assert ours["entity_feature"]["recall@10"] is None and ours["entity_feature"]["n"] == 0
    ease = evaluate_on(evaluator, named["ease"], tasks).to_json()
    assert ease["entity_entity"]["n"] == evaluator.pairs["query_id"].size
    assert ease["user_entity"]["n"] == len(evaluator.histories)


def test_the_daily_report_lists_window_cooccurrence_and_ease(art, evaluator, monkeypatch):
    """The recall report's new rows: fitted on the window's logs (evaluation pairs and users out), tuned on
    the split ALS tunes on, scored on the evaluator's sets; EASE skipped with a reason above its cap."""
    from assets.evaluation import RecallReportConfig
    from ml.baselines import AlsFitConfig, carve_validation_pairs, random_baseline
    from ml.recall_report import Candidate, build_report
    from omnisage_pipeline.evaluation import report as day_report
    from omnisage_pipeline.settings import Settings

    settings = Settings(
        home=art.root,
        data_root=art.data_root,
        data_root_is_default=False,
        mlflow_tracking_uri="sqlite:///unused.db",
        engine="duckdb",
        spark_master="local[1]",
        start_date=art.days[0],
        window_days=30,
    )
    monkeypatch.setattr("omnisage_pipeline.partitions.window_keys", lambda day: [d for d in art.days if d <= day])
    config = RecallReportConfig()
    assert {"window_cooccurrence", "ease"} <= set(config.baselines)
    messages: list[str] = []
    day = day_report._ScoredDay(
        settings, art.day, config, art.data, art.universe, art.graph_dir, art.features_dir, messages.append
    )
    window = day_report._baseline("window_cooccurrence", day, None)
    ease = day_report._baseline("ease", day, None)
    assert any(m.startswith("window_cooccurrence: tuned on") for m in messages)
    eval_users = set(art.data.eval_sequences["user_id"].to_pylist())
    logs_users = day.split().logs["user_id"].to_numpy()[day.split().rows(False)]
    assert eval_users and not eval_users & set(logs_users.tolist())
    # the split leaves out every pair the report scores: the held-out pairs and the time split's
    als_split = carve_validation_pairs(day.split().logs, 0.1, 2000, config.seed, day_report.scored_pairs(art.data))
    assert day.split().validation.equals(als_split) and AlsFitConfig().validation_fraction == 0.1
    model = Candidate(*random_baseline(art.universe))
    report = build_report(
        art.day,
        "1",
        evaluator,
        model,
        {"ease": ease, "window_cooccurrence": window, "random": Candidate(*random_baseline(art.universe))},
    )
    assert list(report["baselines"]) == ["random", "window_cooccurrence", "ease"]
    n_pairs = report["tasks"]["entity_entity"]["n"]
    for name in ("window_cooccurrence", "ease"):
        tasks = report["baselines"][name]
        assert tasks["entity_entity"]["n"] == n_pairs and tasks["entity_entity"]["recall@10"] is not None
        assert tasks["user_entity"]["n"] == report["tasks"]["user_entity"]["n"]
        assert {"graph", "engagement", "per_source"} <= set(tasks["entity_entity"])
    monkeypatch.setattr("ml.item_baselines.REPORT_EASE_MAX_ITEMS", 10)
    skipped = day_report._baseline("ease", day, None)
    assert skipped.unavailable.startswith("ease skipped:") and "> 10" in skipped.unavailable
