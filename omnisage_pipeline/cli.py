"""The ``omnisage`` console script (pyproject: ``omnisage = "omnisage_pipeline.cli:main"``).

A click group: add a command with ``@main.command()``. Commands import their heavy modules lazily so that
``omnisage --help`` stays fast.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import click

from omnisage_pipeline.settings import DEMO_START_DATE


def _iso_date(ctx, param, value):
    if value is None:
        return value
    try:
        date.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not YYYY-MM-DD") from exc
    return value


@click.group()
def main() -> None:
    """OmniSage pipeline: synthetic data and pipeline utilities."""


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output data root [default: OMNISAGE_DATA_ROOT, else $OMNISAGE_HOME/synthetic].",
)
@click.option("--start-date", default=DEMO_START_DATE, show_default=True, callback=_iso_date,
              help="First UTC day (YYYY-MM-DD).")
@click.option("--days", type=click.IntRange(min=1), default=3, show_default=True, help="Number of days.")
@click.option("--scale", type=click.Choice(["tiny", "small", "medium", "large"]), default="small",
              show_default=True, help="tiny ~2K, small ~20K, medium ~200K, large ~1M events/day.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--no-images", is_flag=True, help="A data set without image vectors (image_embedding all null).")
@click.option("--force", is_flag=True, help="Replace a different synthetic data set already in --out.")
def generate(out: Path | None, start_date: str, days: int, scale: str, seed: int, no_images: bool,
             force: bool) -> None:
    """Write synthetic input in the data contract's format, with the planted truth under OUT/_truth/."""
    from omnisage_pipeline import synthetic
    from omnisage_pipeline.settings import Settings

    if out is None:
        out = Settings.from_env().data_root
    try:
        summary = synthetic.generate(out, start_date=start_date, days=days, scale=scale, seed=seed,
                                     images=not no_images, force=force)
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
@click.option("--days", type=click.IntRange(min=1), default=3, show_default=True,
              help="Daily partitions to materialize, from OMNISAGE_START_DATE.")
@click.option("--scale", type=click.Choice(["tiny", "small", "medium", "large"]), default="small",
              show_default=True, help="Scale of the synthetic data generated when the default data root is empty.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--train-steps", type=click.IntRange(min=0), default=100, show_default=True,
              help="Optimizer steps of the demo's omnisage_model.")
def demo(days: int, scale: str, seed: int, train_steps: int) -> None:
    """Run the whole pipeline on the embedded defaults and print where to look."""
    from omnisage_pipeline.demo import recall_table, run_demo, where_to_look
    from omnisage_pipeline.settings import Settings

    outcome = run_demo(days=days, scale=scale, seed=seed, train_steps=train_steps, echo=click.echo)
    click.echo("wall time per stage:")
    for stage, seconds in outcome["timings"].items():
        click.echo(f"  {stage:<50} {seconds:8.1f}s")
    click.echo("held-out recall@10 of the trained model:")
    click.echo(recall_table(outcome["model"]))
    click.echo(where_to_look(Settings.from_env()))


if __name__ == "__main__":  # pragma: no cover
    main()
