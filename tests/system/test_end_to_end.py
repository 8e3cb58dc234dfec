"""The whole asset graph in one process on tiny synthetic data (DuckDB engine): ingest -> edges -> pruning ->
snapshot -> features -> training examples -> omnisage_model (MLflow run, registry, champion gate) ->
entity_embeddings; then the promises of the model's outputs (registered pickle-free versions, a champion, the
day's embeddings) are checked on the published outputs."""

from __future__ import annotations

import dagster as dg
import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import require_published
from omnisage_pipeline.tools.synthetic import generate

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
ENGAGEMENT_SOURCES = ("engagement_pin_pin", "engagement_board_pin")


def _unordered(types_a, ids_a, types_b, ids_b) -> set[tuple]:
    return {tuple(sorted([(ta, ia), (tb, ib)])) for ta, ia, tb, ib in zip(types_a, ids_a, types_b, ids_b)}


@pytest.fixture
def pipeline(tmp_path, omnisage_env, monkeypatch):
    data_root = tmp_path / "data"
    generate(data_root, start_date=DAYS[0], days=len(DAYS), scale="tiny", seed=0)
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(data_root))
    from assets.training import OmniSageModelConfig
    from omnisage_pipeline.definitions import build_resources, defs

    settings = Settings.from_env()
    assets = list(defs.assets)
    resources = build_resources(settings)
    daily = [a for a in assets if isinstance(a, dg.AssetsDefinition) and a.partitions_def is not None]
    from omnisage_pipeline.tools.demo import MODEL_CONSUMERS

    data_keys = [k for a in daily for k in a.keys if k.to_user_string() not in MODEL_CONSUMERS]
    for day in DAYS:
        result = dg.materialize(assets, selection=data_keys, partition_key=day, resources=resources)
        assert result.success

    def train(steps: int, **extra) -> dict:
        # validation_fraction 0: a 5% validation split of this tiny set holds too few feature nodes for a stable
        # gate, which then falls back to the held-out sets (test_training_assets covers the validation gate)
        config = OmniSageModelConfig(
            steps=steps,
            batch_size=32,
            num_random_negatives=32,
            pool_size=2000,
            validation_fraction=0.0,
            # the settings this gate scenario was measured with: content-only f_t (the identity token sends
            # entity-feature recall, the task gated on below, to chance) and distinct pairs drawn uniformly
            id_buckets=0,
            pair_sampling="uniform",
            **{"lambda_f": 1.0, **extra},
        )
        result = dg.materialize(
            assets,
            selection=["omnisage_model"],
            resources=resources,
            run_config=dg.RunConfig({"omnisage_model": config}),
        )
        assert result.success
        return result.asset_materializations_for_node("omnisage_model")[-1].metadata

    # eq. 6 weighted towards entity-feature (the other terms at 0.1): the gate below compares on that task
    # 120 steps: with windowed sequences (more, shorter ones) 60 steps tied the untrained model on entity-feature.
    first = train(120, lambda_p=0.1, lambda_s=0.1)
    # Deliberately worse: untrained weights, gated on the task the first model measurably learns on this tiny set
    # (entity-feature; an untrained embedder already scores entity-entity from its neighbours' features, and
    # a short run does not reliably beat that here).
    second = train(0, tasks=["entity_feature"])
    result = dg.materialize(
        assets, selection=["entity_embeddings", "recall_report"], partition_key=DAYS[-1], resources=resources
    )
    assert result.success
    report_meta = result.asset_materializations_for_node("recall_report")[-1].metadata
    checks = result.get_asset_check_evaluations()
    return (
        settings,
        first,
        second,
        {"assets": assets, "resources": resources, "meta": report_meta, "checks": checks},
    )


