"""The ALS baseline (ml.baselines.AlsEmbedder, implicit): it recovers planted co-engagement far above chance,
the matrix keeps held-out pairs and evaluation users out, tuning picks on validation pairs, and the embedder
API (ids, shapes, unknown entities, users from histories) is what the evaluator expects."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from ml.baselines import (
    AlsEmbedder,
    AlsFitConfig,
    AlsParams,
    build_interaction_matrix,
    carve_validation_pairs,
    engagement_pairs_from_logs,
    fit_als_baseline,
    interactions_from_logs,
    interactions_from_sequences,
    pair_recall,
    tune_als,
)
from omnisage_pipeline.contract.validation import LOG_SCHEMA

PIN0, BOARD0, USER0 = 1_000_000_000, 2_000_000_000, 3_000_000_000
CLUSTERS, PINS_PER_CLUSTER, USERS, PER_USER = 10, 10, 200, 6  # 9 cluster mates < k: recall can reach 1
FAST = AlsParams(factors=16, regularization=0.1, alpha=10.0, iterations=10)


def planted_logs(seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Each user engages PER_USER pins of one cluster in a row (related-pins, query = previous pin) and saves
    every other one to the user's board; one random pin of any cluster is noise. Returns (logs, pin cluster)."""
    rng = np.random.default_rng(seed)
    cluster_of = np.repeat(np.arange(CLUSTERS), PINS_PER_CLUSTER)
    rows = []
    for u in range(USERS):
        c = u % CLUSTERS
        pins = rng.choice(np.flatnonzero(cluster_of == c), PER_USER, replace=False).tolist()
        pins.insert(int(rng.integers(PER_USER)), int(rng.integers(cluster_of.size)))
        prev = None
        for i, p in enumerate(pins):
            save = i % 2 == 0
            rows.append(
                {
                    "event_ts": 1_700_000_000_000_000 + u * 1_000 + i,
                    "user_id": USER0 + u,
                    "action": "save" if save else "click",
                    "surface": "related_pins" if prev is not None else "homefeed",
                    "pin_id": PIN0 + p,
                    "board_id": BOARD0 + u if save else None,
                    "query_pin_id": None if prev is None else PIN0 + prev,
                }
            )
            prev = p
    for r in rows:
        r["event_ts"] = datetime.fromtimestamp(r["event_ts"] / 1e6, tz=UTC)
    return pa.Table.from_pylist(rows, schema=LOG_SCHEMA), cluster_of


