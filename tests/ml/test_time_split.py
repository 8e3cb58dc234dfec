"""The time split (ml.time_split): pairs first engaged in the window's last days, what training_examples
writes as ``future_pairs``, the validation split a run selects and gates on, and the report's section."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import duckdb
import pyarrow as pa
import pytest
from pipeline_fixtures import build_library_pipeline

from ml.recall_report import markdown
from ml.time_split import without_pairs
from ml.training_examples import PAIR_SCHEMA, ExampleConfig, future_pairs
from ml.training_examples_reader import load_training_examples
from ml.validation import split_validation
from omnisage_pipeline.evaluation.report import champions_time_split, future_pairs_only, scored_pairs


def _pairs(rows: list[tuple[str, int, str, int, str]]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [[]] * 5
    return pa.table(
        {
            "query_type": pa.array(cols[0], pa.string()),
            "query_id": pa.array(cols[1], pa.int64()),
            "pos_type": pa.array(cols[2], pa.string()),
            "pos_id": pa.array(cols[3], pa.int64()),
            "source": pa.array(cols[4], pa.string()),
            "segment": pa.nulls(len(cols[0]), pa.string()),
            "weight": pa.array([1.0] * len(cols[0]), pa.float32()),
            "count": pa.array([1] * len(cols[0]), pa.int64()),
        },
        schema=PAIR_SCHEMA,
    )


def _ends(t: pa.Table) -> list[tuple]:
    return list(
        zip(t["query_type"].to_pylist(), t["query_id"].to_pylist(), t["pos_type"].to_pylist(), t["pos_id"].to_pylist())
    )


def test_without_pairs_drops_both_directions_of_every_source_and_keeps_order():
    pairs = _pairs(
        [
            ("pin", 5, "pin", 1, "graph_pin_pin"),
            ("pin", 1, "pin", 2, "engagement_pin_pin"),
            ("board", 9, "pin", 2, "engagement_board_pin"),
            ("pin", 2, "pin", 1, "coengagement_pin_pin"),
            ("pin", 2, "board", 9, "graph_pin_board"),
            ("pin", 3, "pin", 4, "engagement_pin_pin"),
        ]
    )
    drop = _pairs([("pin", 2, "pin", 1, "engagement_pin_pin"), ("board", 9, "pin", 2, "engagement_board_pin")])
    kept = without_pairs(pairs, drop)
    assert _ends(kept) == [("pin", 5, "pin", 1), ("pin", 3, "pin", 4)]
    assert without_pairs(pairs, drop.slice(0, 0)).equals(pairs)


def test_future_pairs_are_the_pairs_first_engaged_after_the_cutoff():
    """Pins 10-20 engaged before and after the cutoff: not new. 30 -> 40 (related pins) only after: new, and
    so is the co-engagement 30-40 (user 3 clicked 30 first) and the save of 40 to board 7; 50 -> 60 only before: not in the split."""
    before, after = datetime(2026, 1, 1, 12, tzinfo=UTC), datetime(2026, 1, 3, 12, tzinfo=UTC)
    rows = [
        (before, 1, "click", "related_pins", 20, None, 10),
        (after, 2, "click", "related_pins", 20, None, 10),
        (after, 3, "click", "homefeed", 30, None, None),
        (after, 3, "click", "related_pins", 40, None, 30),
        (after, 3, "save", "homefeed", 40, 7, None),
        (before, 4, "click", "related_pins", 60, None, 50),
    ]
    cols = list(zip(*rows))
    names = ["event_ts", "user_id", "action", "surface", "pin_id", "board_id", "query_pin_id"]
    types = [pa.timestamp("us", tz="UTC"), pa.int64(), pa.string(), pa.string(), pa.int64(), pa.int64(), pa.int64()]
    logs = pa.table({n: pa.array(c, t) for n, c, t in zip(names, cols, types)})
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("logs", logs)
    got = future_pairs(
        con, dataclasses.replace(ExampleConfig(), coengagement_window=5), "logs", "2026-01-03 00:00:00+00"
    )
    ends = {(s, *e) for s, e in zip(got["source"].to_pylist(), _ends(got))}
    assert ends == {
        ("engagement_pin_pin", "pin", 30, "pin", 40),
        ("engagement_board_pin", "board", 7, "pin", 40),
        ("coengagement_pin_pin", "pin", 30, "pin", 40),
        ("coengagement_pin_pin", "pin", 40, "pin", 30),
    }


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return build_library_pipeline(tmp_path_factory.mktemp("pipe"), scale="tiny", days=3, seed=0)


def _unordered(t: pa.Table) -> set:
    return {frozenset([(a, b), (c, d)]) for a, b, c, d in _ends(t)}


def test_training_examples_write_the_time_split_apart_from_the_test_pairs(art):
    future = art.data.future_pairs
    assert future.num_rows > 0 and art.data.manifest["counts"]["future_pairs"] == future.num_rows
    assert set(future["source"].to_pylist()) <= {"engagement_pin_pin", "engagement_board_pin", "coengagement_pin_pin"}
    assert not _unordered(future) & _unordered(art.data.eval_pairs)


def test_the_time_split_selects_on_future_pairs_never_trained_on(art):
    train, val = split_validation(art.data, 0.5, seed=0, split="time")
    assert val.manifest["validation_split"] == "time"
    assert val.eval_pairs.equals(art.data.future_pairs)  # under half of the pairs: every future pair
    assert not _unordered(train.pairs) & _unordered(art.data.future_pairs)
    # only pairs of the time split leave training (every source, both directions)
    assert train.pairs.num_rows == without_pairs(art.data.pairs, art.data.future_pairs).num_rows
    assert train.pairs.num_rows < art.data.pairs.num_rows
    # users and feature nodes are carved by hash as with the hash split
    _, by_hash = split_validation(art.data, 0.5, seed=0, split="hash")
    assert by_hash.manifest["validation_split"] == "hash"
    assert val.eval_sequences.equals(by_hash.eval_sequences)
    assert not by_hash.eval_pairs.equals(val.eval_pairs)


def test_the_time_split_costs_training_at_most_its_fraction_of_the_pairs(art):
    """More future pairs than 5 % of the engagement and co-engagement pairs: a stateless hash keeps that many;
    the other future pairs stay in training."""
    sources = set(art.data.future_pairs["source"].to_pylist())
    same_sources = sum(s in sources for s in art.data.pairs["source"].to_pylist())
    assert art.data.future_pairs.num_rows > 0.05 * same_sources  # the tiny window's last days hold many
    train, val = split_validation(art.data, 0.05, seed=0, split="time")
    assert 0 < val.eval_pairs.num_rows <= 1.5 * 0.05 * same_sources
    assert _unordered(val.eval_pairs) < _unordered(art.data.future_pairs)
    assert not _unordered(train.pairs) & _unordered(val.eval_pairs)
    assert _unordered(train.pairs) & (_unordered(art.data.future_pairs) - _unordered(val.eval_pairs))
    _, again = split_validation(art.data, 0.05, seed=0, split="time")
    assert again.eval_pairs.equals(val.eval_pairs)


def test_the_time_split_falls_back_to_the_hash_split_without_future_pairs(art):
    old = dataclasses.replace(art.data, future_pairs=PAIR_SCHEMA.empty_table())
    train, val = split_validation(old, 0.05, seed=0, split="time")
    _, by_hash = split_validation(art.data, 0.05, seed=0, split="hash")
    assert val.manifest["validation_split"] == "hash" and val.eval_pairs.equals(by_hash.eval_pairs)
    assert train.pairs.num_rows + val.eval_pairs.num_rows == art.data.pairs.num_rows
    train, val = split_validation(art.data, 0.0, split="time")  # no validation: nothing held out
    assert val.manifest["validation_split"] == "none" and train.pairs.equals(art.data.pairs)


def test_a_partition_written_before_the_time_split_reads_with_none(art, tmp_path):
    import shutil

    old = tmp_path / "examples"
    shutil.copytree(art.data.path, old)
    (old / "future_pairs.parquet").unlink()
    data = load_training_examples(old)
    assert data.future_pairs.num_rows == 0 and data.future_pairs.schema == PAIR_SCHEMA


def test_the_report_scores_the_time_split_and_fits_baselines_without_it(art):
    only = future_pairs_only(art.data)
    assert only.eval_pairs.equals(art.data.future_pairs)
    assert only.eval_sequences.num_rows == 0 and only.eval_feature_nodes.num_rows == 0
    excluded = _unordered(scored_pairs(art.data))
    assert _unordered(art.data.future_pairs) <= excluded and _unordered(art.data.eval_pairs) <= excluded


def test_the_report_scores_the_pairs_the_champions_run_held_out(art):
    from types import SimpleNamespace

    from ml.validation import time_split_pairs

    champion = SimpleNamespace(extra={"validation_split": "time", "validation_fraction": 0.05, "eval": {"seed": 0}})
    scored = champions_time_split(art.data, champion).future_pairs
    _, val = split_validation(art.data, 0.05, seed=0, split="time")
    assert scored.equals(val.eval_pairs) and scored.equals(time_split_pairs(art.data, 0.05, 0))
    assert scored.num_rows < art.data.future_pairs.num_rows
    # a champion that held nothing out (validation_fraction 0, or an older model): every future pair
    older = SimpleNamespace(extra={})
    assert champions_time_split(art.data, older).future_pairs.equals(art.data.future_pairs)


def test_the_report_markdown_has_the_time_split_table():
    entry = lambda r, n: {"recall@10": r, "n": n}
    report = {
        "partition": "2026-01-03",
        "negatives": 100,
        "k": 10,
        "tasks": {"entity_entity": entry(0.2, 50)},
        "baselines": {},
        "time_split": {
            "cutoff": "2026-01-02T00:00:00+00:00",
            "pairs": 40,
            "entity_entity": {"model": entry(0.25, 40), "als": entry(0.125, 40)},
        },
    }
    text = markdown(report)
    assert "time split: 40 pairs first engaged after 2026-01-02" in text
    assert "| **model** | 0.2500 (40) |" in text and "| als | 0.1250 (40) |" in text
    assert "time split" not in markdown({**report, "time_split": None})
