"""training_examples + omnisage_model assets on tiny data: MLflow run, registry, promotion gate, resume."""

from __future__ import annotations

import json
import shutil
from datetime import UTC
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import TINY_TRAIN as TRAIN

import tests.pipeline_fixtures as pf
from assets.graph import HOLDOUT_FILE
from ml.training_examples import ExampleConfig, holdout_of
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import publish_partition, published_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory) -> Path:
    """An initialised empty MLflow sqlite database (creating the schema costs ~10 s; copying it nothing)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}", registry_uri=f"sqlite:///{path}").search_experiments()
    return path


def _copy_into(src: Path, dst: Path) -> None:
    for item in Path(src).iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst / item.name)


def publish_library_day(settings: Settings, art) -> None:
    """Publish the library chain's tiny artifacts into OMNISAGE_HOME as the upstream assets would: every
    day's logs, the last day's metadata, graph, features and pruned edges with its held-out choice."""
    for key, logs in zip(art.days, art.log_dirs):
        with publish_partition(settings.warehouse_dataset("engagement_logs"), key) as staging:
            _copy_into(logs, staging)
    for dataset, src in (
        (settings.warehouse_dataset("entity_metadata"), art.metadata_dir),
        (settings.graph_dir, art.graph_dir),
        (settings.features_dir, art.features_dir),
        (settings.warehouse_dataset("pruned_edges"), art.pruned_dir),
    ):
        with publish_partition(dataset, art.day) as staging:
            _copy_into(src, staging)
    # The graph's held-out choice, as the pruned_edges asset records it.
    holdout = holdout_of(ExampleConfig())
    (published_path(settings.warehouse_dataset("pruned_edges"), art.day) / HOLDOUT_FILE).write_text(
        json.dumps({"fraction": holdout.fraction, "seed": holdout.seed})
    )


@pytest.fixture
def published(tmp_path, omnisage_env, mlflow_template, monkeypatch):
    """The library chain's tiny artifacts, published into OMNISAGE_HOME as the upstream assets would."""
    from omnisage_pipeline.partitions import daily_partitions

    monkeypatch.setattr(pf, "START_DATE", daily_partitions.start.strftime("%Y-%m-%d"))
    art = pf.build_library_pipeline(tmp_path / "lib", scale="tiny", days=3, seed=0)
    settings = Settings.from_env()
    settings.home.mkdir(parents=True, exist_ok=True)
    shutil.copy(mlflow_template, settings.home / "mlflow.db")
    publish_library_day(settings, art)
    return settings, art


def _resources(settings: Settings) -> dict:
    from omnisage_pipeline.resources import MlflowResource, StorageResource

    return {
        "storage": StorageResource.from_settings(settings),
        "mlflow": MlflowResource.from_settings(settings),
    }


def _pairs(table: pa.Table) -> set[tuple]:
    return set(
        zip(
            table["query_type"].to_pylist(),
            table["query_id"].to_pylist(),
            table["pos_type"].to_pylist(),
            table["pos_id"].to_pylist(),
        )
    )


def _materialize_model(settings, config: dict) -> dg.MaterializeResult:
    from assets.training import omnisage_model

    result = dg.materialize(
        [omnisage_model],
        resources=_resources(settings),
        run_config={"ops": {"omnisage_model": {"config": config}}},
    )
    assert result.success
    return result.asset_materializations_for_node("omnisage_model")[0].metadata


