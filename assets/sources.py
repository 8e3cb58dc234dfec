"""Source assets: what the pipeline reads but never writes, observed so that Dagster sees it change.

raw_engagement_logs (daily partitions):
    the contract's day folders ``$OMNISAGE_DATA_ROOT/engagement_logs/dt=D``, upstream of ``engagement_logs``
    (same day). An observation of day D reports ``present``, ``files``, ``bytes`` and ``path``; its data
    version is the folder's fingerprint (names, sizes and modification times: no file is read,
    ``omnisage_pipeline.contract.arrival``). A day never delivered has no observation: it shows as missing,
    and ``engagement_logs`` of that day fails naming the folder.
raw_entity_metadata (daily partitions):
    the metadata snapshot ``pins/`` and ``boards/`` as it stood for day D, upstream of ``entity_metadata``
    (same day): the folders hold one snapshot at a time, and day D's ingest reads the one there when D's
    chain runs, so day D's observation is taken then (one fingerprint over both folders is its data
    version). Per day, not one unpartitioned asset: a new snapshot concerns the days still to come and must
    not mark every day ingested before it stale.
champion_model:
    the MLflow registered model version that holds the alias ``champion``; its data version is that version
    number (``none`` before the first promotion). ``entity_embeddings`` and ``recall_report`` load the
    champion, so they depend on this asset, not on ``omnisage_model``. ``omnisage_model`` is drawn upstream
    of it for lineage only (its gate moves the alias): a source asset is never stale itself, so a challenger
    (a new ``omnisage_model`` materialization that leaves the alias where it was) stales nothing, and a
    promotion (a new data version) marks every day embedded with the previous champion stale.

Who observes: the sensors (``omnisage_pipeline.sensors``) report these observations as runless events right
before they request the runs that read them, so those runs record the versions they read; the UI's
"Observe" button (or a job selecting these keys) runs the observe functions below.
"""

from collections.abc import Iterable

import dagster as dg

from omnisage_pipeline.contract.arrival import (
    FolderState,
    delivered_days,
    engagement_day_folder,
    folder_state,
    snapshot_fingerprint,
    snapshot_states,
)
from omnisage_pipeline.partitions import daily_partitions
from omnisage_pipeline.resources import MlflowResource, StorageResource

RAW_ENGAGEMENT_LOGS = dg.AssetKey("raw_engagement_logs")
RAW_ENTITY_METADATA = dg.AssetKey("raw_entity_metadata")
CHAMPION_MODEL = dg.AssetKey("champion_model")
#: Dagster's tag for an event's data version (what the staleness machinery compares).
DATA_VERSION_TAG = "dagster/data_version"
NO_CHAMPION = "none"
OWNERS = ["team:omnisage-data"]


def engagement_day_observation(state: FolderState, day: str) -> dg.AssetObservation:
    """raw_engagement_logs of day D as the file system shows it."""
    return dg.AssetObservation(
        asset_key=RAW_ENGAGEMENT_LOGS,
        partition=day,
        tags={DATA_VERSION_TAG: state.fingerprint or "missing"},
        metadata={
            "present": state.present,
            "files": state.files,
            "bytes": state.bytes,
            "path": dg.MetadataValue.path(str(state.path)),
        },
    )


def snapshot_observation(states: dict[str, FolderState], day: str) -> dg.AssetObservation:
    """raw_entity_metadata of day D: each folder's presence, files and bytes, one data version over both."""
    metadata: dict = {}
    for name, state in sorted(states.items()):
        metadata[f"{name}.present"] = state.present
        metadata[f"{name}.files"] = state.files
        metadata[f"{name}.bytes"] = state.bytes
        metadata[f"{name}.path"] = dg.MetadataValue.path(str(state.path))
    return dg.AssetObservation(
        asset_key=RAW_ENTITY_METADATA,
        partition=day,
        tags={DATA_VERSION_TAG: snapshot_fingerprint(states)},
        metadata=metadata,
    )


