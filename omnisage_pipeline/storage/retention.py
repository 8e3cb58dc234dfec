"""Retention of the heavy per-day outputs (``OMNISAGE_RETENTION_DAYS``).

What is removed: the partitions of ``graph/`` (snapshots + neighbourhood caches), ``features/`` (RocksDB
stores), ``embeddings/``, ``user_embeddings/`` and ``indexes/`` (ann_index) whose day is ``retention_days``
or more before the newest published partition of the same dataset, i.e. a dataset keeps the days
``(newest - retention, newest]``.
``warehouse/`` (validated logs, edges, pruned edges, training examples: small, and what a snapshot is
re-built from) and ``reports/`` are never touched. The default retention is ``OMNISAGE_WINDOW_DAYS``; a
smaller value is an error naming the variable (nothing that is still read may expire: the graph, features
and embeddings of day D are read only for day D, by runs of day D and by a model trained on D).

Never removed, even when expired (reported in the metadata as ``kept``):

- a partition with a live **reader lease** ``<dataset>/.leases/dt=D.<pid>.<token>``
  (``omnisage_pipeline.storage.leases``: ``read_lease()`` makes one for the duration of a read; re-exported
  here). Retention honours it by day, whichever version it names. A lease whose process is gone (or whose
  pid was reused: the start time differs) is stale and removed, so a killed reader never blocks retention; a
  lease from another host cannot be checked and is honoured until it is deleted.
- a partition of a **running Dagster run**: the days of every run of the instance that has not finished
  (tags ``dagster/partition`` and ``dagster/asset_partition_range_start/end``; for an unpartitioned
  ``omnisage_model`` run, its ``training_partition`` or, when unset, the newest ``training_examples``), and
  the days of the run doing the retention (a single-run backfill reads its whole range in later steps).

How (readers never see half a partition): under the protocol "reader: lease, then resolve ``dt=D``;
retention: check leases, unlink ``dt=D``, check leases again, then delete", the ``dt=D`` symlink goes first
(one atomic unlink: from then on the partition is simply not published), and the version directory is
claimed by one ``rename`` into ``.staging/retired.<pid>.*`` before it is deleted (two concurrent passes
never both count it; a pass killed mid-delete leaves a ``retired.*`` entry that the next pass removes).
A lease that appears between the two checks keeps the version directory; the next pass removes it.
Orphans of an expired day (``.versions`` entries without a ``dt=D`` link, a dead writer's ``.staging``)
go too. A version that several days share (``omnisage_pipeline.storage.shared_versions``: ``entity_metadata``)
is deleted only with the last ``dt=`` link (or ``.previous`` record) pointing to it, whichever day's
name it carries. The embeddings' in-flight shard area (``embeddings/.shards``) is left to the inference asset.

Only what publishing made is ever deleted: entries of the dataset's own ``.versions`` and ``.staging``.
A ``dt=D`` link (or ``.previous/dt=D`` record) that leads anywhere else -- a day restored from a backup,
``graph/dt=D -> /backup/...`` -- is unlinked when the day expires and its target is left where it is: a
link is never followed out of the home (``RetentionReport.targets_kept_outside`` lists them).

Where it runs: at the end of the assets that publish these datasets (graph_snapshot, feature_store,
entity_embeddings, ann_index; ``assets.daily.materialize_days(..., retain=...)``), after every day of the
run was published; in ``retention_job`` (daily schedule, ``omnisage_pipeline.retention_job``); and by hand:
``omnisage retention [--apply]`` (a dry run by default). The pass over the whole home, the days running
runs read and what a run records about it: ``omnisage_pipeline.storage.retention_home``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from omnisage_pipeline.settings import RETENTION_ENV, Settings, SettingsError

# The reader leases live in their own module (one implementation for retention and publishing); the names
# stay importable from here for the readers that take them from retention.
from omnisage_pipeline.storage.leases import (  # noqa: F401
    LEASES_DIR,
    Lease,
    acquire_lease,
    live_leases,
    read_lease,
    release_lease,
)
from omnisage_pipeline.storage.publish import (
    PREVIOUS_DIR,
    partition_link,
    pid_alive,
    referenced_versions,
)

#: Dataset folders under OMNISAGE_HOME that retention manages (Settings: graph_dir, features_dir, ...).
HEAVY_DATASETS = ("graph", "features", "embeddings", "user_embeddings", "indexes")
VERSIONS_DIR = ".versions"  # omnisage_pipeline.storage.publish layout
STAGING_DIR = ".staging"
RETIRED_PREFIX = "retired."


def heavy_dataset_dirs(settings: Settings) -> list[Path]:
    return [
        settings.graph_dir,
        settings.features_dir,
        settings.embeddings_dir,
        settings.user_embeddings_dir,
        settings.indexes_dir,
    ]


# ==========================================================================================================
# Policy (pure)
# ==========================================================================================================
def check_retention(retention_days: int, window_days: int) -> int:
    """``retention_days`` if usable, else a SettingsError naming OMNISAGE_RETENTION_DAYS."""
    if isinstance(retention_days, bool) or not isinstance(retention_days, int):
        raise SettingsError(f"{RETENTION_ENV}={retention_days!r} is not an integer number of days")
    if retention_days < window_days:
        raise SettingsError(
            f"{RETENTION_ENV}={retention_days} is less than OMNISAGE_WINDOW_DAYS={window_days}: retention must "
            f"keep at least the graph window (set {RETENTION_ENV} >= {window_days})"
        )
    if retention_days < 1:
        raise SettingsError(f"{RETENTION_ENV}={retention_days} must be >= 1")
    return retention_days


def _as_day(key: str) -> date | None:
    try:
        return date.fromisoformat(key)
    except (TypeError, ValueError):
        return None


def expiry_cutoff(newest: str, retention_days: int) -> str:
    """Partitions on or before this day are expired: a dataset keeps ``(newest - retention, newest]``."""
    return (date.fromisoformat(newest) - timedelta(days=retention_days)).isoformat()


def expired_partitions(
    keys: Iterable[str],
    retention_days: int,
    window_days: int,
    newest: str | None = None,
    protected: Iterable[str] = (),
) -> list[str]:
    """The keys (YYYY-MM-DD) of one dataset that retention removes, oldest first.

    ``newest``: the newest published partition (default: the newest of ``keys``). Keys that are not dates
    are never expired; ``protected`` keys (leased, read by a running run) are left out.
    """
    check_retention(retention_days, window_days)
    days = {k: _as_day(k) for k in keys}
    dated = [k for k, d in days.items() if d is not None]
    if newest is None:
        newest = max(dated, key=lambda k: days[k], default=None)
    if newest is None or _as_day(newest) is None:
        return []
    cutoff = date.fromisoformat(expiry_cutoff(newest, retention_days))
    keep = set(protected)
    return sorted((k for k in dated if days[k] <= cutoff and k not in keep), key=lambda k: days[k])


def plan_retention(
    published: Mapping[str, Iterable[str]],
    retention_days: int,
    window_days: int,
    protected: Mapping[str, Iterable[str]] | Iterable[str] = (),
) -> dict[str, list[str]]:
    """Per dataset: its expired partitions. ``protected`` is one set for every dataset or one per dataset."""
    out = {}
    for dataset, keys in published.items():
        prot = protected.get(dataset, ()) if isinstance(protected, Mapping) else protected
        out[dataset] = expired_partitions(keys, retention_days, window_days, protected=prot)
    return out


# ==========================================================================================================
# Applying the policy to one dataset directory
# ==========================================================================================================
@dataclass
class RetentionReport:
    """What one pass did (or, ``dry_run``, would do) to one dataset directory."""

    dataset: str
    retention_days: int
    newest: str | None = None
    cutoff: str | None = None
    removed: list[str] = field(default_factory=list)  # published partitions unpublished and deleted
    orphans_removed: list[str] = field(default_factory=list)  # expired days with leftovers only (no dt= link)
    bytes_freed: int = 0
    partition_bytes: dict[str, int] = field(default_factory=dict)  # removed or orphan key -> bytes freed
    kept: dict[str, str] = field(default_factory=dict)  # expired but kept: key -> reason
    # Removed days whose dt= link (or .previous record) pointed outside the dataset's .versions: key -> the
    # target, left where it is (only the link went).
    targets_kept_outside: dict[str, str] = field(default_factory=dict)
    stale_leases_removed: int = 0
    errors: list[str] = field(default_factory=list)
    dry_run: bool = False


@dataclass
class _Scan:
    """One dataset directory as retention finds it, by partition key."""

    links: dict[str, Path]  # dt=KEY entries (symlinks, dangling ones included, or real directories)
    versions: dict[str, list[Path]]  # .versions/dt=KEY.*
    staging: dict[str, list[Path]]  # .staging/dt=KEY.* of dead writers

    def published(self) -> list[str]:
        return [k for k, p in self.links.items() if p.exists() and _as_day(k) is not None]

    def keys(self) -> set[str]:
        return set(self.links) | set(self.versions) | set(self.staging)


def _scan(dataset_dir: Path) -> _Scan:
    links = {p.name[3:]: p for p in dataset_dir.glob("dt=*") if p.is_symlink() or p.is_dir()}
    versions: dict[str, list[Path]] = {}
    if (dataset_dir / VERSIONS_DIR).is_dir():
        for v in (dataset_dir / VERSIONS_DIR).iterdir():
            key = _entry_key(v.name)
            if key is not None:
                versions.setdefault(key, []).append(v)
    staging: dict[str, list[Path]] = {}
    if (dataset_dir / STAGING_DIR).is_dir():
        for s in (dataset_dir / STAGING_DIR).iterdir():
            key, pid = _entry_key(s.name), _entry_pid(s.name)
            if key is not None and pid is not None and pid != os.getpid() and not pid_alive(pid):
                staging.setdefault(key, []).append(s)  # a dead writer's leftovers (a live one's: untouched)
    return _Scan(links, versions, staging)


def _tree_bytes(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _owned(dataset_dir: Path, path: Path) -> bool:
    """Whether retention may delete ``path``: a link itself (never its target), or a directory that resolves
    to an entry of this dataset's own ``.versions`` or ``.staging`` (what ``publish`` made), never a folder
    elsewhere that a link leads to (a day restored from a backup, another disk)."""
    own = {(dataset_dir / VERSIONS_DIR).resolve(), (dataset_dir / STAGING_DIR).resolve()}
    if path.is_symlink():
        return path.parent.resolve() in own
    return path.resolve().parent in own


def _delete_claimed(dataset_dir: Path, entry: Path) -> int:
    """Claim ``entry`` with one rename into .staging/retired.* (atomic: only one pass gets it), then delete
    it. Returns the bytes freed (0 when another pass claimed it first). A link is unlinked, never followed."""
    if not _owned(dataset_dir, entry):
        raise PermissionError(f"{entry} is outside {dataset_dir}/{VERSIONS_DIR}: retention never deletes it")
    retired = dataset_dir / STAGING_DIR / f"{RETIRED_PREFIX}{os.getpid()}.{uuid.uuid4().hex[:8]}.{entry.name}"
    retired.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(entry, retired)
    except FileNotFoundError:
        return 0
    size = _tree_bytes(retired)
    if retired.is_dir() and not retired.is_symlink():
        shutil.rmtree(retired)
    else:
        retired.unlink()
    return size


def _entry_key(name: str) -> str | None:
    """``dt=KEY.<pid>.<token>`` (a version or a staging entry) -> KEY."""
    if not name.startswith("dt="):
        return None
    return name[3:].split(".", 1)[0]


def _entry_pid(name: str) -> int | None:
    try:
        return int(name.split(".")[1])
    except (IndexError, ValueError):
        return None


def _live_other(name: str) -> bool:
    """``dt=D.<pid>.<token>`` was written by another process that is still running."""
    pid = _entry_pid(name)
    return pid is not None and pid != os.getpid() and pid_alive(pid)


def _link_targets(dataset_dir: Path, key: str) -> tuple[list[Path], list[Path]]:
    """The versions ``dt=key`` links to and keeps as previous (in a dataset whose days share versions,
    ``omnisage_pipeline.storage.shared_versions``, they may be named after another day), split into those
    of this dataset's ``.versions`` and those elsewhere, which are never deleted."""
    links = [partition_link(dataset_dir, key), dataset_dir / PREVIOUS_DIR / f"dt={key}"]
    targets = [link.resolve() for link in links if link.is_symlink() and link.exists()]
    own = [t for t in targets if _owned(dataset_dir, t)]
    return own, [t for t in targets if t not in own]