def test_training_examples_model_and_gate(published):
    import mlflow

    from assets.training import OmniSageModelConfig, train_from_asset_config, training_examples
    from ml.registry import ModelRegistry
    from omnisage_pipeline.resources import MlflowResource

    settings, art = published
    day = art.day

    # ---- training_examples: published, counts per source and held-out counts in the metadata
    result = dg.materialize([training_examples], partition_key=day, resources=_resources(settings))
    assert result.success
    meta = result.asset_materializations_for_node("training_examples")[0].metadata
    out = published_path(settings.warehouse_dataset("training_examples"), day)
    assert out is not None and (out / "pairs.parquet").is_file() and (out / "universe.parquet").is_file()
    train_pairs, eval_pairs = pq.read_table(out / "pairs.parquet"), pq.read_table(out / "eval_pairs.parquet")
    assert meta["rows_pairs"].value == train_pairs.num_rows > 0
    assert meta["held_out_pairs"].value == eval_pairs.num_rows > 0
    assert meta["held_out_users"].value > 0
    by_source = {k[len("pairs.") :]: v.value for k, v in meta.items() if k.startswith("pairs.")}
    assert sum(by_source.values()) == train_pairs.num_rows
    assert {"engagement_pin_pin", "engagement_board_pin"} <= set(by_source)
    assert any(s.startswith("graph_") for s in by_source)
    assert meta["window"].value["present"] == art.days  # the whole (3-day) window of validated logs
    assert not (_pairs(train_pairs) & _pairs(eval_pairs))  # nothing held out is trained on

    # ---- a killed training (stopped at step 10, checkpoint kept) ...
    mlflow_res = MlflowResource.from_settings(settings)
    killed = train_from_asset_config(
        settings, mlflow_res, OmniSageModelConfig(**TRAIN), log=lambda m: None, stop_after=10
    )
    assert killed is None
    ckpts = list((settings.home / "checkpoints" / "omnisage_model").glob("*/last.pt"))
    assert len(ckpts) == 1

    # ---- ... is resumed by the next materialization with the same config: first model -> champion
    m1 = _materialize_model(settings, TRAIN)
    assert m1["resumed_from_step"].value == 10 and m1["steps"].value == TRAIN["steps"]
    assert m1["alias"].value == "champion" and m1["model_version"].value == "1"
    assert m1["training_partition"].value == day
    first_recall = m1["new_mean_recall_at_10"].value
    assert 0.0 < first_recall <= 1.0
    # selected and gated on the validation split carved from training rows, not on the held-out test sets
    assert m1["gate_split"].value == "validation" and 1 <= m1["selected_step"].value <= TRAIN["steps"]
    # ... the time split's pairs (first engaged in the window's last days), held out of training
    assert m1["validation_split"].value == "time" and meta["rows_future_pairs"].value > 0
    gate_recalls = [r["recall"] for r in m1["gate_new_recall"].value.values() if r["recall"] is not None]
    assert first_recall == pytest.approx(sum(gate_recalls) / len(gate_recalls), abs=1e-6)
    assert not list((settings.home / "checkpoints" / "omnisage_model").glob("*/last.pt"))  # removed once registered
    from ml.promotion_lock import promotion_lock_path

    # the gate took the promotion lock under OMNISAGE_HOME (any store, not only sqlite)
    lock_dir = settings.home / "checkpoints" / "omnisage_model"
    assert promotion_lock_path(lock_dir, settings.mlflow_tracking_uri, "omnisage").is_file()

    client = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    run = client.get_run(m1["mlflow_run_id"].value)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert (
        p["training_partition"] == day and p["config.steps"] == str(TRAIN["steps"]) and p["preset_resolved"] == "small"
    )
    assert p["model.out_dim"] == "32" and "train.lr" in p and "layout" in p
    assert run.data.tags["resumed_from_step"] == "10" and run.data.tags["gate.alias"] == "champion"
    assert run.data.tags["gate.split"] == "validation" and "validation/mean_recall_at_10" in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "loss/total")
    assert [m.step for m in history] == list(
        range(15, TRAIN["steps"] + 1, 5)
    )  # every log_every steps after the resume at 10
    assert any(k.startswith("loss/entity_entity") for k in run.data.metrics)
    assert any(k.startswith("loss/user_entity") for k in run.data.metrics)
    for task in ("entity_entity", "entity_feature", "user_entity"):
        assert 0.0 <= run.data.metrics[f"eval/recall_at_10/{task}"] <= 1.0
    killed_runs = [r for r in client.search_runs([run.info.experiment_id]) if r.info.status == "KILLED"]
    assert len(killed_runs) == 1 and run.data.tags["resumed_from_run"] == killed_runs[0].info.run_id
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/MLmodel", "model/data"} <= artifacts

    registry = ModelRegistry(settings.mlflow_tracking_uri)
    assert registry.version_for_alias("champion") == "1"
    champ = registry.load_champion()
    assert champ.version == "1" and champ.run_id == run.info.run_id and champ.training_partition == day

    # ---- a deliberately worse second model (0 steps: untrained weights) -> challenger, champion stays
    m2 = _materialize_model(settings, {**TRAIN, "steps": 0, "seed": 1})
    assert m2["model_version"].value == "2"
    assert m2["alias"].value == "challenger"
    assert m2["previous_champion_version"].value == "1"
    new, old = m2["new_mean_recall_at_10"].value, m2["champion_mean_recall_at_10"].value
    assert new < old
    assert abs(old - first_recall) < 1e-6  # the champion re-evaluated now gives the same number
    assert "challenger" in m2["gate_decision"].value
    assert registry.version_for_alias("champion") == "1"
    assert registry.version_for_alias("challenger") == "2"
    run2 = client.get_run(m2["mlflow_run_id"].value)
    assert run2.data.tags["gate.alias"] == "challenger"
    assert float(run2.data.tags["gate.champion_mean_recall"]) == pytest.approx(old, abs=1e-5)
    assert float(run2.data.tags["gate.new_mean_recall"]) == pytest.approx(new, abs=1e-5)
    assert registry.model_version("2").tags["gate.alias"] == "challenger"


