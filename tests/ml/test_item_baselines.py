"""The item-item baselines on tiny hand-made data, each against an answer computed by hand or by a direct
solve: windowed co-occurrence counts (ml.window_cooccurrence), EASE (ml.ease) against per-item ridge
regressions, TF-IDF cosine (ml.content_tfidf), and the shared training / validation split
(ml.item_baselines): the validation pairs' events are out of the tuning fit, the test pairs' out of both."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from ml.baselines import AlsFitConfig, build_interaction_matrix, interactions_from_logs
from ml.content_tfidf import ContentTfidfScorer, tokenize_words
from ml.ease import EaseScorer, ease_weights
from ml.item_baselines import TrainingSplit, fit_ease_baseline, fit_window_baseline, training_event_rows
from ml.window_cooccurrence import WindowCooccurrenceScorer, pin_sequences, window_counts
from omnisage_pipeline.contract.validation import LOG_SCHEMA

P, B, U = 1_000_000_000, 2_000_000_000, 3_000_000_000
A, Bp, C, D = P + 1, P + 2, P + 3, P + 4


def logs_of(events: list[tuple[int, int, int, int | None, int | None]]) -> pa.Table:
    """(user, time in seconds, pin, query pin or None, board or None) -> contract log rows."""
    rows = []
    for user, t, pin, query, board in events:
        rows.append(
            {
                "event_ts": datetime.fromtimestamp(1_700_000_000 + t, tz=UTC),
                "user_id": user,
                "action": "save" if board is not None else "click",
                "surface": "related_pins" if query is not None else "homefeed",
                "pin_id": pin,
                "board_id": board,
                "query_pin_id": query,
            }
        )
    return pa.Table.from_pylist(rows, schema=LOG_SCHEMA)


# user U: A, B, C, A (time order; the log rows are shuffled); user U+1: B, C
EVENTS = [
    (U, 3, A, C, None),
    (U, 0, A, None, None),
    (U + 1, 0, Bp, None, None),
    (U, 1, Bp, A, B),
    (U + 1, 5, C, Bp, None),
    (U, 2, C, Bp, None),
]


def test_pin_sequences_follow_time_then_row_order():
    logs = logs_of(EVENTS)
    users, pins = pin_sequences(logs, np.arange(logs.num_rows))
    assert users.tolist() == [U] * 4 + [U + 1] * 2
    assert pins.tolist() == [A, Bp, C, A, Bp, C]


def test_window_counts_by_hand():
    # index: A=0, B=1, C=2; sequences [0, 1, 2, 0] and [1, 2]
    users = np.array([0, 0, 0, 0, 1, 1])
    items = np.array([0, 1, 2, 0, 1, 2])
    counts = window_counts(users, items, 3, [1, 2, 3])
    w1 = counts[1].toarray()
    # offset 1: (A,B) (B,C) (C,A) of the first user, (B,C) of the second; both directions
    assert w1.tolist() == [[0, 1, 1], [1, 0, 2], [1, 2, 0]]
    # offset 2 adds (A,C) and (B,A); offset 3 is (A,A): a pin next to itself adds nothing
    assert counts[2].toarray().tolist() == [[0, 2, 2], [2, 0, 2], [2, 2, 0]]
    assert counts[3].toarray().tolist() == counts[2].toarray().tolist()
    with pytest.raises(ValueError, match="windows must be >= 1"):
        window_counts(users, items, 3, [0])


def test_window_scorer_counts_plus_a_popularity_tie_break():
    logs = logs_of(EVENTS)
    users, pins = pin_sequences(logs, np.arange(logs.num_rows))
    scorer = WindowCooccurrenceScorer(users, pins, window=1)
    # popularity: A 2, B 2, C 2 events -> tie-break 2 / 3; D has no event: 0
    s = scorer.score("pin", [A], "pin", [Bp, C, D, A])
    np.testing.assert_allclose(s, [[1 + 2 / 3, 1 + 2 / 3, 0.0, 2 / 3]])
    s = scorer.score("pin", [Bp], "pin", [A, C])
    np.testing.assert_allclose(s, [[1 + 2 / 3, 2 + 2 / 3]])
    # a cold query ranks by popularity alone; a board has no counts
    np.testing.assert_allclose(scorer.score("pin", [D], "pin", [A, D]), [[2 / 3, 0.0]])
    np.testing.assert_allclose(scorer.score("board", [B], "pin", [A]), [[2 / 3]])
    # a user's history sums the rows: [A, C] -> C[A, .] + C[C, .]
    users_s = scorer.score_users([np.array([A, C])], "pin", [A, Bp, C])
    np.testing.assert_allclose(users_s, [[0 + 1 + 2 / 3, 1 + 2 + 2 / 3, 1 + 0 + 2 / 3]])


def test_training_event_rows_follow_interactions_from_logs():
    logs = logs_of(EVENTS)
    # the pair (B, C) is held out: both events that engaged it drop, and every event of user U+1
    held = pa.table({"query_type": ["pin"], "query_id": [C], "pos_type": ["pin"], "pos_id": [Bp]})
    rows = training_event_rows(logs, held, [U + 1])
    assert rows.tolist() == [0, 1, 3]  # U's A(query C), A, B; not U's C (query B) nor U+1's events
    inter = interactions_from_logs(logs, held, [U + 1])
    pins = np.asarray(inter["entity_id"].to_numpy())[np.asarray(inter["entity_type"].to_pylist()) == "pin"]
    assert sorted(pins.tolist()) == sorted(logs["pin_id"].to_numpy()[rows].tolist())


def _direct_ease(x: np.ndarray, lam: float) -> np.ndarray:
    """Column j of B: ridge regression of item j on every other item (diag(B) = 0 by construction)."""
    n = x.shape[1]
    b = np.zeros((n, n))
    for j in range(n):
        others = [i for i in range(n) if i != j]
        xo = x[:, others]
        b[others, j] = np.linalg.solve(xo.T @ xo + lam * np.eye(n - 1), xo.T @ x[:, j])
    return b


def test_ease_closed_form_matches_a_direct_solve():
    rng = np.random.default_rng(0)
    x = (rng.random((30, 7)) < 0.35).astype(np.float64)
    for lam in (0.5, 3.0, 50.0):
        np.testing.assert_allclose(ease_weights(x, lam), _direct_ease(x, lam), atol=1e-10)
    with pytest.raises(ValueError, match="lambda must be > 0"):
        ease_weights(x, 0.0)


def test_ease_scorer_maps_ids_binarises_and_caps():
    logs = logs_of(EVENTS + [(U, 9, A, None, None)])  # A twice for U: still 1 in the binary matrix
    matrix = build_interaction_matrix(interactions_from_logs(logs))
    ease = EaseScorer(matrix, 2.0, item_types=("pin",))
    # X: users U, U+1 x pins A, B, C -> [[1, 1, 1], [0, 1, 1]]
    expected = _direct_ease(np.array([[1.0, 1, 1], [0, 1, 1]]), 2.0)
    np.testing.assert_allclose(ease.score("pin", [A, Bp, C], "pin", [A, Bp, C]), expected, atol=1e-12)
    assert ease.score("pin", [D], "pin", [A]).tolist() == [[0.0]]  # no column: 0
    assert ease.score("board", [B], "pin", [A]).tolist() == [[0.0]]  # not an item type here
    np.testing.assert_allclose(
        ease.score_users([np.array([A, Bp, A])], "pin", [C]), [[expected[0, 2] + expected[1, 2]]]
    )
    with pytest.raises(ValueError, match="exceed max_items=2"):
        EaseScorer(matrix, 2.0, item_types=("pin", "board"), max_items=2)
    top = EaseScorer(matrix, 2.0, item_types=("pin", "board"), max_items=2, restrict=True)
    # degrees: A 1 user, B 2, C 2, board 1 -> B and C kept
    assert top.restricted_from == 4 and top.n_items == 2
    assert top.score("pin", [A], "pin", [Bp]).tolist() == [[0.0]]


def test_tokenizer_words():
    offsets, words = tokenize_words(["Star Wars (1977)", None, "ÉTÉ_x"], ["Action, Sci-Fi; 1979", "", None])
    assert offsets.tolist() == [0, 7, 7, 8]
    assert words.to_pylist() == ["star", "wars", "1977", "action", "sci", "fi", "1979", "été_x"]


def test_tfidf_cosine_by_hand():
    ids = np.array([P + 1, P + 2, P + 3, P + 4])
    scorer = ContentTfidfScorer(
        {
            "pin": (ids, [["red apple", "red car", "green apple pie", None]]),
            "board": (np.array([B]), [["apple"]]),
        }
    )
    n = 5  # documents of both types
    idf = {
        w: np.log((1 + n) / (1 + df)) + 1 for w, df in {"red": 2, "apple": 3, "car": 1, "green": 1, "pie": 1}.items()
    }

    def unit(words):
        v = np.array([idf[w] for w in words])
        return dict(zip(words, v / np.linalg.norm(v)))

    d1, d2, d3 = unit(["red", "apple"]), unit(["red", "car"]), unit(["green", "apple", "pie"])
    s = scorer.score("pin", [P + 1], "pin", ids)
    assert s.shape == (1, 4)
    expected = [1.0, d1["red"] * d2["red"], d1["apple"] * d3["apple"], 0.0]
    np.testing.assert_allclose(s.toarray()[0], expected)
    assert expected[1] > expected[2]  # "red" is rarer than "apple": the car outranks the pie
    # a board query in the same vocabulary; an unknown id scores 0
    np.testing.assert_allclose(scorer.score("board", [B], "pin", [P + 2, P + 3]).toarray(), [[0.0, d3["apple"]]])
    assert scorer.score("pin", [P + 99], "pin", ids).toarray().sum() == 0
    # a user is the normalised sum of the history's vectors
    users = scorer.score_users([np.array([P + 1, P + 2])], "pin", [P + 3]).toarray()
    hist = {w: d1.get(w, 0) + d2.get(w, 0) for w in ("red", "apple", "car")}
    norm = np.linalg.norm(list(hist.values()))
    np.testing.assert_allclose(users, [[hist["apple"] / norm * d3["apple"]]])
    with pytest.raises(ValueError, match="duplicate pin ids"):
        ContentTfidfScorer({"pin": (np.array([1, 1]), [["a", "b"]])})


# ------------------------------------------------------------------------------------------- shared split
def chain_logs(users: int = 60, seed: int = 0) -> pa.Table:
    """Each user walks a ring of 12 pins from a random start (related-pins: the query is the previous pin),
    so consecutive pins co-occur at offset 1 and the pin two steps on at offset 2."""
    rng = np.random.default_rng(seed)
    events = []
    for u in range(users):
        start = int(rng.integers(12))
        prev = None
        for i in range(6):
            pin = P + (start + i) % 12
            events.append((U + u, u * 100 + i, pin, prev, B + u if i % 2 else None))
            prev = pin
    return logs_of(events)


def test_the_split_is_carved_once_and_its_events_leave_the_tuning_fit():
    logs = chain_logs()
    test_pairs = pa.table({"query_type": ["pin"], "query_id": [P + 0], "pos_type": ["pin"], "pos_id": [P + 1]})
    config = AlsFitConfig(validation_fraction=0.2, validation_types=[("pin", "pin")])
    split = TrainingSplit.carve(logs, test_pairs, [U + 59], config)
    again = TrainingSplit.carve(logs, test_pairs, [U + 59], config)
    assert split.validation.equals(again.validation) and split.validation.num_rows > 0
    val = {tuple(r) for r in zip(split.validation["query_id"].to_pylist(), split.validation["pos_id"].to_pylist())}
    assert (P + 0, P + 1) not in val  # never a test pair
    pin, query = logs["pin_id"].to_numpy(), logs["query_pin_id"].fill_null(0).to_numpy()
    key = {tuple(sorted((q, p))) for q, p in val}
    engaged_val = np.array([tuple(sorted((q, p))) in key for q, p in zip(query, pin)])
    engaged_test = np.array([tuple(sorted((q, p))) == (P + 0, P + 1) for q, p in zip(query, pin)])
    assert engaged_test.any() and engaged_val.any()
    tuning, full = split.rows(True), split.rows(False)
    assert not engaged_test[full].any() and not engaged_test[tuning].any()
    assert engaged_val[full].any() and not engaged_val[tuning].any()
    assert not (logs["user_id"].to_numpy()[full] == U + 59).any()
    assert set(tuning) < set(full)


def cluster_logs(users: int = 200, seed: int = 0) -> pa.Table:
    """4 clusters of 10 pins; each user engages 6 pins of one cluster in a row (related-pins), saving every
    other one to a board: the pairs of a validation split are unseen, but their cluster mates are not."""
    rng = np.random.default_rng(seed)
    events = []
    for u in range(users):
        pins = P + 10 * (u % 4) + rng.choice(10, 6, replace=False)
        prev = None
        for i, pin in enumerate(pins.tolist()):
            events.append((U + u, u * 100 + i, pin, prev, B + u if i % 2 else None))
            prev = pin
    return logs_of(events)


def test_window_and_ease_are_tuned_on_validation_and_refitted_on_all_training():
    logs = cluster_logs()
    config = AlsFitConfig(validation_fraction=0.2, validation_types=[("pin", "pin")])
    split = TrainingSplit.carve(logs, None, None, config)
    pools = {"pin": P + np.arange(40), "board": B + np.arange(200)}
    window, tuning = fit_window_baseline(split, pools, grid=[1, 2, 5], k=5)
    recalls = [r["recall@5"] for r in tuning.results]
    assert [r["window"] for r in tuning.results] == [1, 2, 5] and tuning.best_recall == max(recalls)
    assert tuning.best == [1, 2, 5][recalls.index(max(recalls))] == window.window
    assert tuning.validation_pairs == split.validation.num_rows > 0
    # a held-out pair never co-occurs at offset 1 (its events left the tuning fit): wider windows see mates
    assert recalls[0] < recalls[2] and tuning.best_recall > 1.5 * 5 / 40  # chance: k / pool
    assert window.popularity.sum() == split.rows(False).size  # refitted on all of training
    ease, ease_tuning = fit_ease_baseline(split, pools, grid=[1.0, 10.0, 100.0], k=5, item_types=("pin",))
    ease_recalls = [r["recall@5"] for r in ease_tuning.results]
    assert ease.lam == ease_tuning.best == [1.0, 10.0, 100.0][ease_recalls.index(max(ease_recalls))]
    assert ease_tuning.to_json()["items"] == 40
    weights = ease.score("pin", P + np.arange(40), "pin", P + np.arange(40))
    mates = np.equal.outer(np.arange(40) // 10, np.arange(40) // 10) & ~np.eye(40, dtype=bool)
    others = ~mates & ~np.eye(40, dtype=bool)
    per_pin = [(weights[i, mates[i]].mean(), weights[i, others[i]].mean()) for i in range(40)]
    assert all(mate > other for mate, other in per_pin)  # every pin weighs its cluster mates above the rest


def test_the_als_grid_searches_cosine_item_factors():
    """ALS's grid has raw and unit-length item factors (cosine item-item); tuning tries both."""
    from ml.baselines import DEFAULT_ALS_GRID, tune_als

    assert DEFAULT_ALS_GRID["normalize"] == [False, True]
    logs = cluster_logs(users=80)
    split = TrainingSplit.carve(logs, None, None, AlsFitConfig(validation_types=[("pin", "pin")]))
    matrix = build_interaction_matrix(split.interactions(True))
    grid = {"factors": [8], "iterations": [3], "normalize": [False, True]}
    tuning = tune_als(matrix, split.validation, grid, k=5, num_threads=1)
    assert [r["normalize"] for r in tuning.results] == [False, True]
    assert tuning.best["normalize"] in (False, True) and tuning.validation_pairs == split.validation.num_rows


