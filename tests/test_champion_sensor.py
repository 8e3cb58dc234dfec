"""champion_embeddings_sensor: a champion alias change re-materializes the served day's embeddings (and what
depends on them) once; nothing is requested while the served day is embedded with the champion."""

from __future__ import annotations

import json

import dagster as dg

from omnisage_pipeline import sensors
from omnisage_pipeline.resources import MlflowResource, StorageResource
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import publish_partition


def _publish(folder, day, manifest=None):
    with publish_partition(folder, day) as staging:
        (staging / "x").write_text("x")
        if manifest is not None:
            (staging / "_manifest.json").write_text(json.dumps(manifest))


def _evaluate(settings, monkeypatch, champion):
    monkeypatch.setattr(sensors, "champion_version", lambda mlflow: champion)
    resources = {
        "storage": StorageResource.from_settings(settings),
        "mlflow": MlflowResource.from_settings(settings),
    }
    with dg.build_sensor_context(resources=resources) as context:
        return sensors.champion_embeddings_sensor(context)


def test_alias_change_requests_the_served_day_once(omnisage_env, monkeypatch):
    settings = Settings.from_env()
    for day in ("2026-03-01", "2026-03-02"):
        for folder in (settings.warehouse_dataset("entity_metadata"), settings.graph_dir, settings.features_dir,
                       settings.warehouse_dataset("training_examples")):  # fmt: skip
            _publish(folder, day)
    _publish(settings.graph_dir, "2026-03-03")  # inputs incomplete: not the served day
    _publish(settings.embeddings_dir, "2026-03-02", {"model_version": "3"})

    assert isinstance(_evaluate(settings, monkeypatch, None), dg.SkipReason)
    skipped = _evaluate(settings, monkeypatch, "3")
    assert isinstance(skipped, dg.SkipReason) and "2026-03-02" in skipped.skip_message

    request = _evaluate(settings, monkeypatch, "4")  # the alias moved
    assert isinstance(request, dg.RunRequest)
    assert request.partition_key == "2026-03-02" and request.run_key == "2026-03-02:v4"
    # The target: the embeddings and what depends on them.
    from omnisage_pipeline.definitions import defs

    target = sensors.TARGET.resolve(defs.resolve_asset_graph())
    assert {k.to_user_string() for k in target} == {
        "entity_embeddings",
        "recall_report",
        "ann_index",
    }  # the served index follows
    assert defs.resolve_sensor_def(sensors.SENSOR_NAME).default_status == dg.DefaultSensorStatus.STOPPED
