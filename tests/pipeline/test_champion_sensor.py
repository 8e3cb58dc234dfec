"""champion_embeddings_sensor and the source asset champion_model.

- A champion alias change re-materializes the served day's embeddings (and what depends on them) once;
  nothing is requested while the served day is embedded with the champion.
- Lineage follows what the code reads: entity_embeddings depends on champion_model (the alias), not on
  omnisage_model. With the real MLflow registry and the code location's asset graph, a challenger that is
  not promoted leaves an embedded day fresh; promoting it (observed by the sensor) marks the day stale.
"""

from __future__ import annotations

import json

import dagster as dg
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from assets.sources import CHAMPION_MODEL, DATA_VERSION_TAG, latest_data_version
from omnisage_pipeline import sensors
from omnisage_pipeline.resources import MlflowResource, StorageResource
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import publish_partition

pytestmark = pytest.mark.slow

EMBEDDINGS = dg.AssetKey("entity_embeddings")
DAY = "2026-03-02"


def _publish(folder, day, manifest=None):
    with publish_partition(folder, day) as staging:
        (staging / "x").write_text("x")
        if manifest is not None:
            (staging / "_manifest.json").write_text(json.dumps(manifest))


def _resources(settings):
    return {
        "storage": StorageResource.from_settings(settings),
        "mlflow": MlflowResource.from_settings(settings),
    }


def _tick(settings, instance) -> dg.SensorResult:
    """One evaluation; its asset events are reported to the instance as the sensor daemon does."""
    with dg.build_sensor_context(instance=instance, resources=_resources(settings)) as context:
        result = sensors.champion_embeddings_sensor(context)
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return result


def _evaluate(settings, monkeypatch, champion, instance):
    monkeypatch.setattr(sensors, "champion_version", lambda mlflow: champion)
    return _tick(settings, instance)


def test_alias_change_requests_the_served_day_once(omnisage_env, monkeypatch):
    settings = Settings.from_env()
    instance = dg.DagsterInstance.ephemeral()
    for day in ("2026-03-01", "2026-03-02"):
        for folder in (
            settings.warehouse_dataset("entity_metadata"),
            settings.graph_dir,
            settings.features_dir,
            settings.warehouse_dataset("training_examples"),
        ):
            _publish(folder, day)
    _publish(settings.graph_dir, "2026-03-03")  # inputs incomplete: not the served day
    _publish(settings.embeddings_dir, "2026-03-02", {"model_version": "3"})

    none = _evaluate(settings, monkeypatch, None, instance)
    assert not none.run_requests and isinstance(none.skip_reason, dg.SkipReason)
    skipped = _evaluate(settings, monkeypatch, "3", instance)
    assert not skipped.run_requests and "2026-03-02" in skipped.skip_reason.skip_message

    result = _evaluate(settings, monkeypatch, "4", instance)  # the alias moved
    (request,) = result.run_requests
    assert request.partition_key == "2026-03-02" and request.run_key == "2026-03-02:v4"
    # Each tick observed champion_model when (and only when) the alias had moved since the last observation.
    assert [e.tags[DATA_VERSION_TAG] for e in none.asset_events + skipped.asset_events] == ["none", "3"]
    assert [e.tags[DATA_VERSION_TAG] for e in result.asset_events] == ["4"]
    assert not _evaluate(settings, monkeypatch, "4", instance).asset_events
    assert latest_data_version(instance, CHAMPION_MODEL) == "4"
    # The target: the embeddings and what depends on them.
    from omnisage_pipeline.definitions import defs

    target = sensors.TARGET.resolve(defs.resolve_asset_graph())
    assert {k.to_user_string() for k in target} == {
        "entity_embeddings",
        "recall_report",
        "ann_index",
    }  # the served index follows
    assert defs.resolve_sensor_def(sensors.SENSOR_NAME).default_status == dg.DefaultSensorStatus.STOPPED