def test_the_time_split_validates_on_later_pairs_and_tunes_on_earlier_events():
    """``TrainingSplit.by_time``: validation = the directed pairs of the events from the cutoff on (a pair may
    have been engaged before it, as test pairs were), never a test pair nor an evaluation user's; the tuning
    fit reads only events before the cutoff; the final fit reads all of training."""
    logs = chain_logs()
    ts = logs["event_ts"].cast(pa.int64()).to_numpy()
    cutoff = int(np.quantile(ts, 0.7))
    test_pairs = pa.table({"query_type": ["pin"], "query_id": [P + 0], "pos_type": ["pin"], "pos_id": [P + 1]})
    split = TrainingSplit.by_time(logs, cutoff, test_pairs, [U + 59], [("pin", "pin")])
    v = split.validation
    assert v.num_rows > 0 and set(v.column_names) >= {"query_id", "pos_id", "user_id"}
    assert (P + 0, P + 1) not in set(zip(v["query_id"].to_pylist(), v["pos_id"].to_pylist()))
    assert U + 59 not in set(v["user_id"].to_pylist())
    cols = [logs[c].to_pylist() for c in ("query_pin_id", "pin_id", "user_id")]
    after = {(q, p, u) for q, p, u, t in zip(*cols, ts) if t >= cutoff and q is not None}
    assert set(zip(v["query_id"].to_pylist(), v["pos_id"].to_pylist(), v["user_id"].to_pylist())) <= after
    tuning, full = split.rows(True), split.rows(False)
    assert (ts[tuning] < cutoff).all() and (ts[full] >= cutoff).any() and set(tuning) < set(full)
    inter_ts = split._before_cutoff()["event_ts"].cast(pa.int64()).to_numpy()
    assert (inter_ts < cutoff).all() and split.interactions(True).num_rows < split.interactions(False).num_rows