def _not_linked_elsewhere(dataset_dir: Path, key: str, candidates: Iterable[Path]) -> list[Path]:
    """The candidates (once each) that no other day links to or keeps as previous: a version shared by
    several days is deleted only with the last link to it."""
    elsewhere = referenced_versions(dataset_dir, exclude=[key])
    out: dict[Path, Path] = {}
    for version in candidates:
        resolved = version.resolve()
        if resolved not in elsewhere and resolved not in out:
            out[resolved] = version
    return list(out.values())


def _shared_versions_lock(dataset_dir: Path):
    """The lock that orders deletions against a writer linking a day to an existing shared version."""
    from omnisage_pipeline.storage.shared_versions import references_lock

    return references_lock(dataset_dir) if (dataset_dir / PREVIOUS_DIR).is_dir() else nullcontext()


def apply_retention(
    dataset_dir: Path,
    retention_days: int,
    window_days: int,
    protected: Mapping[str, str] | Iterable[str] = (),
    dry_run: bool = False,
    log: Callable[[str], None] | None = None,
) -> RetentionReport:
    """Remove the expired partitions of one dataset directory (module docstring).

    ``protected``: keys that must stay (e.g. read by a running run), optionally key -> reason."""
    check_retention(retention_days, window_days)
    dataset_dir = Path(dataset_dir)
    log = log or (lambda msg: None)
    report = RetentionReport(dataset=dataset_dir.name, retention_days=retention_days, dry_run=dry_run)
    if not dataset_dir.is_dir():
        return report
    protected = dict(protected) if isinstance(protected, Mapping) else {k: "running job" for k in protected}
    scan = _scan(dataset_dir)
    report.newest = max(scan.published(), default=None)
    if report.newest is None:
        return report
    report.cutoff = expiry_cutoff(report.newest, retention_days)
    expired = expired_partitions(scan.keys(), retention_days, window_days, newest=report.newest)
    leases, report.stale_leases_removed = live_leases(dataset_dir, remove_stale=not dry_run)
    for key in expired:
        if key in protected:
            report.kept[key] = protected[key]
        elif key in leases:
            report.kept[key] = f"leased by pid {', '.join(str(lease.pid) for lease in leases[key])}"
        else:
            _remove_day(dataset_dir, key, scan, report, log)

    # Deletions claimed by a pass that was killed before it finished.
    if not dry_run and (dataset_dir / STAGING_DIR).is_dir():
        for entry in (dataset_dir / STAGING_DIR).glob(f"{RETIRED_PREFIX}*"):
            pid = _entry_pid(entry.name)
            if pid is not None and pid != os.getpid() and not pid_alive(pid):
                report.bytes_freed += _delete_claimed(dataset_dir, entry)
    return report


