"""``champion_embeddings_sensor``: served embeddings follow the registry's ``champion`` alias.

Every ``minimum_interval_seconds`` the sensor reads which model version holds ``champion`` and which version
embedded the newest day whose embedding inputs are published (``entity_metadata``, ``graph``, ``features``,
``training_examples``: the day being served). When they differ - the alias moved after the day was
embedded, or the day was never embedded - it requests one run of ``entity_embeddings`` and what depends on
it (``recall_report``) for that day. The run key is (day, champion version), so each change re-embeds a
day once. Stateless apart from that key: the published manifest says which version is served.

It starts stopped (like the schedules): turn it on in the UI or with
``dagster sensor start champion_embeddings_sensor``.
"""

from __future__ import annotations

import json

import dagster as dg

from omnisage_pipeline.resources import MlflowResource, StorageResource
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import list_published, published_path

SENSOR_NAME = "champion_embeddings_sensor"
#: What a champion change re-materializes: the day's embeddings and everything downstream of them.
TARGET = dg.AssetSelection.assets("entity_embeddings").downstream()


def champion_version(mlflow: MlflowResource) -> str | None:
    from ml.registry import CHAMPION, ModelRegistry

    return ModelRegistry(mlflow.tracking_uri, mlflow.registered_model_name).version_for_alias(CHAMPION)


def served_day(settings: Settings) -> str | None:
    """The newest day whose embedding inputs are all published (the day whose embeddings are served)."""
    inputs = [
        settings.warehouse_dataset("entity_metadata"),
        settings.graph_dir,
        settings.features_dir,
        settings.warehouse_dataset("training_examples"),
    ]
    days = set(list_published(inputs[0]))
    for folder in inputs[1:]:
        days &= set(list_published(folder))
    return max(days, default=None)


def embedded_version(settings: Settings, day: str) -> str | None:
    """The model version recorded in the day's published embeddings (``_manifest.json``), None if none."""
    folder = published_path(settings.embeddings_dir, day)
    manifest = folder / "_manifest.json" if folder is not None else None
    if manifest is None or not manifest.is_file():
        return None
    return str(json.loads(manifest.read_text()).get("model_version"))


def embeddings_request(settings: Settings, champion: str | None) -> dg.RunRequest | dg.SkipReason:
    if champion is None:
        return dg.SkipReason("no model version holds the champion alias yet")
    day = served_day(settings)
    if day is None:
        return dg.SkipReason("no day has its embedding inputs published yet")
    served = embedded_version(settings, day)
    if served == str(champion):
        return dg.SkipReason(f"dt={day} is embedded with the champion, version {champion}")
    return dg.RunRequest(
        run_key=f"{day}:v{champion}",
        partition_key=day,
        tags={"omnisage/champion_version": str(champion)},
    )


@dg.sensor(
    name=SENSOR_NAME,
    target=TARGET,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Re-materializes the served day's entity_embeddings (and recall_report) when the MLflow "
    "'champion' alias points to a version other than the one that embedded it.",
)
def champion_embeddings_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource, mlflow: MlflowResource
):
    request = embeddings_request(storage.settings, champion_version(mlflow))
    if isinstance(request, dg.RunRequest):
        context.log.info(f"champion changed: requesting {request.run_key}")
    return request