def same_cluster_pairs(cluster_of: np.ndarray, n: int = 300, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    q = rng.integers(cluster_of.size, size=n)
    p = np.array(
        [rng.choice(np.flatnonzero((cluster_of == cluster_of[i]) & (np.arange(cluster_of.size) != i))) for i in q]
    )
    return pa.table({"query_type": ["pin"] * n, "query_id": PIN0 + q, "pos_type": ["pin"] * n, "pos_id": PIN0 + p})


@pytest.fixture(scope="module")
def planted():
    logs, cluster_of = planted_logs()
    return logs, cluster_of, build_interaction_matrix(interactions_from_logs(logs))


def test_als_recovers_planted_co_engagement(planted):
    _, cluster_of, matrix = planted
    als = AlsEmbedder(matrix, FAST, num_threads=1)
    pairs = same_cluster_pairs(cluster_of)
    recall = pair_recall(als, pairs, k=10)
    chance = 10 / (cluster_of.size - 1)
    assert recall > 0.6 and recall > 5 * chance, recall
    # users: a history from one cluster ranks that cluster's pins on top
    hist = [PIN0 + np.flatnonzero(cluster_of == c)[:4] for c in range(CLUSTERS)]
    users = als.embed_users(hist)
    scores = users @ als.embed("pin", PIN0 + np.arange(cluster_of.size)).T
    top = np.argsort(-scores, axis=1)[:, :10]
    assert np.mean(cluster_of[top] == np.arange(CLUSTERS)[:, None]) > 0.8


def test_embedder_api_shapes_ids_and_unknowns(planted):
    _, cluster_of, matrix = planted
    als = AlsEmbedder(matrix, FAST, num_threads=1)
    pins = als.embed("pin", [PIN0 + 3, PIN0 + 999_999, PIN0 + 3])
    assert pins.shape == (3, 16) and pins.dtype == np.float32
    assert np.array_equal(pins[0], pins[2]) and not pins[1].any()  # the same id twice; an unknown id is zero
    assert np.array_equal(pins[0], als.item_vectors[matrix.columns("pin", [PIN0 + 3])[0]])
    boards = als.embed("board", np.array([BOARD0, BOARD0 + 1]))
    assert boards.shape == (2, 16) and boards.any(axis=1).all()
    assert not als.embed("board", [PIN0 + 3]).any()  # a pin id is not a board
    assert als.embed("pin", np.zeros(0, np.int64)).shape == (0, 16)
    # exclude_neighbor_ids changes nothing: held-out pairs are removed from the matrix before fitting
    assert np.array_equal(als.embed("pin", [PIN0 + 3], exclude_neighbor_ids=[PIN0 + 4]), pins[:1])
    users = als.embed_users(
        [np.array([PIN0 + 1, PIN0 + 2]), np.zeros(0, np.int64), np.array([PIN0 + 999_999])],
        user_ids=np.array([1, 2, 3]),
    )
    assert users.shape == (3, 16) and users.dtype == np.float32
    assert users[0].any() and not users[1].any() and not users[2].any()  # empty / unknown history: zero
    assert als.embed_users([]).shape == (0, 16)
    assert als.model.num_threads == 1
    # the matrix: pins, then boards, counts of repeats
    assert matrix.matrix.shape == (USERS, cluster_of.size + USERS)
    assert matrix.columns("board", [BOARD0])[0] == cluster_of.size


def test_heldout_pairs_and_users_are_kept_out_of_the_matrix(planted):
    logs, _, _ = planted
    first = logs.slice(1, 1).to_pylist()[0]  # user 0's second event: related-pins, query = its first pin
    pin_pin = pa.table(
        {"query_type": ["pin"], "query_id": [first["query_pin_id"]], "pos_type": ["pin"], "pos_id": [first["pin_id"]]}
    )
    save = logs.slice(0, 1).to_pylist()[0]
    board_pin = pa.table(
        {"query_type": ["board"], "query_id": [save["board_id"]], "pos_type": ["pin"], "pos_id": [save["pin_id"]]}
    )
    full = interactions_from_logs(logs)
    events = logs.to_pylist()
    assert full.num_rows == len(events) + sum(e["action"] == "save" for e in events)

    def rows_of(pred):  # interactions of the events that create the pair: the pin, and the board of a save
        return sum(1 + (e["action"] == "save") for e in events if pred(e))

    pp = {first["query_pin_id"], first["pin_id"]}
    makes_pp = rows_of(lambda e: e["surface"] == "related_pins" and {e["query_pin_id"], e["pin_id"]} == pp)
    makes_pb = rows_of(
        lambda e: e["action"] == "save" and (e["board_id"], e["pin_id"]) == (save["board_id"], save["pin_id"])
    )
    assert makes_pp >= 1 and makes_pb == 2
    reversed_pair = pin_pin.select(["pos_type", "pos_id", "query_type", "query_id"]).rename_columns(
        ["query_type", "query_id", "pos_type", "pos_id"]
    )  # an unordered pair: either direction
    for excluded, lost in ((pin_pin, makes_pp), (reversed_pair, makes_pp), (board_pin, makes_pb)):
        assert full.num_rows - interactions_from_logs(logs, exclude_pairs=excluded).num_rows == lost
    no_user = interactions_from_logs(logs, exclude_users=[USER0])
    assert USER0 not in set(no_user["user_id"].to_pylist())
    m = build_interaction_matrix(interactions_from_logs(logs, exclude_pairs=pin_pin))
    u0 = np.searchsorted(m.user_ids, USER0)
    # the clicked pin of the dropped event is gone from user 0's row unless another event of user 0 holds it
    others = [e for e in events if e["user_id"] == USER0 and e["pin_id"] == first["pin_id"]]
    assert (m.matrix[u0, m.columns("pin", [first["pin_id"]])[0]] > 0) == (len(others) > 1)


def test_engagement_pairs_and_validation_carving(planted):
    logs, _, _ = planted
    pairs = engagement_pairs_from_logs(logs)
    kinds = set(zip(pairs["query_type"].to_pylist(), pairs["pos_type"].to_pylist()))
    assert kinds == {("pin", "pin"), ("board", "pin")}
    pp = pairs.filter(pa.compute.equal(pairs["query_type"], "pin"))
    assert all(q < p for q, p in zip(pp["query_id"].to_pylist(), pp["pos_id"].to_pylist()))
    val = carve_validation_pairs(logs, fraction=0.2, max_pairs=50, seed=3, types=[("pin", "pin")])
    assert val.num_rows == 50 and set(val["query_type"].to_pylist()) == {"pin"}
    assert carve_validation_pairs(logs, 0.2, 50, seed=3, types=[("pin", "pin")]).equals(val)  # seeded
    rest = carve_validation_pairs(logs, 1.0, 10**6, exclude_pairs=val)
    assert rest.num_rows == pairs.num_rows - 50


def test_tune_als_picks_on_validation_and_the_protocol_refits(planted):
    logs, cluster_of, matrix = planted
    grid = {"factors": [1, 16], "regularization": [0.1], "alpha": [10.0], "iterations": [10]}
    tuning = tune_als(matrix, same_cluster_pairs(cluster_of, seed=5), grid, num_threads=1)
    assert [r["factors"] for r in tuning.results] == [1, 16]
    assert tuning.best["factors"] == 16 and tuning.best_recall == max(r["recall@10"] for r in tuning.results)
    heldout = same_cluster_pairs(cluster_of, n=100, seed=9)
    fit = AlsFitConfig(
        grid=grid, validation_fraction=0.2, max_validation_pairs=200, validation_types=[("pin", "pin")], num_threads=1
    )
    als, fitted = fit_als_baseline(logs, exclude_pairs=heldout, config=fit)
    assert 0 < fitted.validation_pairs <= 200 and fitted.best["factors"] == 16
    assert als.params["factors"] == 16 and als.index.matrix.nnz > 0
    assert pair_recall(als, heldout) > 0.5


def test_sequences_give_user_pin_interactions():
    seq = pa.table(
        {
            "user_id": pa.array([USER0, USER0 + 1], pa.int64()),
            "history": pa.array([[PIN0, PIN0 + 1], [PIN0 + 2]], pa.list_(pa.int64())),
            "future": pa.array([[PIN0 + 1], []], pa.list_(pa.int64())),
        }
    )
    m = build_interaction_matrix(interactions_from_sequences(seq), universe={"pin": np.array([PIN0 + 7])})
    assert m.matrix.shape == (2, 4)  # pins 0, 1, 2 and the universe's 7; no boards
    assert m.matrix[0, m.columns("pin", [PIN0 + 1])[0]] == 2  # history + future: counts add up
    assert m.matrix[:, m.columns("pin", [PIN0 + 7])[0]].sum() == 0


def test_the_evaluator_scores_als_like_any_embedder(planted):
    from ml.evaluator import Evaluator
    from ml.training_examples import NODE_SCHEMA, PAIR_SCHEMA, SEQUENCE_SCHEMA
    from ml.training_examples_reader import TrainingData

    _, cluster_of, matrix = planted
    als = AlsEmbedder(matrix, FAST, num_threads=1)
    pairs = same_cluster_pairs(cluster_of, n=200, seed=11)
    n = pairs.num_rows
    eval_pairs = pa.table(
        {
            **{c: pairs[c] for c in pairs.column_names},
            "source": ["engagement_pin_pin"] * n,
            "segment": pa.nulls(n, pa.string()),
            "weight": pa.array([1.0] * n, pa.float32()),
            "count": pa.array([1] * n, pa.int64()),
        },
        schema=PAIR_SCHEMA,
    )
    members = [PIN0 + np.flatnonzero(cluster_of == c) for c in range(CLUSTERS)]
    sequences = pa.table(
        {
            "user_id": pa.array(USER0 + 10_000 + np.arange(CLUSTERS), pa.int64()),
            "history": pa.array([m[:5].tolist() for m in members], pa.list_(pa.int64())),
            "future": pa.array([m[5:7].tolist() for m in members], pa.list_(pa.int64())),
        },
        schema=SEQUENCE_SCHEMA,
    )
    universe = pa.table(
        {
            "entity_type": ["pin"] * cluster_of.size + ["board"] * USERS,
            "entity_id": np.concatenate([PIN0 + np.arange(cluster_of.size), BOARD0 + np.arange(USERS)]),
        },
        schema=NODE_SCHEMA,
    )
    empty_pairs, empty_seq, empty_nodes = (
        PAIR_SCHEMA.empty_table(),
        SEQUENCE_SCHEMA.empty_table(),
        NODE_SCHEMA.empty_table(),
    )
    data = TrainingData(
        pairs=empty_pairs,
        eval_pairs=eval_pairs,
        sequences=empty_seq,
        eval_sequences=sequences,
        feature_nodes=empty_nodes,
        eval_feature_nodes=empty_nodes,
        universe_table=universe,
    )
    report = Evaluator(data, k=10, pool_size=10_000).evaluate(als, als, ("entity_entity", "user_entity"))
    ee, ue = report.tasks["entity_entity"], report.tasks["user_entity"]
    assert ee.n == n and ee.recall > 0.6
    assert ue.n == CLUSTERS and ue.recall > 0.6


def test_recall_report_als_row_on_the_pipeline_evaluation_sets(tmp_path, monkeypatch):
    """The recall report's ALS (omnisage_pipeline.evaluation.report.als_candidate: the window's validated logs, evaluation pairs
    and users left out, tuned on a carved split) on a tiny generated pipeline, scored by the one evaluator."""
    from pipeline_fixtures import build_library_pipeline

    from assets.evaluation import RecallReportConfig
    from ml.baselines import random_baseline
    from ml.evaluator import Evaluator
    from omnisage_pipeline.evaluation.report import als_candidate as _als_candidate
    from omnisage_pipeline.settings import Settings

    art = build_library_pipeline(tmp_path, scale="tiny", days=3, seed=0)
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
    # the fixture's days precede the definitions' partitions (OMNISAGE_START_DATE): its window is its days
    monkeypatch.setattr("omnisage_pipeline.partitions.window_keys", lambda day: [d for d in art.days if d <= day])
    messages: list[str] = []
    candidate = _als_candidate(settings, art.day, art.data, art.universe, RecallReportConfig(), messages.append)
    als = candidate.entity
    assert isinstance(als, AlsEmbedder) and candidate.user is als
    assert set(candidate.tasks) == {"entity_entity", "user_entity"}
    assert messages and "tuned on" in messages[0]
    eval_users = set(art.data.eval_sequences["user_id"].to_pylist())
    assert eval_users and not eval_users & set(als.index.user_ids.tolist())  # embedded from histories only
    evaluator = Evaluator(art.data, art.universe, k=10, pool_size=10_000, seed=0)
    scored = evaluator.evaluate(als, als, ("entity_entity", "user_entity"))
    chance = evaluator.evaluate(*random_baseline(art.universe), ("entity_entity",))
    assert scored.tasks["entity_entity"].n == chance.tasks["entity_entity"].n > 0
    assert scored.tasks["entity_entity"].recall > 3 * max(chance.tasks["entity_entity"].recall, 0.01)
    assert scored.tasks["user_entity"].n == len(evaluator.histories)
