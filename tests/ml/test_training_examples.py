"""Training examples and their held-out sets (paper 3.3, 4.2.1; contract "Evaluation protocol"), and the
batch iterator the trainer consumes (ml.training_examples_reader, ml.step_sampler)."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import build_library_pipeline

from graph_engine.holdout import TYPE_CODE, held_out_pairs, held_out_users
from ml.batches import FeatureTaskBatch, PairBatch, SequenceBatch
from ml.inference import exclude_neighbors
from ml.step_sampler import BatchConfig, allocate, make_batch_iterator_factory
from ml.training_examples import (
    ExampleConfig,
    build_training_examples,
    drop_held_out_edges,
    held_out_pair_mask,
)
from ml.training_examples_reader import load_training_examples


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return build_library_pipeline(tmp_path_factory.mktemp("pipe"), scale="tiny", days=3, seed=0)


def _unordered(t: pa.Table, a=("query_type", "query_id"), b=("pos_type", "pos_id")) -> set:
    ta, ia = t[a[0]].to_pylist(), t[a[1]].to_pylist()
    tb, ib = t[b[0]].to_pylist(), t[b[1]].to_pylist()
    return {tuple(sorted([(x, y), (z, w)])) for x, y, z, w in zip(ta, ia, tb, ib)}


def test_every_output_is_written_and_has_examples(art):
    counts = art.data.manifest["counts"]
    for name in ("pairs", "eval_pairs", "sequences", "eval_sequences", "feature_nodes", "eval_feature_nodes"):
        assert counts[name] > 0, name
    sources = set(art.data.manifest["per_source"]["eval_pairs"])
    assert {"engagement_pin_pin", "engagement_board_pin", "graph_pin_pin", "graph_pin_board"} <= sources
    # the universe is graph nodes + metadata: the tiny scale's 500 pins and 200 boards
    assert {k: len(v) for k, v in art.data.universe().items()} == {"pin": 500, "board": 200}
    # eval share near the configured fraction (hash buckets)
    share = counts["eval_pairs"] / (counts["pairs"] + counts["eval_pairs"])
    assert 0.05 < share < 0.15


def test_held_out_pairs_never_in_training_pairs(art):
    train, held = _unordered(art.data.pairs), _unordered(art.data.eval_pairs)
    assert held and not (train & held)
    cfg = art.example_config
    assert not held_out_pair_mask(art.data.pairs, cfg).any()
    assert held_out_pair_mask(art.data.eval_pairs, cfg).all()


def test_held_out_engagement_pairs_are_never_graph_edges(art):
    pruned = pq.read_table(art.pruned_dir)
    edges = _unordered(pruned, ("src_type", "src_id"), ("dst_type", "dst_id"))
    ev = art.data.eval_pairs
    engaged = ev.filter(pc.starts_with(ev["source"], "engagement_"))
    assert engaged.num_rows > 0
    assert not (_unordered(engaged) & edges)
    # ... while the training engagement pairs are (mostly) edges: the filter is what keeps them apart
    tr = art.data.pairs
    tr_engaged = _unordered(tr.filter(pc.starts_with(tr["source"], "engagement_")))
    assert len(tr_engaged & edges) > 0.5 * len(tr_engaged)


def test_drop_held_out_edges_is_the_unordered_pair_hash():
    cfg = ExampleConfig(eval_fraction=0.3)
    rng = np.random.default_rng(0)
    n = 2000
    pins, boards = rng.integers(1, 10**9, n), rng.integers(1, 10**9, n)
    edges = pa.table(
        {
            "src_type": ["pin"] * n,
            "src_id": pins,
            "dst_type": ["board"] * n,
            "dst_id": boards,
            "edge_type": ["pin_board"] * n,
            "weight": np.ones(n),
        }
    )
    kept = drop_held_out_edges(edges, cfg)
    # the board -> pin orientation of the same pairs (how engagement pairs are written)
    held = held_out_pairs(cfg.holdout_seed, cfg.eval_fraction, TYPE_CODE["board"], boards, TYPE_CODE["pin"], pins)
    assert kept.num_rows == n - held.sum()
    assert set(kept["src_id"].to_pylist()) == set(pins[~held].tolist())


def test_held_out_users_sequences_not_in_training(art):
    cfg = art.example_config
    train_users = art.data.sequences["user_id"].to_numpy()
    eval_users = art.data.eval_sequences["user_id"].to_numpy()
    assert eval_users.size and train_users.size
    assert not set(train_users) & set(eval_users)
    assert not held_out_users(cfg.holdout_seed, cfg.eval_fraction, train_users).any()
    assert held_out_users(cfg.holdout_seed, cfg.eval_fraction, eval_users).all()


def test_training_sequences_end_at_the_user_eval_cutoff(art):
    """Nothing of the evaluation horizon is trained on: every training user's history and future come from
    engagement before the cutoff (the held-out users' future lies after it)."""
    cutoff = datetime.fromisoformat(art.data.manifest["user_eval_cutoff"])
    logs = pa.concat_tables([pq.read_table(d) for d in art.log_dirs])
    ts = logs["event_ts"].to_numpy().astype("datetime64[us]").astype(np.int64)
    cut_us = int(cutoff.astimezone(UTC).timestamp() * 1_000_000)
    users, pins = logs["user_id"].to_numpy(), logs["pin_id"].to_numpy()
    assert (ts >= cut_us).any(), "the fixture must have engagement after the cutoff"
    for row in art.data.sequences.to_pylist():
        before = set(pins[(users == row["user_id"]) & (ts < cut_us)].tolist())
        assert set(row["history"]) | set(row["future"]) <= before


def test_held_out_users_engagement_is_not_in_the_graph(art):
    """The graph that embeds a held-out user's history holds none of that user's engagement, in particular
    nothing after the cutoff (their future saves): edges of held-out users' events exist only where another
    user made the same edge."""
    cfg = art.example_config
    logs = pa.concat_tables([pq.read_table(d) for d in art.log_dirs])
    users = logs["user_id"].to_numpy()
    held = held_out_users(cfg.holdout_seed, cfg.eval_fraction, users)
    saves = (logs["action"].to_numpy(zero_copy_only=False) == "save") & ~pc.is_null(logs["board_id"]).to_numpy(
        zero_copy_only=False
    )
    pin, board = (
        logs["pin_id"].to_numpy(),
        np.nan_to_num(logs["board_id"].to_numpy(zero_copy_only=False)).astype(np.int64),
    )
    only_held = {(p, b) for p, b in zip(pin[saves & held], board[saves & held])} - {
        (p, b) for p, b in zip(pin[saves & ~held], board[saves & ~held])
    }
    assert only_held, "the fixture must have pin_board edges that only held-out users made"
    pruned = pq.read_table(art.pruned_dir)
    edges = set(zip(pruned["src_id"].to_pylist(), pruned["dst_id"].to_pylist()))
    assert not (only_held & edges)


def _engaged_pairs(logs: pa.Table, rows: np.ndarray) -> set:
    """(source, query id, pos id) of the engagement pairs the events ``rows`` make."""
    action = logs["action"].to_numpy(zero_copy_only=False)
    surface = logs["surface"].to_numpy(zero_copy_only=False)
    query = logs["query_pin_id"].to_numpy(zero_copy_only=False)
    board = logs["board_id"].to_numpy(zero_copy_only=False)
    pin = logs["pin_id"].to_numpy()
    related = rows & (surface == "related_pins") & np.isin(action, ["save", "click"]) & ~np.isnan(query)
    saved = rows & (action == "save") & ~np.isnan(board)
    out = {("engagement_pin_pin", int(q), int(p)) for q, p in zip(query[related], pin[related]) if q != p}
    return out | {("engagement_board_pin", int(b), int(p)) for b, p in zip(board[saved], pin[saved])}


def test_held_out_users_future_never_becomes_a_training_pair(art):
    """The user-entity future (held-out users' events at or after the cutoff) is what the evaluation asks the
    model to predict: no engagement pair made only by those events may be a training pair."""
    cfg = art.example_config
    cutoff = datetime.fromisoformat(art.data.manifest["user_eval_cutoff"])
    logs = pa.concat_tables([pq.read_table(d) for d in art.log_dirs])
    ts = logs["event_ts"].to_numpy().astype("datetime64[us]").astype(np.int64)
    future = held_out_users(cfg.holdout_seed, cfg.eval_fraction, logs["user_id"].to_numpy()) & (
        ts >= int(cutoff.astimezone(UTC).timestamp() * 1_000_000)
    )
    only_future = _engaged_pairs(logs, future) - _engaged_pairs(logs, ~future)
    assert only_future, "the fixture must have pairs that only held-out users' future made"
    train = art.data.pairs
    trained = set(zip(train["source"].to_pylist(), train["query_id"].to_pylist(), train["pos_id"].to_pylist()))
    assert not (only_future & trained)


def test_user_eval_uses_engagement_after_the_cutoff(art):
    cutoff = datetime.fromisoformat(art.data.manifest["user_eval_cutoff"])
    assert cutoff.tzinfo is not None
    logs = pa.concat_tables([pq.read_table(d) for d in art.log_dirs])
    ts = logs["event_ts"].to_numpy().astype("datetime64[us]").astype(np.int64)
    cut_us = int(cutoff.astimezone(UTC).timestamp() * 1_000_000)
    users, pins = logs["user_id"].to_numpy(), logs["pin_id"].to_numpy()
    for row in art.data.eval_sequences.to_pylist():
        mine = users == row["user_id"]
        before = set(pins[mine & (ts < cut_us)].tolist())
        after = set(pins[mine & (ts >= cut_us)].tolist())
        assert row["history"] and row["future"]
        assert set(row["history"]) <= before
        assert set(row["future"]) <= after
        assert len(row["history"]) <= art.example_config.t_max
        assert len(row["future"]) <= art.example_config.future_delta


def test_same_hash_on_every_day(art, tmp_path):
    """Examples of an earlier window end: every pair (and user) seen on both days is on the same side."""
    out = tmp_path / "day2"
    out.mkdir()
    day2 = art.days[-2]
    logs = sorted(art.log_dirs[-2].glob("*.parquet")) + sorted(art.log_dirs[0].glob("*.parquet"))
    # a 1-day horizon: a 2-day window ending at day2 with the default 2 would be all horizon, no training users
    config = dataclasses.replace(art.example_config, eval_horizon_days=1)
    build_training_examples(logs, art.metadata_dir / "pins", art.snapshot, art.neighborhoods, out, day2, config)
    d2 = load_training_examples(out)
    d3 = art.data
    tr2, ev2, tr3, ev3 = (_unordered(t) for t in (d2.pairs, d2.eval_pairs, d3.pairs, d3.eval_pairs))
    both = (tr2 | ev2) & (tr3 | ev3)
    assert len(both) > 100
    assert (ev2 & both) == (ev3 & both)
    assert not (tr2 & ev3) and not (ev2 & tr3)
    u2 = set(d2.eval_sequences["user_id"].to_pylist()) | set(d2.sequences["user_id"].to_pylist())
    assert not set(d2.sequences["user_id"].to_pylist()) & set(d3.eval_sequences["user_id"].to_pylist())
    assert u2


def test_allocate_is_proportional_and_exact():
    assert allocate(10, np.array([1.0, 1.0, 2.0])).tolist() == [3, 2, 5]  # tie -> lower index
    got = allocate(256, np.array([1.0, 0.0, 3.0]))
    assert got.tolist() == [64, 0, 192]
    assert allocate(7, np.array([1.0, 1.0, 1.0])).sum() == 7


def test_batch_iterator_contract(art):
    """Deterministic per epoch, the same batch names every step, eq. 2's per-source split, negatives of
    the positive's type from the universe, held-out pairs never drawn."""
    kw = {
        "batch_size": 32,
        "num_random_negatives": 8,
        "seed": 3,
        "max_sequence_length": 8,
        "steps_per_epoch": 3,
    }
    fac = make_batch_iterator_factory(art.data, art.builder, BatchConfig(**kw))
    a, b = list(fac(0)), list(fac(0))
    assert len(a) == 3 and fac.steps_per_epoch == 3
    names = [list(step) for step in a]
    assert all(n == names[0] for n in names)
    assert set(names[0]) >= {
        "entity_entity/pin_pin",
        "entity_entity/board_pin",
        "entity_entity/pin_board",
        "entity_feature/pin",
        "entity_feature/board",
        "user_entity",
    }
    for x, y in zip(a, b):
        for name in x:
            ex, ey = x[name], y[name]
            if isinstance(ex, PairBatch):
                assert np.array_equal(ex.query.entity_ids, ey.query.entity_ids)
    c = next(iter(fac(1)))
    assert not np.array_equal(
        a[0]["entity_entity/pin_pin"].query.entity_ids, c["entity_entity/pin_pin"].query.entity_ids
    )

    held = _unordered(art.data.eval_pairs)
    universe = art.data.universe()
    total = 0
    for step in a:
        for name, batch in step.items():
            if isinstance(batch, PairBatch):
                total += len(batch)
                assert batch.random_negatives.entity_type == batch.positive.entity_type
                assert np.isin(batch.random_negatives.entity_ids, universe[batch.positive.entity_type]).all()
                assert batch.random_negative_log_q == pytest.approx(
                    np.log(8 / len(universe[batch.positive.entity_type]))
                )
                pairs = {
                    tuple(sorted([(batch.query.entity_type, int(q)), (batch.positive.entity_type, int(p))]))
                    for q, p in zip(batch.query.entity_ids, batch.positive.entity_ids)
                }
                assert not pairs & held
                # weights B_g / B: the sum of the per-type-pair means is the mean over the step
                assert np.allclose(batch.weights, len(batch) / 32)
            elif isinstance(batch, FeatureTaskBatch):
                assert batch.random_negatives.entity_type == batch.nodes.entity_type
            elif isinstance(batch, SequenceBatch):
                seq = np.asarray(batch.sequence_index)
                assert seq.shape[1] <= 8
                assert ((seq >= 0).sum(1) >= 2).all()
        assert total % 32 == 0
    # eq. 2 with equal weights: every source gets batch_size / n_sources pairs per step
    fac_w = make_batch_iterator_factory(
        art.data,
        art.builder,
        BatchConfig(
            tasks=("entity_entity",),
            batch_size=60,
            num_random_negatives=0,
            steps_per_epoch=1,
            source_weights={
                "engagement_pin_pin": 2.0,
                "graph_pin_pin": 1.0,
                "coengagement_pin_pin": 0.0,
                "engagement_board_pin": 0.0,
                "graph_board_pin": 0.0,
                "graph_pin_board": 0.0,
                "graph_pin_board_pin": 0.0,
            },
        ),
    )
    step = next(iter(fac_w(0)))
    assert list(step) == ["entity_entity/pin_pin"]
    q = step["entity_entity/pin_pin"].query.entity_ids
    p = step["entity_entity/pin_pin"].positive.entity_ids
    pairs = art.data.pairs
    src_of = {}
    for s, qi, pi in zip(pairs["source"].to_pylist(), pairs["query_id"].to_pylist(), pairs["pos_id"].to_pylist()):
        src_of.setdefault((qi, pi), set()).add(s)
    n_eng = sum("engagement_pin_pin" in src_of[(int(a), int(b))] for a, b in zip(q, p))
    assert n_eng >= 40  # 2/3 of 60 drawn from the weight-2 source


SOURCES = (
    "engagement_pin_pin",
    "coengagement_pin_pin",
    "engagement_board_pin",
    "graph_pin_pin",
    "graph_pin_board_pin",
    "graph_pin_board",
    "graph_board_pin",
)


def _pin_pin_steps(art, source: str, steps: int = 3):
    fac = make_batch_iterator_factory(
        art.data,
        art.builder,
        BatchConfig(
            tasks=("entity_entity",),
            batch_size=64,
            num_random_negatives=0,
            steps_per_epoch=steps,
            source_weights={s: float(s == source) for s in SOURCES},
        ),
    )
    return [step["entity_entity/pin_pin"] for step in fac(0)]


def _own_edge_seen(batch) -> int:
    q, p = batch.query, batch.positive
    return int(
        (q.neighbor_mask & (q.neighbor_ids == p.entity_ids[:, None])).any(1).sum()
        + (p.neighbor_mask & (p.neighbor_ids == q.entity_ids[:, None])).any(1).sum()
    )


def test_graph_pairs_mask_their_edge_and_engagement_pairs_keep_it(art):
    """A graph pair is drawn from N(u), so its own edge is masked out of both neighbourhoods (no shortcut);
    an engagement pair keeps the co-engagement edge it made, as a repeat engagement finds it at serving."""
    assert all(_own_edge_seen(b) == 0 for b in _pin_pin_steps(art, "graph_pin_pin"))
    assert sum(_own_edge_seen(b) for b in _pin_pin_steps(art, "engagement_pin_pin")) > 0


def test_pairs_are_drawn_in_proportion_to_their_count(art):
    """Each engagement is one example of eq. 2's D_pair: a pair engaged 9 times is drawn 9x as often as one
    engaged once; ``pair_sampling="uniform"`` draws distinct pairs."""
    from ml.step_sampler import _pair_sources

    pairs = pa.table(
        {
            "query_type": ["pin", "pin"],
            "query_id": [1, 2],
            "pos_type": ["pin", "pin"],
            "pos_id": [3, 4],
            "source": ["engagement_pin_pin"] * 2,
            "segment": [None, None],
            "weight": pa.array([1.0, 1.0], pa.float32()),
            "count": [1, 9],
        }
    )
    rng = np.random.default_rng(0)
    (by_count,), (uniform,) = _pair_sources(pairs, None), _pair_sources(pairs, None, by_count=False)
    assert np.mean(by_count.draw(20_000, rng)[0] == 2) == pytest.approx(0.9, abs=0.01)
    assert np.mean(uniform.draw(20_000, rng)[0] == 2) == pytest.approx(0.5, abs=0.02)


def test_exclude_neighbors_compacts_blocks(art):
    ids = art.universe["pin"][:64]
    batch = art.builder.build("pin", ids)
    rows, cols = np.nonzero(batch.neighbor_mask)
    assert rows.size
    # exclude one real neighbour of every row that has one (the first found)
    first = np.full(len(ids), -1, np.int64)
    seen = np.zeros(len(ids), bool)
    for r, c in zip(rows, cols):
        if not seen[r]:
            first[r], seen[r] = batch.neighbor_ids[r, c], True
    out = exclude_neighbors(batch, first)
    assert not (out.neighbor_mask & (out.neighbor_ids == first[:, None]) & (first[:, None] >= 0)).any()
    assert (
        out.neighbor_mask.sum()
        == batch.neighbor_mask.sum() - (batch.neighbor_mask & (batch.neighbor_ids == first[:, None])).sum()
    )
    for off, blk in zip(out.layout.offsets, out.layout.blocks):
        m = out.neighbor_mask[:, off : off + blk.k]
        # real entries first inside every block, padding zeroed
        assert not (~m[:, :-1] & m[:, 1:]).any()
        assert (out.neighbor_ids[:, off : off + blk.k][~m] == -1).all()
        assert (out.neighbor_features.token_lengths[:, off : off + blk.k][~m] == 0).all()
        s = out.neighbor_scores[:, off : off + blk.k]
        assert (np.diff(np.where(m, s, -1e9), axis=1)[m[:, 1:]] <= 0).all()  # still score-descending
    # nothing to exclude -> the same object
    assert exclude_neighbors(batch, np.full(len(ids), -1)) is batch


def _training_user(config: ExampleConfig, n_events: int) -> tuple[int, pa.Table]:
    """A user the hash keeps in training, with ``n_events`` engagements, one a minute, pins 1000.."""
    users = np.arange(1, 200, dtype=np.int64)
    user = int(users[~held_out_users(config.holdout_seed, config.eval_fraction, users)][0])
    ts = pa.array(
        (np.datetime64("2026-01-01T00:00") + np.arange(n_events).astype("timedelta64[m]")).astype("datetime64[us]"),
        pa.timestamp("us", tz="UTC"),
    )
    logs = pa.table(
        {
            "user_id": pa.array([user] * n_events, pa.int64()),
            "pin_id": pa.array(1000 + np.arange(n_events), pa.int64()),
            "event_ts": ts,
            "action": pa.array(["save"] * n_events),
            "surface": pa.array(["home"] * n_events),
        }
    )
    return user, logs


@pytest.mark.parametrize("stride", [4, 7])
def test_training_sequences_are_windows_over_the_whole_history(stride):
    """Every engagement before the cutoff is a training target: windows of at most t_max end every
    ``stride`` engagements, each followed by at most Delta future engagements (one window per user would
    keep only the last t_max + Delta engagements of a long history)."""
    import duckdb

    from ml.training_examples import user_sequences

    config = ExampleConfig(t_max=8, future_delta=3, sequence_stride=stride)
    user, logs = _training_user(config, 60)
    con = duckdb.connect()
    con.register("logs", logs)
    train, _ = user_sequences(con, config, "2027-01-01 00:00:00+00")
    rows = train.to_pylist()
    assert {r["user_id"] for r in rows} == {user} and len(rows) > 1
    ends = sorted(r["history"][-1] - 1000 + 1 for r in rows)  # 1-based window ends
    assert ends[-1] == 60 - 3 and all(b - a == stride for a, b in itertools.pairwise(ends))
    assert ends[0] <= stride + 1
    for r in rows:
        end = r["history"][-1] - 1000 + 1
        assert r["history"] == list(range(1000 + max(end - 8, 0), 1000 + end))
        assert r["future"] == list(range(1000 + end, 1000 + min(end + 3, 60)))
    covered = set().union(*(r["history"] for r in rows))
    assert covered == set(range(1000, 1000 + 60 - 3))


def test_coengagement_pairs_count_pins_within_the_window_both_ways():
    """One user's history a, b, c, a (window 2): a-b at positions 1-2 and 2-4, a-c at 1-3 and 3-4, b-c at 2-3;
    each both directions; a pin never pairs with itself; user 2's one event pairs with nothing."""
    import duckdb

    from ml.training_examples import coengagement_pairs

    con = duckdb.connect()
    ts = [datetime(2026, 1, 1, 0, m, tzinfo=UTC) for m in range(5)]
    logs = pa.table(
        {
            "event_ts": ts,
            "user_id": [1, 1, 1, 1, 2],
            "pin_id": [10, 20, 30, 10, 20],
            "action": ["click"] * 5,
            "surface": ["homefeed"] * 5,
        }
    )
    con.register("logs", logs)
    pairs = coengagement_pairs(con, dataclasses.replace(ExampleConfig(), coengagement_window=2))
    got = dict(zip(zip(pairs["query_id"].to_pylist(), pairs["pos_id"].to_pylist()), pairs["count"].to_pylist()))
    assert got == {(10, 20): 2, (20, 10): 2, (10, 30): 2, (30, 10): 2, (20, 30): 1, (30, 20): 1}
    assert set(pairs["source"].to_pylist()) == {"coengagement_pin_pin"}
    off = coengagement_pairs(con, dataclasses.replace(ExampleConfig(), coengagement_window=0))
    assert off.num_rows == 0