def test_champion_consumers_depend_on_champion_model_not_on_training():
    from omnisage_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    for consumer in ("entity_embeddings", "recall_report"):
        parents = graph.get(dg.AssetKey(consumer)).parent_keys
        assert CHAMPION_MODEL in parents and dg.AssetKey("omnisage_model") not in parents, (consumer, parents)
    champion = graph.get(CHAMPION_MODEL)
    assert champion.is_observable and not champion.is_materializable
    assert champion.parent_keys == {dg.AssetKey("omnisage_model")}  # lineage: the gate moves the alias


# ------------------------------------------------------------------------------------- staleness
@pytest.fixture
def registry(omnisage_env, tmp_path):
    """The MLflow registry of the test's home, and a way to register a (placeholder) model version: only
    the aliases are read here, never the model."""
    from ml.registry import ModelRegistry

    settings = Settings.from_env()
    mlflow = MlflowResource.from_settings(settings)
    client, experiment = mlflow.client(), mlflow.experiment_id()
    placeholder = tmp_path / "model.txt"
    placeholder.write_text("stands for a model directory")

    def register() -> str:
        run_id = client.create_run(experiment).info.run_id
        client.log_artifact(run_id, str(placeholder), artifact_path="model")
        client.set_terminated(run_id)
        return ModelRegistry(mlflow.tracking_uri).register(run_id, "model")

    return settings, ModelRegistry(mlflow.tracking_uri), register


def _embed(instance, settings, day):
    """A materialization of entity_embeddings of ``day`` recorded exactly as the real asset's would be for
    staleness (its key, deps, partitions and code version, from the code location), without embedding."""
    from omnisage_pipeline.definitions import build_resources, defs

    spec = defs.get_assets_def(EMBEDDINGS).get_asset_spec(EMBEDDINGS)

    @dg.multi_asset(specs=[spec])
    def entity_embeddings():
        return dg.MaterializeResult()

    others = [a for a in defs.assets if not (isinstance(a, dg.AssetsDefinition) and EMBEDDINGS in a.keys)]
    result = dg.materialize(
        [entity_embeddings, *others],
        selection=[EMBEDDINGS],
        partition_key=day,
        instance=instance,
        resources=build_resources(settings),
    )
    assert result.success


def _status(instance):
    from omnisage_pipeline.definitions import defs

    resolver = get_stale_status_resolver(instance, list(defs.assets))
    return resolver.get_status(EMBEDDINGS, DAY), resolver.get_stale_causes(EMBEDDINGS, DAY)


def test_a_challenger_leaves_embedded_days_fresh_and_a_promotion_stales_them(registry):
    from ml.registry import CHALLENGER, CHAMPION

    settings, models, register = registry
    instance = dg.DagsterInstance.ephemeral()
    first = register()
    models.set_alias(CHAMPION, first)
    assert [e.tags[DATA_VERSION_TAG] for e in _tick(settings, instance).asset_events] == [first]
    _embed(instance, settings, DAY)
    assert _status(instance) == (StaleStatus.FRESH, [])

    # Weekly training: a new omnisage_model materialization whose version lost the gate.
    challenger = register()
    models.set_alias(CHALLENGER, challenger)
    instance.report_runless_asset_event(
        dg.AssetMaterialization("omnisage_model", tags={DATA_VERSION_TAG: f"version-{challenger}"})
    )
    assert not _tick(settings, instance).asset_events  # the alias did not move: nothing new to observe
    assert _status(instance) == (StaleStatus.FRESH, [])

    # The next one wins the gate: the alias moves, the sensor observes it, the embedded day is stale.
    models.set_alias(CHAMPION, challenger)
    assert [e.tags[DATA_VERSION_TAG] for e in _tick(settings, instance).asset_events] == [challenger]
    status, causes = _status(instance)
    assert status == StaleStatus.STALE
    assert [(c.dependency.asset_key, c.reason) for c in causes] == [
        (CHAMPION_MODEL, "has a new dependency data version")
    ]
