"""``omnisage retention [--apply]``: one retention pass over OMNISAGE_HOME by hand (the pass itself is
``omnisage_pipeline.storage.retention_home.retain_home``, the one ``retention_job`` runs)."""

from __future__ import annotations

import click


@click.command(name="retention")
@click.option("--apply", "apply_", is_flag=True, help="Remove what has expired [default: a dry run, nothing removed].")
@click.option("--json", "as_json", is_flag=True, help="Print the per-dataset reports as JSON.")
def retention(apply_: bool, as_json: bool) -> None:
    """Remove the days of graph/, features/, embeddings/, user_embeddings/ and indexes/ that are
    OMNISAGE_RETENTION_DAYS or more before each folder's newest day (docs/operations.md, "Retention").

    A dry run by default: prints what it would remove and why (dataset, partition, reason, bytes) and what
    it keeps for a live reader lease or a running Dagster run (of DAGSTER_HOME, else
    $OMNISAGE_HOME/dagster). --apply removes it. Only links are removed where a day links outside the
    home; their targets stay. Exits 1 when a day could not be removed.
    """
    import json
    from dataclasses import asdict

    from omnisage_pipeline.settings import Settings, SettingsError
    from omnisage_pipeline.storage import retention_home

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        with retention_home.open_instance(settings) as instance:
            protected = retention_home.protected_days(settings, instance)
    except Exception as exc:  # without the running runs no day is provably unread
        raise click.ClickException(f"could not list the running Dagster runs, nothing removed: {exc}") from exc
    reports = retention_home.retain_home(settings, protected, apply=apply_)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in reports], indent=2))
    else:
        _echo_reports(reports, settings.retention_days, apply_)
    errors = [msg for r in reports for msg in r.errors]
    if errors:
        raise click.ClickException("could not remove: " + "; ".join(errors))


def _echo_reports(reports, retention_days: int, applied: bool) -> None:
    from omnisage_pipeline.settings import RETENTION_ENV
    from omnisage_pipeline.storage.retention_home import removal_rows

    click.echo(f"{RETENTION_ENV}={retention_days}: each folder keeps the days after (its newest - {retention_days})")
    for report in reports:
        if report.newest is None:
            click.echo(f"{report.dataset}/: nothing published")
            continue
        click.echo(f"{report.dataset}/: newest dt={report.newest}, cutoff {report.cutoff}")
        for row in removal_rows([report]):
            if row["action"] == "remove":
                verb, size = ("removed" if applied else "would remove"), f" [{row['bytes']:,d} bytes]"
            else:
                verb, size = "kept", ""
            click.echo(f"  {verb} dt={row['partition']}: {row['reason']}{size}")
        if report.stale_leases_removed:
            stale = "removed" if applied else "found"
            click.echo(f"  {stale} {report.stale_leases_removed} stale lease(s) of ended readers")
    removed = sum(len(r.removed) + len(r.orphans_removed) for r in reports)
    freed = sum(r.bytes_freed for r in reports)
    kept = sum(len(r.kept) for r in reports)
    if applied:
        click.echo(f"removed {removed} partition(s), {freed:,d} bytes; kept {kept} expired partition(s)")
    else:
        click.echo(
            f"dry run: would remove {removed} partition(s), {freed:,d} bytes; would keep {kept} expired "
            "partition(s). Nothing was removed: `omnisage retention --apply` removes them."
        )
