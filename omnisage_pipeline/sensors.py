"""The code location's sensors.

``champion_embeddings_sensor`` (starts stopped): served embeddings follow the registry's ``champion`` alias.
    Every ``minimum_interval_seconds`` it reads which model version holds ``champion``. When that differs
    from the newest observation of the source asset ``champion_model`` it reports a new observation (data
    version = the version number), so the UI marks every day embedded with the previous champion stale; a
    challenger, which leaves the alias where it is, changes nothing. Then it compares the champion with the
    version that embedded the newest day whose embedding inputs are published (``entity_metadata``,
    ``graph``, ``features``, ``training_examples``: the day being served); when they differ it requests one
    run of ``entity_embeddings`` and what depends on it for that day. The run key is (day, champion
    version), so each change re-embeds a day once; the published manifest says which version is served.
``engagement_logs_arrival_sensor`` (starts stopped): starts a day's chain when its input arrives.
    It lists ``$OMNISAGE_DATA_ROOT/engagement_logs/dt=D`` folders; each day after the cursor (the last day it
    handled; on its first tick only the newest day, older days being a backfill's business) is requested
    once, in date order, as one ``daily_pipeline`` run (run key per day), with the observations of
    ``raw_engagement_logs`` and ``raw_entity_metadata`` of that day (the folders the run will read). A day
    waits while it is not a complete UTC day yet or while its folder changed within the last
    ``QUIET_SECONDS`` (still being written); a day whose run is already queued, running or done (the fallback
    schedule got there first) is passed over. A day that never arrives is never requested: it stays missing.
``omnisage_run_failure_sensor`` (starts running: it only logs): one line per failed run of this code
    location: job, partition, failed step(s) and the first line of the error.

Turn the stopped ones on in the UI or with ``dagster sensor start <name>``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from assets.sources import (
    champion_observation,
    champion_version,
    changed,
    engagement_day_observation,
    snapshot_observation,
)
from omnisage_pipeline.contract.arrival import (
    FolderState,
    delivered_days,
    engagement_day_folder,
    folder_state,
    snapshot_states,
)
from omnisage_pipeline.jobs import DAILY_JOB_NAME, REEMBED_SELECTION, day_started, reembed_job
from omnisage_pipeline.partitions import daily_partitions
from omnisage_pipeline.resources import MlflowResource, StorageResource
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import list_published, published_path

SENSOR_NAME = "champion_embeddings_sensor"
ARRIVAL_SENSOR_NAME = "engagement_logs_arrival_sensor"
FAILURE_SENSOR_NAME = "omnisage_run_failure_sensor"
#: What a champion change re-materializes (``reembed_job``): the day's embeddings and what depends on them.
TARGET = REEMBED_SELECTION
#: A day folder counts as delivered once nothing in it changed for this long (it may still be being written).
QUIET_SECONDS = 120


# ---------------------------------------------------------------------------------------------- champion
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
    job=reembed_job,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Observes champion_model (the MLflow 'champion' alias) and re-materializes the served day's "
    "entity_embeddings (and what depends on them) when the alias points to a version other than the one "
    "that embedded it.",
)
def champion_embeddings_sensor(context: dg.SensorEvaluationContext, storage: StorageResource, mlflow: MlflowResource):
    champion = champion_version(mlflow)
    events = changed(context.instance, [champion_observation(champion, mlflow.registered_model_name)])
    if events:
        context.log.info(f"champion_model: version {champion} (new observation)")
    request = embeddings_request(storage.settings, champion)
    if isinstance(request, dg.SkipReason):
        return dg.SensorResult(skip_reason=request, asset_events=events)
    context.log.info(f"champion changed: requesting {request.run_key}")
    return dg.SensorResult(run_requests=[request], asset_events=events)


# ---------------------------------------------------------------------------------------------- arrival
@dataclass
class ArrivalPlan:
    """What one tick of the arrival sensor does: the days to start (with their folder), the days passed
    over (already started), why it stopped early (``waiting``), the cursor after the tick."""

    cursor: str | None
    start: list[tuple[str, FolderState]] = field(default_factory=list)
    already_started: list[str] = field(default_factory=list)
    waiting: str | None = None
    unexpected: list[Path] = field(default_factory=list)


def plan_arrivals(data_root: Path, cursor: str | None, now: float, started: Callable[[str], bool]) -> ArrivalPlan:
    """The days after ``cursor`` whose folder has arrived (the newest one only when there is no cursor), in
    date order, up to the first that must wait. Days before the first partition are never pipeline days."""
    days, unexpected = delivered_days(data_root)
    first = daily_partitions.start.strftime("%Y-%m-%d")
    days = [d for d in days if d >= first]
    plan = ArrivalPlan(cursor=cursor, unexpected=unexpected)
    for day in [d for d in days if d > cursor] if cursor else days[-1:]:
        if not daily_partitions.has_partition_key(day):
            plan.waiting = f"dt={day} is not a complete UTC day yet"
            break
        state = folder_state(engagement_day_folder(data_root, day))
        if now - state.newest_mtime < QUIET_SECONDS:
            plan.waiting = f"dt={day} changed {now - state.newest_mtime:.0f} s ago (waits for {QUIET_SECONDS} s)"
            break
        if started(day):
            plan.already_started.append(day)
        else:
            plan.start.append((day, state))
        plan.cursor = day
    return plan


def arrival_result(context: dg.SensorEvaluationContext, settings: Settings) -> dg.SensorResult:
    root = settings.data_root
    if not root.is_dir():
        return dg.SensorResult(skip_reason=f"OMNISAGE_DATA_ROOT {root} does not exist: nothing has arrived")
    plan = plan_arrivals(root, context.cursor, time.time(), lambda day: day_started(context.instance, day) is not None)
    for entry in plan.unexpected:
        context.log.warning(f"{entry}: not a day folder dt=YYYY-MM-DD of the contract; not read")
    for day in plan.already_started:
        context.log.info(f"dt={day}: a daily_pipeline run of the day is already queued, running or done")
    if not plan.start:
        reason = plan.waiting or f"no engagement_logs day folder after {plan.cursor or 'none'}"
        return dg.SensorResult(skip_reason=reason, cursor=plan.cursor)
    snapshot = snapshot_states(root)  # what each started day's entity_metadata will read
    events = [engagement_day_observation(state, day) for day, state in plan.start]
    events += changed(context.instance, [snapshot_observation(snapshot, day) for day, _ in plan.start])
    requests = [
        dg.RunRequest(
            run_key=f"engagement_logs/dt={day}",
            partition_key=day,
            tags={"omnisage/trigger": ARRIVAL_SENSOR_NAME},
        )
        for day, _ in plan.start
    ]
    context.log.info(f"input arrived: starting dt={', dt='.join(day for day, _ in plan.start)}")
    return dg.SensorResult(run_requests=requests, cursor=plan.cursor, asset_events=events)


@dg.sensor(
    name=ARRIVAL_SENSOR_NAME,
    job_name=DAILY_JOB_NAME,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Starts daily_pipeline for day D once $OMNISAGE_DATA_ROOT/engagement_logs/dt=D has arrived "
    f"(complete UTC day, unchanged for {QUIET_SECONDS} s); one run per day, in date order.",
)
def engagement_logs_arrival_sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
    return arrival_result(context, storage.settings)


# ---------------------------------------------------------------------------------------------- failures
def _first_line(text: str | None) -> str:
    return next((line.strip() for line in (text or "").splitlines() if line.strip()), "")


def _error_line(error) -> str:
    """The first line of what went wrong: the user's exception, not Dagster's wrapper around it."""
    while error is not None and error.cause is not None and error.cls_name.startswith("Dagster"):
        error = error.cause
    return _first_line(error.message) if error is not None else ""


def failure_summary(run: dg.DagsterRun, failure_event, step_failures) -> str:
    """One line: job, partition (or range), failed step(s), the first line of the first error."""
    tags = run.tags
    partition = tags.get("dagster/partition") or (
        f"{tags['dagster/asset_partition_range_start']}...{tags['dagster/asset_partition_range_end']}"
        if "dagster/asset_partition_range_start" in tags
        else "none"
    )
    steps = [e.step_key for e in step_failures if e.step_key]
    error = ""
    for event in step_failures:
        data = event.step_failure_data
        user = getattr(data, "user_failure_data", None)
        error = _first_line(getattr(user, "description", None)) or _error_line(data.error)
        if error:
            break
    if not error and failure_event is not None:
        data = failure_event.event_specific_data
        error = _error_line(getattr(data, "error", None)) or _first_line(failure_event.message)
    return (
        f"run {run.run_id} of job {run.job_name} failed: partition {partition}; "
        f"failed step(s) {', '.join(steps) or 'none'}; error: {error or 'unknown'}"
    )


@dg.run_failure_sensor(
    name=FAILURE_SENSOR_NAME,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Logs one line per failed run of this code location: job, partition, failed step(s) and "
    "the first line of the error.",
)
def omnisage_run_failure_sensor(context: dg.RunFailureSensorContext):
    context.log.error(failure_summary(context.dagster_run, context.failure_event, context.get_step_failure_events()))