def test_whole_asset_graph_end_to_end(pipeline):
    settings, first, second, _ = pipeline
    day = DAYS[-1]

    # MLflow: one run per materialization with params and metrics, two registered versions.
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = mlflow.MlflowClient()
    run = client.get_run(first["mlflow_run_id"].value)
    assert run.data.params["training_partition"] == day
    assert "eval/mean_recall_at_10" in run.data.metrics
    assert any(k.startswith("loss/") for k in run.data.metrics)
    versions = client.search_model_versions("name='omnisage'")
    assert sorted(int(v.version) for v in versions) == [1, 2]

    # The gate: champion on the first model, NOT moved by the worse second one.
    assert first["alias"].value == "champion"
    assert second["alias"].value == "challenger"
    assert second["champion_mean_recall_at_10"].value > second["new_mean_recall_at_10"].value
    assert str(client.get_model_version_by_alias("omnisage", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("omnisage", "challenger").version) == "2"

    # Embeddings for exactly the day's pins and boards (metadata UNION graph), unit-norm, finite, versioned.
    from graph_engine.snapshot import GraphSnapshot

    emb = pq.read_table(require_published(settings.embeddings_dir, day))
    graph = GraphSnapshot.open(require_published(settings.graph_dir, day))
    meta_dir = require_published(settings.warehouse_dataset("entity_metadata"), day)
    expected = {("pin", i) for i in pq.read_table(meta_dir / "pins").column("pin_id").to_pylist()}
    expected |= {("board", i) for i in pq.read_table(meta_dir / "boards").column("board_id").to_pylist()}
    names = np.where(np.asarray(graph.node_type) == 0, "pin", "board")
    expected |= set(zip(names.tolist(), np.asarray(graph.node_id).tolist()))
    got = list(zip(emb.column("entity_type").to_pylist(), emb.column("entity_id").to_pylist()))
    assert len(got) == len(set(got)) and set(got) == expected
    vectors = np.asarray(emb.column("embedding").to_pylist(), dtype=np.float32)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert set(emb.column("model_version").to_pylist()) == {"1"}

    # The registered champion, loaded back from the registry, reproduces them.
    from graph_engine.batch_builder import BatchBuilder
    from graph_engine.featurizer import Featurizer
    from graph_engine.neighbor_sampler import NeighborhoodCache
    from ml.inference import embed_entities
    from ml.registry import ModelRegistry

    loaded = ModelRegistry(settings.mlflow_tracking_uri).load_champion()
    cache = NeighborhoodCache.open(require_published(settings.graph_dir, day) / "neighborhoods", graph)
    featurizer = Featurizer(require_published(settings.features_dir, day), max_tokens=loaded.max_tokens)
    builder = BatchBuilder(graph, cache, featurizer, cache.layout)
    for entity_type in ("pin", "board"):
        rows = [i for i, (t, _) in enumerate(got) if t == entity_type][:50]
        ids = np.asarray([got[i][1] for i in rows], dtype=np.int64)
        again = embed_entities(loaded.model, builder, entity_type, ids, batch_size=16)
        np.testing.assert_allclose(again, vectors[rows], atol=2e-5)

    # No held-out pair is a training pair, and no held-out engagement pair is an edge of the graph that
    # embedded its query (the day's pruned graph).
    examples = require_published(settings.warehouse_dataset("training_examples"), day)
    train_pairs = pq.read_table(examples / "pairs.parquet").to_pydict()
    eval_pairs = pq.read_table(examples / "eval_pairs.parquet").to_pydict()
    assert len(eval_pairs["query_id"]) > 0
    held = _unordered(eval_pairs["query_type"], eval_pairs["query_id"], eval_pairs["pos_type"], eval_pairs["pos_id"])
    trained = _unordered(
        train_pairs["query_type"], train_pairs["query_id"], train_pairs["pos_type"], train_pairs["pos_id"]
    )
    assert not held & trained
    edges = pq.read_table(require_published(settings.warehouse_dataset("pruned_edges"), day)).to_pydict()
    graph_edges = _unordered(edges["src_type"], edges["src_id"], edges["dst_type"], edges["dst_id"])
    engagement_held = {
        pair
        for pair, source in zip(
            [
                tuple(sorted([(a, b), (c, d)]))
                for a, b, c, d in zip(
                    eval_pairs["query_type"], eval_pairs["query_id"], eval_pairs["pos_type"], eval_pairs["pos_id"]
                )
            ],
            eval_pairs["source"],
        )
        if source in ENGAGEMENT_SOURCES
    }
    assert engagement_held, "the tiny data set should hold out some engagement pairs"
    assert not engagement_held & graph_edges


def test_recall_report_on_the_champion_with_baselines_mlflow_and_regression_check(pipeline):
    """recall_report: contract shape, every baseline on the model's sets, logged to the champion's MLflow run,
    markdown + PNG in the UI metadata; its check passes with no previous report and fires on a drop."""
    import json

    from assets.evaluation import REGRESSION_CHECK
    from omnisage_pipeline.storage.publish import publish_partition

    settings, first, _, rr = pipeline
    day = DAYS[-1]
    report = json.loads((require_published(settings.reports_dir, day) / "recall.json").read_text())
    assert report["partition"] == day and report["model_version"] == "1"
    assert report["negatives"] == 10_000 and isinstance(report["negatives"], int)
    assert set(report["tasks"]) == {"entity_entity", "entity_feature", "user_entity"}
    for task, entry in report["tasks"].items():
        assert set(entry) >= {"recall@10", "n"}, task
        assert entry["n"] > 0 and 0.0 <= entry["recall@10"] <= 1.0, (task, entry)
    assert list(report["baselines"]) == [
        "random",
        "popularity",
        "cooccurrence",
        "window_cooccurrence",
        "ease",
        "als",
        "pinsage",
        "oracle",
    ]
    for name, tasks in report["baselines"].items():
        ee = tasks["entity_entity"]
        assert ee["n"] == report["tasks"]["entity_entity"]["n"], name  # the same evaluation pairs
        assert ee["recall@10"] is not None, name
        assert tasks["entity_feature"]["recall@10"] is None and tasks["entity_feature"]["n"] == 0, name
    for name in ("random", "popularity", "cooccurrence", "window_cooccurrence", "ease", "als", "oracle"):
        assert report["baselines"][name]["user_entity"]["n"] == report["tasks"]["user_entity"]["n"], name
    assert report["baselines"]["pinsage"]["user_entity"]["n"] == 0  # entity-entity task only (Table 2)
    # per-source and per-segment breakdowns inside the task
    assert {"graph", "engagement", "per_source", "per_segment"} <= set(report["tasks"]["entity_entity"])
    # the time split: every system again on the pairs first engaged in the window's last days
    split = report["time_split"]
    assert split["pairs"] > 0 and split["champion_validation_split"] == "none"  # validation_fraction 0
    assert split["champion_held_out"] is False
    assert list(split["entity_entity"]) == ["model", *report["baselines"]]
    n = split["entity_entity"]["model"]["n"]
    assert n > 0 and all(entry["n"] == n for entry in split["entity_entity"].values())
    assert rr["meta"]["recall_at_10.time_split.entity_entity"].value == split["entity_entity"]["model"]["recall@10"]

    published = require_published(settings.reports_dir, day)
    assert (published / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = rr["meta"]
    assert "| random |" in meta["report"].value and "data:image/png;base64," in meta["report"].value
    assert meta["model_version"].value == "1"

    client = mlflow.MlflowClient()
    # the daily report is an evaluation run of its own: the champion's training run is left as it finished
    training_run = client.get_run(first["mlflow_run_id"].value)
    assert not [m for m in training_run.data.metrics if m.startswith("report/")]
    assert [a.path for a in client.list_artifacts(training_run.info.run_id, "baselines")] == ["baselines/pinsage"]
    run = client.get_run(meta["mlflow_evaluation_run_id"].value)
    assert run.info.status == "FINISHED" and run.data.tags["omnisage.kind"] == "evaluation"
    assert run.data.tags["partition"] == day and run.data.tags["model_version"] == "1"
    assert run.data.tags["model_run_id"] == training_run.info.run_id and run.data.tags["model_id"]
    assert run.data.metrics["report/recall_at_10/entity_entity"] == pytest.approx(
        report["tasks"]["entity_entity"]["recall@10"]
    )
    assert "report/oracle/recall_at_10/entity_entity" in run.data.metrics
    assert "report/recall_at_10/time_split/entity_entity" in run.data.metrics
    reports = [a.path for a in client.list_artifacts(run.info.run_id, f"reports/dt={day}")]
    assert reports == [f"reports/dt={day}/recall.json", f"reports/dt={day}/recall.png"]
    inputs = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert {f"training_examples dt={day}", f"graph dt={day}", f"features dt={day}"} <= inputs
    assert [m.model_id for m in run.inputs.model_inputs] == [run.data.tags["model_id"]]

    first_check = [c for c in rr["checks"] if c.check_name == REGRESSION_CHECK]
    assert len(first_check) == 1 and first_check[0].passed  # no previous report

    # A previous report with a much higher entity-entity recall: the check fires (and names the task).
    previous = dict(report, partition=DAYS[-2])
    previous["tasks"] = dict(
        report["tasks"], entity_entity=dict(report["tasks"]["entity_entity"], **{"recall@10": 1.0})
    )
    with publish_partition(settings.reports_dir, DAYS[-2]) as staging:
        (staging / "recall.json").write_text(json.dumps(previous))
    result = dg.materialize(rr["assets"], selection=["recall_report"], partition_key=day, resources=rr["resources"])
    assert result.success  # a failed check flags; it does not fail the run
    fired = [c for c in result.get_asset_check_evaluations() if c.check_name == REGRESSION_CHECK]
    assert len(fired) == 1 and not fired[0].passed
    assert "entity_entity" in fired[0].description
    assert set(fired[0].metadata["drops"].value) == {"entity_entity"}
