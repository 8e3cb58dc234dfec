"""The retention job and its daily schedule.

``retention_job`` is one op, ``apply_retention_pass``: the same pass as ``omnisage retention --apply``
(``omnisage_pipeline.storage.retention_home.retain_home``) over graph/, features/, embeddings/,
user_embeddings/ and indexes/, keeping every leased day and every day an unfinished run reads. The op
logs one ``AssetObservation`` per removed (asset, partition) with ``removed_by_retention: True`` (why not a
partition wipe: ``retention_home``'s docstring), and its output metadata is the pass's summary
(``retention_removed``, ``retention_bytes_freed``, ``retention_kept``, ...). It fails when a day could not
be removed (``retention_errors``), after recording what was.

The schedule runs it daily at 05:00 UTC, after the daily pipeline's 01:00 UTC run; like the other schedules
it starts stopped: ``dagster schedule start retention_schedule`` (or the UI). The assets that publish these
folders also run the pass at the end of each step; the job catches what those leave (days kept for a lease
or a run that has ended since, a backfill's range).

(No ``from __future__ import annotations`` here: Dagster reads the op's real annotations, context and
resource.)
"""

import dagster as dg

from omnisage_pipeline.resources import StorageResource
from omnisage_pipeline.storage.retention_home import (
    DATASET_ASSETS,
    protected_days,
    removal_observations,
    retain_home,
    summary_metadata,
)

RETENTION_JOB_NAME = "retention_job"
RETENTION_CRON = "0 5 * * *"  # daily 05:00 UTC, after the daily pipeline (01:00 UTC)


@dg.op(description="Remove the expired days of the heavy datasets (OMNISAGE_RETENTION_DAYS).")
def apply_retention_pass(context: dg.OpExecutionContext, storage: StorageResource):
    settings = storage.settings
    protected = protected_days(settings, context.instance, exclude_run_id=context.run_id)
    reports = retain_home(settings, protected, apply=True, log=context.log.info)
    yield from removal_observations(reports, DATASET_ASSETS)
    metadata = summary_metadata(reports)
    errors = [msg for r in reports for msg in r.errors]
    if errors:
        raise dg.Failure(description="retention: " + "; ".join(errors), metadata=metadata)
    yield dg.Output(None, metadata=metadata)


@dg.job(
    name=RETENTION_JOB_NAME,
    executor_def=dg.in_process_executor,  # one short step: a subprocess would only add its imports
    description="OMNISAGE_RETENTION_DAYS retention of graph/, features/, embeddings/, user_embeddings/ and "
    "indexes/ (the same pass as `omnisage retention --apply`); never a leased day nor one a running run reads.",
)
def retention_job():
    apply_retention_pass()


retention_schedule = dg.ScheduleDefinition(
    name="retention_schedule",
    job=retention_job,
    cron_schedule=RETENTION_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Daily retention pass (05:00 UTC, after the daily pipeline); start it in the UI or with "
    "`dagster schedule start retention_schedule`.",
)