def _remove_day(dataset_dir: Path, key: str, scan: _Scan, report: RetentionReport, log: Callable[[str], None]) -> None:
    """Unpublish and delete one expired, unprotected day (or, ``report.dry_run``, only count it)."""
    link = partition_link(dataset_dir, key)
    if link.exists() and not link.is_symlink():
        report.errors.append(f"{link} is a real directory, not a published symlink: left alone")
        return
    had_link = link.is_symlink()
    target = link.resolve() if had_link else None
    # A version that another live process renamed into .versions and has not swapped in yet is an
    # in-flight publish (e.g. a backfill of this old day): left to that writer, removed by a later pass.
    in_flight = [v for v in scan.versions.get(key, []) if v.resolve() != target and _live_other(v.name)]
    own_targets, outside = _link_targets(dataset_dir, key)
    candidates = [v for v in scan.versions.get(key, []) if v not in in_flight] + own_targets
    if report.dry_run:
        doomed = _not_linked_elsewhere(dataset_dir, key, candidates) + scan.staging.get(key, [])
        if had_link or doomed:
            _record(report, key, had_link, sum(_tree_bytes(v) for v in doomed), outside)
        return  # else: its only leftover is a version a later day still links to
    try:
        with _shared_versions_lock(dataset_dir):
            if had_link:
                link.unlink(missing_ok=True)  # unpublished in one atomic step: readers now see no dt=key
            # A reader that took its lease before resolving the link may hold the version: keep it then.
            again, _ = live_leases(dataset_dir, remove_stale=False)
            if key in again:
                report.kept[key] = "unpublished; version kept for a reader that leased it during removal"
                return
            (dataset_dir / PREVIOUS_DIR / f"dt={key}").unlink(missing_ok=True)
            doomed = _not_linked_elsewhere(dataset_dir, key, candidates) + scan.staging.get(key, [])
            if not had_link and not doomed:
                return  # its only leftover is a version a later day still links to
            freed = sum(_delete_claimed(dataset_dir, entry) for entry in doomed)
    except OSError as exc:
        report.errors.append(f"{dataset_dir.name}/dt={key}: {exc}")
        return
    _record(report, key, had_link, freed, outside)
    log(f"retention: removed {dataset_dir.name}/dt={key} ({freed} bytes)")
    for path in outside:
        log(f"retention: unlinked {dataset_dir.name}/dt={key}; kept its target outside the home: {path}")
    for v in in_flight:
        log(f"retention: left {dataset_dir.name}/{VERSIONS_DIR}/{v.name}: a live writer is publishing it")