def test_training_job_and_weekly_schedule(omnisage_env):
    from datetime import datetime

    from assets.training import omnisage_model, training_examples
    from omnisage_pipeline.settings import DEFAULT_DAGSTER_YAML
    from omnisage_pipeline.training_jobs import (
        TRAINING_JOB_NAME,
        build_training_schedule,
        training_job,
        training_schedule,
    )

    defs = dg.Definitions(
        assets=[training_examples, omnisage_model],
        jobs=[training_job],
        schedules=[training_schedule],
        resources=_resources(Settings.from_env()),
    )
    job = defs.resolve_job_def(TRAINING_JOB_NAME)
    # a pool of its own (limit 1 in the project's dagster.yaml: its default_limit): one training at a time
    assert omnisage_model.op.pool == "omnisage_model" != training_examples.op.pool
    assert "default_limit: 1" in DEFAULT_DAGSTER_YAML
    assert [k.to_user_string() for k in job.asset_layer.executable_asset_keys] == ["omnisage_model"]
    assert training_schedule.cron_schedule == "0 3 * * 1" and training_schedule.execution_timezone == "UTC"
    # A tick at Monday 2026-01-05 03:00 UTC asks for one run of the training job.
    ctx = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 1, 5, 3, 0, tzinfo=UTC))
    requests = training_schedule.evaluate_tick(ctx).run_requests
    assert len(requests) == 1 and requests[0].partition_key is None
    assert build_training_schedule("30 4 * * 0").cron_schedule == "30 4 * * 0"
    with pytest.raises(dg.DagsterInvalidDefinitionError):
        build_training_schedule("not a cron")


@pytest.mark.parametrize("bad", ["2026-01-05/../../etc", "2026-01-5", "20260105", "1999-01-01", "2999-01-01"])
def test_training_partition_config_is_a_daily_partition_key(omnisage_env, bad):
    """A training_partition that is not an existing daily partition key is refused, naming the field and the
    value, before any path is built from it."""
    import pydantic

    from assets.training import OmniSageModelConfig, omnisage_model
    from omnisage_pipeline.partitions import daily_partitions

    first = daily_partitions.start.strftime("%Y-%m-%d")
    assert OmniSageModelConfig(training_partition=first).training_partition == first
    refused = r"training_partition.*" + repr(bad).replace(".", r"\.")
    with pytest.raises(pydantic.ValidationError, match=refused):
        OmniSageModelConfig(training_partition=bad)
    with pytest.raises(pydantic.ValidationError, match=refused):  # the run fails before training
        dg.materialize(
            [omnisage_model],
            resources=_resources(Settings.from_env()),
            run_config={"ops": {"omnisage_model": {"config": {"training_partition": bad}}}},
        )