def champion_version(mlflow: MlflowResource) -> str | None:
    """The registered version that holds the alias ``champion`` (None before the first promotion)."""
    from ml.registry import CHAMPION, ModelRegistry

    return ModelRegistry(mlflow.tracking_uri, mlflow.registered_model_name).version_for_alias(CHAMPION)


def champion_observation(version: str | None, model_name: str) -> dg.AssetObservation:
    return dg.AssetObservation(
        asset_key=CHAMPION_MODEL,
        tags={DATA_VERSION_TAG: str(version) if version is not None else NO_CHAMPION},
        metadata={"model_version": str(version or ""), "registered_model": model_name, "alias": "champion"},
    )


def latest_data_version(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None):
    """The data version of the newest observation of a source asset (partition), None when never observed."""
    record = instance.get_latest_data_version_record(key, is_source=True, partition_key=partition)
    return None if record is None else (record.event_log_entry.tags or {}).get(DATA_VERSION_TAG)


def changed(instance: dg.DagsterInstance, events: Iterable[dg.AssetObservation]) -> list[dg.AssetObservation]:
    """The observations whose data version differs from the newest recorded one (the others would only
    repeat what the instance already knows)."""
    return [
        e for e in events if latest_data_version(instance, e.asset_key, e.partition) != e.tags.get(DATA_VERSION_TAG)
    ]


@dg.observable_source_asset(
    name="raw_engagement_logs",
    partitions_def=daily_partitions,
    group_name="ingest",
    tags={"layer": "input"},
    description="The contract's day folders $OMNISAGE_DATA_ROOT/engagement_logs/dt=D (not written by the "
    "pipeline): observed per day (present, files, bytes; data version = fingerprint of names, sizes, mtimes).",
)
def raw_engagement_logs(context, storage: StorageResource) -> dg.DataVersionsByPartition:
    root = storage.settings.require_data_root()
    days, unexpected = delivered_days(root)
    for entry in unexpected:
        context.log.warning(f"{entry}: not a day folder dt=YYYY-MM-DD of the contract; not read")
    for day in days:
        if daily_partitions.has_partition_key(day):
            context.log_event(engagement_day_observation(folder_state(engagement_day_folder(root, day)), day))
    # The events above carry each day's metadata; a returned DataVersionsByPartition could carry versions only.
    return dg.DataVersionsByPartition({})


@dg.observable_source_asset(
    name="raw_entity_metadata",
    partitions_def=daily_partitions,
    group_name="ingest",
    tags={"layer": "input"},
    description="The contract's metadata snapshot $OMNISAGE_DATA_ROOT/pins/ and boards/ as it stood for day D "
    "(not written by the pipeline): presence, files and bytes per folder; data version = fingerprint of names, "
    "sizes, mtimes. Only the current snapshot can be seen: an observation is of the newest day.",
)
def raw_entity_metadata(context, storage: StorageResource) -> dg.DataVersionsByPartition:
    day = daily_partitions.get_last_partition_key()
    if day is not None:
        context.log_event(snapshot_observation(snapshot_states(storage.settings.require_data_root()), day))
    return dg.DataVersionsByPartition({})  # the event above carries the metadata


@dg.multi_observable_source_asset(
    specs=[
        dg.AssetSpec(
            CHAMPION_MODEL,
            # Lineage only: the gate of omnisage_model moves the alias; nothing downstream reads omnisage_model.
            deps=["omnisage_model"],
            group_name="training",
            owners=["team:omnisage-ml"],
            kinds={"mlflow"},
            tags={"layer": "training"},
            description="The MLflow registered model version holding the alias 'champion' (what the embeddings "
            "and the recall report load); data version = that version number, 'none' before any promotion.",
        )
    ]
)
def champion_model(mlflow: MlflowResource) -> dg.ObserveResult:
    event = champion_observation(champion_version(mlflow), mlflow.registered_model_name)
    return dg.ObserveResult(
        asset_key=CHAMPION_MODEL,
        data_version=dg.DataVersion(event.tags[DATA_VERSION_TAG]),
        metadata=event.metadata,
    )
