"""The synthetic generator: contract schema, board_id rules, byte-identical reruns, planted truth, CLI."""

from __future__ import annotations

import hashlib
import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from omnisage_pipeline.cli import main
from omnisage_pipeline.tools import synthetic as syn

START = "2026-01-01"

# Contract "Input" types, written out here (not imported from the generator) so that a drift of the
# generator's schema away from the contract fails this test.
CONTRACT_LOGS = {
    "event_ts": pa.timestamp("us", tz="UTC"),
    "user_id": pa.int64(),
    "action": pa.string(),
    "surface": pa.string(),
    "pin_id": pa.int64(),
    "board_id": pa.int64(),
    "query_pin_id": pa.int64(),
}
CONTRACT_PINS = {
    "pin_id": pa.int64(),
    "title": pa.string(),
    "description": pa.string(),
    "image_embedding": pa.list_(pa.float32()),
    "segment": pa.string(),
}
CONTRACT_BOARDS = {"board_id": pa.int64(), "name": pa.string(), "description": pa.string()}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _logs(root: Path) -> pa.Table:
    files = sorted((root / "engagement_logs").glob("dt=*/*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def _np(col) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("small")
    summary = syn.generate(root, start_date=START, days=2, scale="small", seed=7)
    return root, summary


@pytest.fixture(scope="module")
def small_data(small):
    root, _ = small
    return _logs(root), syn.load_truth(root)


# ------------------------------------------------------------------------------------------- layout, schema
def test_layout_and_summary(small):
    root, summary = small
    assert (root / "engagement_logs/dt=2026-01-01/part-00000.parquet").is_file()
    assert (root / "engagement_logs/dt=2026-01-02/part-00000.parquet").is_file()
    assert (root / "pins/part-00000.parquet").is_file() and (root / "boards/part-00000.parquet").is_file()
    for name in ("pins", "boards", "users", "topics"):
        assert (root / "_truth" / f"{name}.parquet").is_file()
    meta = json.loads((root / "_truth/meta.json").read_text())
    assert meta["scale"] == "small" and meta["seed"] == 7 and meta["K"] == syn.SCALES["small"].topics
    assert meta["days"] == ["2026-01-01", "2026-01-02"] and meta["image_dim"] == 32
    cfg = syn.SCALES["small"]
    assert summary["rows"]["pins/part-00000.parquet"] == cfg.pins
    assert summary["rows"]["boards/part-00000.parquet"] == cfg.boards
    for day in summary["days"]:
        n = summary["rows"][f"engagement_logs/dt={day}/part-00000.parquet"]
        assert abs(n - cfg.events_per_day) <= 0.06 * cfg.events_per_day
        assert pq.read_metadata(root / f"engagement_logs/dt={day}/part-00000.parquet").num_rows == n


def test_schema_is_the_contract(small):
    root, _ = small
    for folder, spec in (("pins", CONTRACT_PINS), ("boards", CONTRACT_BOARDS)):
        schema = pq.read_schema(root / folder / "part-00000.parquet")
        assert {f.name: f.type for f in schema} == spec, folder
    for f in sorted((root / "engagement_logs").glob("dt=*/*.parquet")):
        assert {x.name: x.type for x in pq.read_schema(f)} == CONTRACT_LOGS, f


def test_log_rows_follow_contract_rules(small):
    root, _ = small
    for f in sorted((root / "engagement_logs").glob("dt=*/*.parquet")):
        t = pq.read_table(f)
        day = date.fromisoformat(f.parent.name.removeprefix("dt="))
        for col in ("event_ts", "user_id", "action", "surface", "pin_id"):
            assert t[col].null_count == 0, (f, col)
        ts = _np(t["event_ts"]).astype("datetime64[us]")
        lo = np.datetime64(day.isoformat(), "us")
        assert (ts >= lo).all() and (ts < lo + np.timedelta64(1, "D")).all()
        assert (np.diff(ts.astype(np.int64)) >= 0).all()  # a log in time order
        action, surface = _np(t["action"]), _np(t["surface"])
        assert set(action) == {"save", "click", "closeup"}
        assert set(surface) == {"homefeed", "related_pins", "search", "board"}
        # board_id exactly on saves; query_pin_id exactly on related_pins, never the engaged pin itself.
        has_board = _np(t["board_id"].is_valid())
        assert (has_board == (action == "save")).all()
        has_query = _np(t["query_pin_id"].is_valid())
        assert (has_query == (surface == "related_pins")).all()
        rel = has_query
        assert (_np(t["query_pin_id"])[rel].astype(np.int64) != _np(t["pin_id"])[rel]).all()


def test_metadata_values(small):
    root, _ = small
    pins = pq.read_table(root / "pins/part-00000.parquet")
    boards = pq.read_table(root / "boards/part-00000.parquet")
    assert len(pc.unique(pins["pin_id"])) == pins.num_rows
    assert len(pc.unique(boards["board_id"])) == boards.num_rows
    img = pins["image_embedding"]
    assert 0 < img.null_count < 0.2 * pins.num_rows  # some pins have no image
    lengths = _np(pc.list_value_length(img).drop_null())
    assert (lengths == 32).all()
    flat = _np(pc.list_flatten(img))
    assert np.isfinite(flat).all()
    segs = pc.value_counts(pins["segment"]).to_pylist()
    assert {d["values"] for d in segs} == {"organic", "promoted", "shopping", "video", None}
    titles = _np(pins["title"])
    assert all(isinstance(x, str) and x for x in titles)
    assert any(not x.isascii() for x in titles)  # some Unicode
    assert pins["description"].null_count > 0 and boards["name"].null_count == 0
    # Every engaged pin/board exists in the metadata (the generator's universe is closed).
    logs = _logs(root)
    assert pc.all(pc.is_in(logs["pin_id"], value_set=pins["pin_id"])).as_py()
    assert pc.all(pc.is_in(logs["board_id"].drop_null(), value_set=boards["board_id"])).as_py()


def test_no_images_option(tmp_path):
    syn.generate(tmp_path, start_date=START, days=1, scale="tiny", seed=1, images=False)
    pins = pq.read_table(tmp_path / "pins/part-00000.parquet")
    assert pins.schema.field("image_embedding").type == pa.list_(pa.float32())
    assert pins["image_embedding"].null_count == pins.num_rows
    meta = json.loads((tmp_path / "_truth/meta.json").read_text())
    assert meta["images"] is False and meta["image_dim"] is None


# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    syn.generate(a, start_date=START, days=2, scale="tiny", seed=11)
    syn.generate(b, start_date=START, days=2, scale="tiny", seed=11)
    syn.generate(c, start_date=START, days=2, scale="tiny", seed=12)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert len(ha) == 2 + 2 + 4 + 1 and ha == hb
    assert set(hc) == set(ha)
    for rel in ha:
        if rel.endswith(".parquet"):
            assert ha[rel] != hc[rel], rel
    # Re-running into the same directory rewrites the same bytes; adding a day leaves the others alone.
    syn.generate(a, start_date=START, days=3, scale="tiny", seed=11)
    h3 = _hashes(a)
    assert {k: v for k, v in h3.items() if k in ha and not k.endswith("meta.json")} == {
        k: v for k, v in ha.items() if not k.endswith("meta.json")
    }
    assert json.loads((a / "_truth/meta.json").read_text())["days"] == [START, "2026-01-02", "2026-01-03"]


def test_interrupted_run_can_be_rerun(tmp_path, monkeypatch):
    real = syn.generate_day

    def failing(u, day_index, day):
        if day_index == 1:
            raise KeyboardInterrupt
        return real(u, day_index, day)

    monkeypatch.setattr(syn, "generate_day", failing)
    with pytest.raises(KeyboardInterrupt):
        syn.generate(tmp_path / "x", start_date=START, days=3, scale="tiny", seed=1)
    meta = json.loads((tmp_path / "x/_truth/meta.json").read_text())
    assert meta["days"] == [START]  # only complete days are listed
    monkeypatch.setattr(syn, "generate_day", real)
    syn.generate(tmp_path / "x", start_date=START, days=3, scale="tiny", seed=1)
    syn.generate(tmp_path / "y", start_date=START, days=3, scale="tiny", seed=1)
    assert _hashes(tmp_path / "x") == _hashes(tmp_path / "y")


def test_one_day_generates_independently(tmp_path):
    syn.generate(tmp_path, start_date=START, days=3, scale="tiny", seed=5)
    u = syn.build_universe("tiny", 5)
    alone = syn.generate_day(u, 2, date(2026, 1, 3))
    assert alone.equals(pq.read_table(tmp_path / "engagement_logs/dt=2026-01-03/part-00000.parquet"))
    assert not alone.equals(syn.generate_day(u, 1, date(2026, 1, 3)))  # the day index drives the RNG


def test_other_data_set_in_out_dir_is_refused(tmp_path):
    syn.generate(tmp_path, start_date=START, days=2, scale="tiny", seed=1)
    with pytest.raises(syn.GeneratorError, match="seed: 1 there vs 2 asked"):
        syn.generate(tmp_path, start_date=START, days=1, scale="tiny", seed=2)
    syn.generate(tmp_path, start_date=START, days=1, scale="tiny", seed=2, force=True)
    # --force removed the old days: nothing of seed 1 is left behind.
    assert [p.name for p in (tmp_path / "engagement_logs").iterdir()] == ["dt=2026-01-01"]
    with pytest.raises(syn.GeneratorError, match="scale"):
        syn.generate(tmp_path, start_date=START, days=1, scale="nope", seed=2)
    # Input the generator did not write is never overwritten, not even with force.
    other = tmp_path / "export"
    (other / "pins").mkdir(parents=True)
    (other / "pins" / "part-00000.parquet").write_bytes(b"real export")
    with pytest.raises(syn.GeneratorError, match="not a synthetic data set"):
        syn.generate(other, start_date=START, days=1, scale="tiny", seed=2, force=True)
    assert (other / "pins" / "part-00000.parquet").read_bytes() == b"real export"


# ------------------------------------------------------------------------------------------- planted truth
def _cos(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_truth_vectors_are_distinct_topic_mixtures(small_data):
    _, truth = small_data
    for lat in (truth.pin_latent, truth.board_latent, truth.user_latent):
        assert len(np.unique(lat, axis=0)) == len(lat)  # no two entities tie
        np.testing.assert_allclose(np.linalg.norm(lat, axis=1), 1.0, rtol=1e-5)
    # Each pin's latent vector is closest to its own topic's centroid far more often than chance.
    nearest = np.argmax(truth.pin_latent @ truth.centroids.T, axis=1)
    assert (nearest == truth.pin_topic).mean() > 0.8


def test_saves_go_to_matching_boards(small_data):
    logs, truth = small_data
    save = _np(logs["action"]) == "save"
    pin = _np(logs["pin_id"])[save] - syn.PIN_ID_BASE
    board = _np(logs["board_id"])[save].astype(np.int64) - syn.BOARD_ID_BASE
    user = _np(logs["user_id"])[save] - syn.USER_ID_BASE
    assert len(pin) > 1000
    rng = np.random.default_rng(0)
    saved = _cos(truth.pin_latent[pin], truth.board_latent[board]).mean()
    random = _cos(truth.pin_latent[pin], truth.board_latent[rng.integers(0, len(truth.board_id), len(pin))]).mean()
    assert saved > random + 0.4, (saved, random)
    k = truth.meta["K"]
    assert (truth.pin_topic[pin] == truth.board_topic[board]).mean() > 0.7 > 3 / k
    # A save goes to one of the saving user's own boards.
    assert (truth.board_owner[board] == user + syn.USER_ID_BASE).all()


def test_related_pins_are_latently_close(small_data):
    logs, truth = small_data
    rel = _np(logs["surface"]) == "related_pins"
    q = _np(logs["query_pin_id"])[rel].astype(np.int64) - syn.PIN_ID_BASE
    p = _np(logs["pin_id"])[rel] - syn.PIN_ID_BASE
    rng = np.random.default_rng(1)
    close = _cos(truth.pin_latent[q], truth.pin_latent[p]).mean()
    random = _cos(truth.pin_latent[q], truth.pin_latent[rng.integers(0, len(truth.pin_id), len(q))]).mean()
    assert close > random + 0.6, (close, random)
    assert (truth.pin_subtopic[q] == truth.pin_subtopic[p]).mean() > 0.8  # the finer planted level
    # ... and closer than a random pin of the query's own topic: latent scoring, not just topic pools.
    topic = truth.pin_topic
    order = np.argsort(topic, kind="stable")
    count = np.bincount(topic)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    same_topic = order[start[topic[q]] + (rng.random(len(q)) * count[topic[q]]).astype(np.int64)]
    assert close > _cos(truth.pin_latent[q], truth.pin_latent[same_topic]).mean() + 0.2


def test_feeds_follow_user_interest_and_image_follows_latent(small_data, small):
    logs, truth = small_data
    surface = _np(logs["surface"])
    feed = (surface == "homefeed") | (surface == "search")
    u = _np(logs["user_id"])[feed] - syn.USER_ID_BASE
    p = _np(logs["pin_id"])[feed] - syn.PIN_ID_BASE
    rng = np.random.default_rng(2)
    engaged = _cos(truth.user_latent[u], truth.pin_latent[p]).mean()
    random = _cos(truth.user_latent[u], truth.pin_latent[rng.integers(0, len(truth.pin_id), len(p))]).mean()
    assert engaged > random + 0.4, (engaged, random)
    # image_embedding = fixed projection of the latent + noise: a linear map recovers the latent well.
    root, _ = small
    img = pq.read_table(root / "pins/part-00000.parquet")["image_embedding"]
    has = _np(img.is_valid())
    x = _np(pc.list_flatten(img)).reshape(-1, 32)
    y = truth.pin_latent[has]
    w, *_ = np.linalg.lstsq(x, y, rcond=None)
    r2 = 1 - ((x @ w - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert r2 > 0.8, r2


def test_segments_have_different_rates(small_data, small):
    logs, _ = small_data
    root, _ = small
    pins = pq.read_table(root / "pins/part-00000.parquet")
    seg_of = dict(zip(pins["pin_id"].to_pylist(), pins["segment"].to_pylist(), strict=True))
    segs = np.array([seg_of[i] for i in _np(logs["pin_id"]).tolist()], dtype=object)
    action = _np(logs["action"])
    save_rate = {s: (action[segs == s] == "save").mean() for s in ("organic", "promoted")}
    click_rate = {s: (action[segs == s] == "click").mean() for s in ("organic", "shopping")}
    assert save_rate["organic"] > 2 * save_rate["promoted"]
    assert click_rate["shopping"] > 1.5 * click_rate["organic"]


def test_titles_carry_topic_words(small_data, small):
    _, truth = small_data
    root, _ = small
    titles = pq.read_table(root / "pins/part-00000.parquet")["title"].to_pylist()
    words = [set(t.split()) for t in titles]
    rng = np.random.default_rng(3)
    i, j = rng.integers(0, len(titles), (2, 4000))
    keep = i != j
    i, j = i[keep], j[keep]
    shared = np.array([len(words[a] & words[b]) > 0 for a, b in zip(i.tolist(), j.tolist(), strict=True)])
    same = truth.pin_topic[i] == truth.pin_topic[j]
    assert shared[same].mean() > 3 * shared[~same].mean()


def test_user_interest_drifts_towards_drift_topic():
    u = syn.build_universe("small", 3)
    truth_drift = u.user_drift_topic

    def drift_share(day_index):
        t = syn.generate_day(u, day_index, date(2026, 1, 1) + timedelta(days=day_index))
        feed = _np(t["surface"]) == "homefeed"
        users = _np(t["user_id"])[feed] - syn.USER_ID_BASE
        pins = _np(t["pin_id"])[feed] - syn.PIN_ID_BASE
        return (u.pin_topic[pins] == truth_drift[users]).mean()

    early, late = drift_share(0), drift_share(25)
    assert late > early + 0.05, (early, late)
    # The truth reader reproduces the day-d user vectors.
    lat0 = u.user_latents_on_day(0)
    lat25 = u.user_latents_on_day(25)
    assert np.allclose(lat0, u.user_latent, atol=1e-6) and not np.allclose(lat25, lat0, atol=1e-2)


def test_truth_reader_day_latents(small):
    root, _ = small
    truth = syn.load_truth(root)
    u = syn.build_universe("small", 7)
    np.testing.assert_allclose(truth.user_latents_on_day("2026-01-11"), u.user_latents_on_day(10), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        syn.load_truth(root / "nowhere")


# ------------------------------------------------------------------------------------------- CLI
def test_cli_generate(tmp_path, monkeypatch):
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(
        main,
        [
            "generate",
            "--out",
            str(out),
            "--start-date",
            "2026-02-01",
            "--days",
            "2",
            "--scale",
            "tiny",
            "--seed",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "engagement_logs/dt=2026-02-02/part-00000.parquet" in res.output
    assert "pins/part-00000.parquet" in res.output and "500 rows" in res.output
    # Same data as the library call.
    lib = tmp_path / "lib"
    syn.generate(lib, start_date="2026-02-01", days=2, scale="tiny", seed=4)
    assert _hashes(out) == _hashes(lib)

    # A different data set in the same folder: a clear error, exit code 1, nothing changed.
    before = _hashes(out)
    res = runner.invoke(main, ["generate", "--out", str(out), "--scale", "tiny", "--seed", "5", "--days", "1"])
    assert res.exit_code == 1 and "--force" in res.output and _hashes(out) == before

    res = runner.invoke(main, ["generate", "--out", str(out), "--start-date", "2026-02-30"])
    assert res.exit_code == 2 and "YYYY-MM-DD" in res.output
    res = runner.invoke(main, ["generate", "--out", str(out), "--scale", "huge"])
    assert res.exit_code == 2

    # Default --out: OMNISAGE_DATA_ROOT, else $OMNISAGE_HOME/synthetic; default start date: the demo's.
    monkeypatch.delenv("OMNISAGE_DATA_ROOT", raising=False)
    monkeypatch.setenv("OMNISAGE_HOME", str(tmp_path / "home"))
    res = runner.invoke(main, ["generate", "--scale", "tiny", "--days", "1"])
    assert res.exit_code == 0, res.output
    from omnisage_pipeline.settings import DEMO_START_DATE

    assert (tmp_path / "home/synthetic/engagement_logs" / f"dt={DEMO_START_DATE}/part-00000.parquet").is_file()
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(tmp_path / "root"))
    assert runner.invoke(main, ["generate", "--scale", "tiny", "--days", "1"]).exit_code == 0
    assert (tmp_path / "root/pins/part-00000.parquet").is_file()