def _record(report: RetentionReport, key: str, had_link: bool, freed: int, outside: list[Path]) -> None:
    (report.removed if had_link else report.orphans_removed).append(key)
    report.bytes_freed += freed
    report.partition_bytes[key] = freed
    if outside:
        report.targets_kept_outside[key] = ", ".join(str(p) for p in outside)


# ==========================================================================================================
# Backfills the policy would undo, and the assets' hook
# ==========================================================================================================
def dataset_dir(settings: Settings, name: str) -> Path:
    """The folder of a heavy dataset by name (one of HEAVY_DATASETS)."""
    dirs = dict(zip(HEAVY_DATASETS, heavy_dataset_dirs(settings)))
    if name not in dirs:
        raise ValueError(f"retention manages {', '.join(HEAVY_DATASETS)}, not {name!r}")
    return dirs[name]


class ExpiredBackfillError(ValueError):
    """A run asked for days that retention would remove at its next pass."""


def refuse_expired_days(settings: Settings, datasets: Iterable[str], days: Iterable[str], log=None) -> None:
    """Refuse, before any work, days already outside the retention horizon of a heavy dataset: a dataset
    keeps ``(newest - retention, newest]`` of its published days, so a backfill of an older day would be
    published and then deleted by the next pass, silently. Days that only fall out of the horizon because
    this run's own range is longer than the retention are allowed (they are what the range asked for, and
    the next pass reports them under ``retention_removed``); ``log`` warns about them."""
    from omnisage_pipeline.storage.publish import list_published

    days = sorted(days)
    for name in datasets:
        published = list_published(dataset_dir(settings, name))
        newest = max(published, default=None)
        if newest is not None:
            cutoff = expiry_cutoff(newest, settings.retention_days)
            expired = [d for d in days if d <= cutoff]
            if expired:
                raise ExpiredBackfillError(
                    f"{name}/: dt={', dt='.join(expired)} is at or before the retention cutoff {cutoff} (newest "
                    f"published day {newest}, {RETENTION_ENV}={settings.retention_days}): the next retention pass "
                    f"would delete it. Backfill only days after {cutoff}, or raise {RETENTION_ENV} to keep older "
                    "days (docs/operations.md, Retention)"
                )
        own_cutoff = expiry_cutoff(days[-1], settings.retention_days)
        if log is not None and days[0] <= own_cutoff:
            log(
                f"{name}/: this range is longer than {RETENTION_ENV}={settings.retention_days}: days up to "
                f"{own_cutoff} are removed by the next retention pass"
            )
