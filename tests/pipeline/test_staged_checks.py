"""Blocking checks run on the staged output, before publishing: a failure keeps the previous published
version, records the failed AssetCheckResult and fails the step naming the check, the day and the figure.
Every check is made to fail here."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnisage_pipeline.storage.publish import published_path
from omnisage_pipeline.tools.synthetic import generate

DAY = "2026-03-01"


@pytest.fixture
def data_root(omnisage_env, tmp_path, monkeypatch):
    root = tmp_path / "data"
    generate(root, start_date=DAY, days=1, scale="tiny", seed=0)
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(root))
    return root


def _run(assets, selection=None, run_config=None, raise_on_error=True):
    from omnisage_pipeline.resources import StorageResource, lazy_pyspark
    from omnisage_pipeline.settings import Settings

    settings = Settings.from_env()
    return dg.materialize(
        assets,
        partition_key=DAY,
        selection=selection,
        resources={"storage": StorageResource.from_settings(settings), "pyspark": lazy_pyspark(settings)},
        run_config=run_config,
        raise_on_error=raise_on_error,
    )


def _failure_message(result) -> str:
    (event,) = [e for e in result.all_events if e.is_step_failure]
    err, texts = event.step_failure_data.error, []
    while err is not None:
        texts.append(err.message)
        err = err.cause
    return "\n".join(texts)


def _check(result, name: str):
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == name]
    return check


def _make_mostly_invalid(root, share: float) -> int:
    """Rewrite the day's logs so that ``share`` of the rows have an unknown surface; returns rows."""
    folder = root / "engagement_logs" / f"dt={DAY}"
    files = sorted(folder.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    for f in files:
        f.unlink()
    n = table.num_rows
    surface = np.array(table.column("surface").to_pylist(), dtype=object)
    surface[: round(share * n)] = "nowhere"
    table = table.set_column(table.schema.get_field_index("surface"), "surface", pa.array(surface, pa.string()))
    pq.write_table(table, folder / "part-0.parquet")
    return n


def test_quarantine_share_refuses_a_bad_day_and_keeps_the_previous_version(data_root):
    from assets.ingest import engagement_logs
    from omnisage_pipeline.settings import Settings

    settings = Settings.from_env()
    assert _run([engagement_logs]).success
    valid_ds, quarantine_ds = (
        settings.warehouse_dataset("engagement_logs"),
        settings.quarantine_dataset("engagement_logs"),
    )
    before = published_path(valid_ds, DAY)

    rows = _make_mostly_invalid(data_root, 0.6)
    result = _run([engagement_logs], raise_on_error=False)
    assert not result.success
    assert published_path(valid_ds, DAY) == before  # readers still read the previous version
    assert pq.read_table(published_path(quarantine_ds, DAY)).num_rows == round(0.6 * rows)  # still written
    check = _check(result, "quarantine_share")
    assert not check.passed and check.metadata["quarantined_share"].value == pytest.approx(0.6, abs=0.01)
    message = _failure_message(result)
    assert "quarantine_share" in message and f"dt={DAY}" in message and "0.600" in message

    # The threshold is config: the same day passes at 0.7.
    config = {"ops": {"engagement_logs": {"config": {"max_quarantine_fraction": 0.7}}}}
    assert _run([engagement_logs], run_config=config).success
    assert published_path(valid_ds, DAY) != before


def test_an_empty_day_passes_the_quarantine_check(data_root):
    from assets.ingest import engagement_logs

    # Delivered and empty (a day folder without rows); a missing folder is an error, not an empty day.
    for f in (data_root / "engagement_logs" / f"dt={DAY}").glob("*.parquet"):
        f.unlink()
    result = _run([engagement_logs])
    check = _check(result, "quarantine_share")
    assert check.passed and check.metadata["rows_read"].value == 0


def test_no_empty_replacement_keeps_a_published_day_with_rows(data_root):
    from assets.ingest import engagement_logs
    from omnisage_pipeline.settings import Settings

    settings = Settings.from_env()
    assert _run([engagement_logs]).success
    valid_ds, quarantine_ds = (
        settings.warehouse_dataset("engagement_logs"),
        settings.quarantine_dataset("engagement_logs"),
    )
    before = (published_path(valid_ds, DAY), published_path(quarantine_ds, DAY))
    rows = pq.read_table(before[0]).num_rows
    for f in (data_root / "engagement_logs" / f"dt={DAY}").glob("*.parquet"):
        f.unlink()
    result = _run([engagement_logs], raise_on_error=False)
    assert not result.success
    check = _check(result, "no_empty_replacement")
    assert not check.passed and check.metadata["published_rows"].value == {"": rows}
    message = _failure_message(result)
    assert "no_empty_replacement" in message and f"dt={DAY}" in message and f"{rows} rows published" in message
    assert (published_path(valid_ds, DAY), published_path(quarantine_ds, DAY)) == before  # neither replaced


def test_graph_coverage_refuses_a_layout_that_leaves_nodes_without_neighbours(data_root):
    from assets.graph import daily_edges, pruned_edges
    from assets.ingest import engagement_logs, entity_metadata
    from assets.snapshot import graph_snapshot
    from omnisage_pipeline.settings import Settings

    every = [engagement_logs, entity_metadata, daily_edges, pruned_edges, graph_snapshot]
    small = {"blocks": ["pin_board:pin:4", "pin_board:board:4", "pin_pin:pin:4"]}
    result = _run(every, run_config={"ops": {"graph_snapshot": {"config": small}}})
    assert result.success and _check(result, "graph_coverage").passed
    before = published_path(Settings.from_env().graph_dir, DAY)

    # Only pin_pin blocks: boards (and pins without related-pins edges) get no neighbours at all.
    pins_only = {"blocks": ["pin_pin:pin:4"], "min_coverage": 0.9}
    result = _run(
        every,
        selection=[graph_snapshot],
        run_config={"ops": {"graph_snapshot": {"config": pins_only}}},
        raise_on_error=False,
    )
    assert not result.success
    check = _check(result, "graph_coverage")
    assert not check.passed and check.metadata["coverage"].value < 0.9
    assert "graph_coverage" in _failure_message(result) and f"dt={DAY}" in _failure_message(result)
    assert published_path(Settings.from_env().graph_dir, DAY) == before


def test_features_complete_fails_on_a_missing_entity(data_root):
    from assets.checks import features_complete
    from assets.features import feature_store
    from assets.graph import daily_edges, pruned_edges
    from assets.ingest import engagement_logs, entity_metadata
    from assets.snapshot import graph_snapshot
    from graph_engine.snapshot import GraphSnapshot
    from omnisage_pipeline.embedding.day import day_entities
    from omnisage_pipeline.settings import Settings

    small = {"blocks": ["pin_board:pin:4", "pin_board:board:4", "pin_pin:pin:4"]}
    every = [engagement_logs, entity_metadata, daily_edges, pruned_edges, graph_snapshot, feature_store]
    result = _run(every, run_config={"ops": {"graph_snapshot": {"config": small}}})
    assert _check(result, "every_entity_has_features").passed
    settings = Settings.from_env()
    store = published_path(settings.features_dir, DAY)
    entities = day_entities(
        published_path(settings.warehouse_dataset("entity_metadata"), DAY),
        GraphSnapshot.open(published_path(settings.graph_dir, DAY)),
    )
    assert features_complete(store, entities).passed
    entities["board"] = np.append(entities["board"], 987_654_321)
    check = features_complete(store, entities)
    assert not check.passed and check.metadata["entities_missing"].value == 1
    assert "board id=987654321" in check.description


def test_examples_per_task_fails_when_a_task_has_no_rows(tmp_path):
    from assets.checks import examples_per_task

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "pairs.parquet")
    pq.write_table(pa.table({"x": pa.array([], pa.int64())}), tmp_path / "feature_nodes.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "sequences.parquet")
    check = examples_per_task(tmp_path, ["entity_entity", "entity_feature", "user_entity"])
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR  # blocks the day
    assert check.metadata["empty_tasks"].value == ["entity_feature"]
    assert "entity_feature (0 rows of feature_nodes)" in check.description
    check = examples_per_task(tmp_path, ["entity_entity", "user_entity"])  # not required: a warning only
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    pq.write_table(pa.table({"x": [3]}), tmp_path / "feature_nodes.parquet")
    assert examples_per_task(tmp_path, ["entity_entity", "entity_feature", "user_entity"]).passed


def _embeddings(tmp_path, vectors, ids, versions):
    from omnisage_pipeline.embedding.day import entity_table

    folder = tmp_path / "emb"
    folder.mkdir(exist_ok=True)
    table = entity_table("pin", np.array(ids), np.array(vectors, np.float32), "1")
    table = table.set_column(3, "model_version", pa.array(versions, pa.string()))
    pq.write_table(table, folder / "part-00000-of-00001.parquet")
    return folder


@pytest.mark.parametrize(
    "vectors, ids, versions, expected, problem",
    [
        ([[1, 0], [np.nan, 0]], [1, 2], ["7", "7"], 2, "non_finite"),
        ([[1, 0], [0.5, 0]], [1, 2], ["7", "7"], 2, "not_unit_norm"),
        ([[1, 0], [0, 1]], [1, 1], ["7", "7"], 1, "duplicates"),
        ([[1, 0], [0, 1]], [1, 2], ["7", "7"], 3, "missing_or_extra"),
        ([[1, 0], [0, 1]], [1, 2], ["7", "6"], 2, "other_versions"),
    ],
)
def test_embeddings_valid_fails_on_each_defect(tmp_path, vectors, ids, versions, expected, problem):
    from assets.checks import embeddings_valid

    good = _embeddings(tmp_path, [[1, 0], [0, 1]], [1, 2], ["7", "7"])
    assert embeddings_valid(good, 2, "7", 1e-3).passed
    check = embeddings_valid(_embeddings(tmp_path, vectors, ids, versions), expected, "7", 1e-3)
    assert not check.passed and check.metadata[problem].value != 0, check.metadata
    assert problem in check.description


def test_publish_validate_hook_keeps_the_previous_version(tmp_path):
    from omnisage_pipeline.storage.publish import publish_partition

    with publish_partition(tmp_path / "ds", DAY) as staging:
        (staging / "a.txt").write_text("old")
    before = published_path(tmp_path / "ds", DAY)

    def refuse(staged):
        assert (staged / "a.txt").read_text() == "new"  # sees the finished staging
        raise ValueError("refused")

    with (
        pytest.raises(ValueError, match="refused"),
        publish_partition(tmp_path / "ds", DAY, validate=refuse) as staging,
    ):
        (staging / "a.txt").write_text("new")
    assert published_path(tmp_path / "ds", DAY) == before
    assert (before / "a.txt").read_text() == "old"
    assert not list((tmp_path / "ds" / ".staging").glob("dt=*"))


def test_rows_accounted_fails_when_published_rows_do_not_add_up(tmp_path):
    from assets.ingest import _accounting_check

    valid, quarantine = tmp_path / "valid", tmp_path / "quarantine"
    valid.mkdir()
    quarantine.mkdir()
    pq.write_table(pa.table({"x": [1, 2, 3]}), valid / "part-0.parquet")
    pq.write_table(pa.table({"x": [4]}), quarantine / "part-0.parquet")
    assert _accounting_check("engagement_logs", 4, [valid, quarantine]).passed
    check = _accounting_check("engagement_logs", 5, [valid, quarantine])  # a row lost on the way
    assert not check.passed and check.metadata["rows_published"].value == 4
