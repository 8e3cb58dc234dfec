"""One retention pass over the heavy datasets of ``OMNISAGE_HOME`` (``omnisage_pipeline.storage.retention``
holds the policy and ``apply_retention`` on one dataset directory; the reader leases it honours are
``omnisage_pipeline.storage.leases``).

Here: which days the unfinished runs of the Dagster instance read (kept), the pass over every heavy dataset
(``retain_home``: the one library function behind ``omnisage retention [--apply]`` and ``retention_job``),
what it removed and why (``removal_rows``), and how a Dagster run records it:

- the run's metadata (``summary_metadata``: ``retention_removed``, ``retention_bytes_freed``, ...);
- one ``AssetObservation`` per removed (asset, partition), metadata ``{"removed_by_retention": True, ...}``
  (``removal_observations``), so a deleted day does not keep showing as materialized without a note: its
  latest event in the UI says it was removed, when, by which run, and why.

Why observations and not a wipe: Dagster 1.13 has ``DagsterInstance.wipe_asset_partitions``, but the OSS
event log storages (sqlite, postgres) raise ``NotImplementedError: Partitioned asset wipe is not supported
yet for this event log storage``; a wipe would also erase the day's history (its metadata, its checks)
and make it look never built rather than built and then expired. ``report_runless_asset_event`` would
record the same observation outside any run; the observations are logged in the retention run itself
(the job's op, or the asset step that ran the pass) so that the run shows what it removed.

Dagster is imported lazily: the CLI path loads it only to read the instance's runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.retention import (
    HEAVY_DATASETS,
    RetentionReport,
    _as_day,
    apply_retention,
    dataset_dir,
)

#: The asset that publishes each heavy dataset (contract "Asset keys"): where its removals are noted.
DATASET_ASSETS = {
    "graph": "graph_snapshot",
    "features": "feature_store",
    "embeddings": "entity_embeddings",
    "user_embeddings": "entity_embeddings",
    "indexes": "ann_index",
}


# ==========================================================================================================
# Partitions read by unfinished Dagster runs
# ==========================================================================================================
def _day_range(first: str, last: str) -> list[str]:
    a, b = _as_day(first), _as_day(last)
    if a is None or b is None or b < a:
        return [k for k in (first, last) if k]
    return [(a + timedelta(days=i)).isoformat() for i in range((b - a).days + 1)]


def _config_training_partitions(run_config) -> set[str]:
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if k == "training_partition" and isinstance(v, str) and v:
                    found.add(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(run_config or {})
    return found


def run_partitions(tags: Mapping[str, str], run_config=None, newest_training: str | None = None) -> set[str]:
    """The days a run reads, from its tags (or, unpartitioned, its training partition)."""
    if tags.get("dagster/partition"):
        return {tags["dagster/partition"]}
    first, last = (
        tags.get("dagster/asset_partition_range_start"),
        tags.get("dagster/asset_partition_range_end"),
    )
    if first and last:
        return set(_day_range(first, last))
    explicit = _config_training_partitions(run_config)
    if explicit:
        return explicit
    return {newest_training} if newest_training else set()


def running_partitions(
    instance, newest_training: str | None = None, exclude_run_id: str | None = None
) -> dict[str, str]:
    """Days read by every run of ``instance`` that has not finished -> 'read by running job <run id>'.
    ``exclude_run_id``: the run doing the retention (it reads no day)."""
    import dagster as dg

    finished = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
    statuses = [s for s in dg.DagsterRunStatus if s not in finished]
    out: dict[str, str] = {}
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=statuses)):
        if run.run_id == exclude_run_id:
            continue
        for key in run_partitions(run.tags, run.run_config, newest_training):
            out.setdefault(key, f"read by running job {run.run_id[:8]}")
    return out


def newest_training(settings: Settings) -> str | None:
    """The newest published ``training_examples`` day (what an unpartitioned training run reads)."""
    from omnisage_pipeline.storage.publish import list_published

    keys = list_published(settings.warehouse_dataset("training_examples"))
    return keys[-1] if keys else None


def protected_days(settings: Settings, instance, exclude_run_id: str | None = None) -> dict[str, str]:
    """Days no pass may remove because an unfinished run of ``instance`` reads them (none without one)."""
    if instance is None:
        return {}
    return running_partitions(instance, newest_training(settings), exclude_run_id)


@contextmanager
def open_instance(settings: Settings) -> Iterator:
    """The Dagster instance the pipeline's runs are recorded in (DAGSTER_HOME, else OMNISAGE_HOME/dagster),
    or None when that folder does not exist (then no run of a persistent instance can be in progress)."""
    home = Path(os.environ.get("DAGSTER_HOME") or settings.dagster_home)
    if not home.is_dir():
        yield None
        return
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


# ==========================================================================================================
# One pass over the home, and what it did
# ==========================================================================================================
def retain_home(
    settings: Settings,
    protected: Mapping[str, str],
    *,
    apply: bool,
    datasets: Iterable[str] = HEAVY_DATASETS,
    log: Callable[[str], None] | None = None,
) -> list[RetentionReport]:
    """Apply (``apply``; else a dry run) ``OMNISAGE_RETENTION_DAYS`` to the heavy ``datasets`` of the home,
    keeping the ``protected`` days (day -> reason) and every leased one; one report per dataset."""
    days, window = settings.retention_days, settings.window_days
    return [
        apply_retention(dataset_dir(settings, name), days, window, protected, dry_run=not apply, log=log)
        for name in datasets
    ]


def removal_rows(reports: Iterable[RetentionReport]) -> list[dict]:
    """One row per expired day of every report: ``action`` ("remove" or "keep"), ``dataset``, ``partition``,
    ``reason`` and ``bytes`` (freed, or that an apply would free)."""
    rows = []
    for r in reports:
        expired = f"older than retention_days={r.retention_days} (cutoff {r.cutoff}, newest {r.newest})"
        for key in r.removed + r.orphans_removed:
            reason = expired if key in r.removed else f"leftovers of an expired day (no dt= link); {expired}"
            if key in r.targets_kept_outside:
                reason += f"; only its link goes: the target {r.targets_kept_outside[key]} is outside the home, kept"
            rows.append(
                {
                    "action": "remove",
                    "dataset": r.dataset,
                    "partition": key,
                    "reason": reason,
                    "bytes": r.partition_bytes.get(key, 0),
                }
            )
        for key, why in r.kept.items():
            rows.append({"action": "keep", "dataset": r.dataset, "partition": key, "reason": why, "bytes": 0})
    return rows


def summary_metadata(reports: list[RetentionReport]) -> dict:
    """A pass's run metadata: ``retention_days``, ``retention_removed`` ({dataset: [days]}),
    ``retention_bytes_freed``, ``retention_kept`` and, when there are any, ``retention_orphans_removed``,
    ``retention_targets_kept_outside`` and ``retention_errors``."""
    import dagster as dg

    meta = {
        "retention_days": max((r.retention_days for r in reports), default=0),
        "retention_removed": dg.MetadataValue.json({r.dataset: r.removed for r in reports}),
        "retention_bytes_freed": sum(r.bytes_freed for r in reports),
        "retention_kept": dg.MetadataValue.json({r.dataset: r.kept for r in reports if r.kept}),
    }
    optional = {
        "retention_orphans_removed": {r.dataset: r.orphans_removed for r in reports if r.orphans_removed},
        "retention_targets_kept_outside": {
            r.dataset: r.targets_kept_outside for r in reports if r.targets_kept_outside
        },
        "retention_errors": [m for r in reports for m in r.errors],
    }
    meta.update({k: dg.MetadataValue.json(v) for k, v in optional.items() if v})
    return meta


def removal_observations(reports: Iterable[RetentionReport], asset_keys: Mapping[str, object]) -> list:
    """One ``AssetObservation`` per removed (asset, partition): ``asset_keys`` maps a dataset to the asset
    that publishes it (e.g. ``DATASET_ASSETS``). Two datasets of one asset (``entity_embeddings``: embeddings
    and user_embeddings) give one observation listing both."""
    import dagster as dg

    noted: dict[tuple, dict] = {}
    for row in removal_rows(reports):
        if row["action"] != "remove" or row["dataset"] not in asset_keys:
            continue
        key = (dg.AssetKey.from_coercible(asset_keys[row["dataset"]]), row["partition"])
        entry = noted.setdefault(key, {"datasets": [], "bytes": 0, "reasons": []})
        entry["datasets"].append(row["dataset"])
        entry["bytes"] += row["bytes"]
        entry["reasons"].append(f"{row['dataset']}/: {row['reason']}")
    return [
        dg.AssetObservation(
            asset_key=asset_key,
            partition=partition,
            description="removed by retention: its data is gone from OMNISAGE_HOME",
            metadata={
                "removed_by_retention": True,
                "retention_datasets": dg.MetadataValue.json(entry["datasets"]),
                "retention_reason": "\n".join(entry["reasons"]),
                "retention_bytes_freed": entry["bytes"],
            },
        )
        for (asset_key, partition), entry in noted.items()
    ]


def retention_metadata(context, settings: Settings, datasets: Iterable[str], days: Iterable[str]) -> dict:
    """Run retention on the heavy ``datasets`` (names) from an asset step (``days``: the run's own
    partitions, which its later steps may read), note each removed partition of the step's asset, and
    return the materialization metadata (``summary_metadata``)."""
    datasets = list(datasets)
    try:
        protected = protected_days(settings, context.instance)
    except Exception as exc:  # noqa: BLE001 - without the list of running runs nothing is provably unread
        context.log.warning(f"retention skipped: could not list the running runs ({exc})")
        return {"retention_skipped": f"could not list the running runs: {exc}"}
    protected.update({d: "read by this run" for d in days})
    reports = retain_home(settings, protected, apply=True, datasets=datasets, log=context.log.info)
    for r in reports:
        for msg in r.errors:
            context.log.warning(f"retention: {msg}")
    for observation in removal_observations(reports, {name: context.asset_key for name in datasets}):
        context.log_event(observation)
    return summary_metadata(reports)
