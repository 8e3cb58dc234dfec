"""``omnisage ablate``: the paper's ablations re-run in scratch homes (``omnisage_pipeline.tools.ablations``)."""

from __future__ import annotations

from pathlib import Path

import click

#: The studies ``--studies`` accepts, in the order the tables are printed.
ABLATION_STUDIES = (
    "graph_sources",
    "tasks",
    "pruning_alpha",
    "push_budget",
    "halved_kt",
    "aggregator",
    "negatives",
)


def _study_list(ctx, param, value):
    if not value or value == "all":
        return None
    chosen = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in ABLATION_STUDIES]
    if unknown:
        raise click.BadParameter(
            f"unknown stud{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
            f"choose from {', '.join(ABLATION_STUDIES)} or 'all'"
        )
    return chosen


@click.command()
@click.option(
    "--studies",
    default="all",
    show_default=True,
    callback=_study_list,
    help=f"Comma-separated studies: {', '.join(ABLATION_STUDIES)}.",
)
@click.option(
    "--variant",
    "variants",
    multiple=True,
    metavar="STUDY:VARIANT",
    help="Keep only these rows of a study (repeatable; the study's reference row is always kept).",
)
@click.option(
    "--scale",
    type=click.Choice(["tiny", "small", "medium", "large"]),
    default="tiny",
    show_default=True,
    help="Scale of the synthetic input generated when --data-root is not given.",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Days of input; the models train and are evaluated on the last one.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=0),
    default=300,
    show_default=True,
    help="Optimizer steps per variant (at tiny scale 80 steps leave the joint model at its untrained "
    "entity-entity recall; 300 learn every task).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--negatives",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Random negatives per task and step (every study but 'negatives').",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the synthetic data and of every variant's training.",
)
@click.option("--preset", type=click.Choice(["auto", "small", "paper"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Contract input to use [default: generate synthetic input into the ablation root].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Ablation root [default: $OMNISAGE_HOME/ablations/<UTC timestamp>].",
)
@click.option("--experiment", default="omnisage-ablations", show_default=True, help="MLflow experiment.")
@click.option(
    "--engine",
    type=click.Choice(["spark", "duckdb"]),
    default=None,
    help="Edge engine of the scratch runs [default: OMNISAGE_ENGINE].",
)
@click.option(
    "--torch-threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch intra-op threads (1 is fastest on a small shared CPU box) [default: torch's].",
)
@click.option(
    "--blocks",
    default=None,
    metavar="SUBSET:TYPE:K,...",
    help="Neighbourhood layout of the run's default data, e.g. pin_board:pin:8,pin_board:board:8,"
    "pin_pin:pin:8 (k_t sized to a small graph) [default: the graph_snapshot asset's, 25/75/50].",
)
def ablate(
    studies,
    variants,
    scale,
    days,
    steps,
    batch_size,
    negatives,
    seed,
    preset,
    device,
    data_root,
    out,
    experiment,
    engine,
    torch_threads,
    blocks,
) -> None:
    """Re-run the paper's ablations (Tables 3, 4, 5, 10, 12, 13, A.2.4) in scratch homes and print the tables.

    Every variant is one MLflow run (never registered) under one parent run of EXPERIMENT in the production
    tracking store; the tables go to ablations.md / ablations.json in the ablation root and to the parent run.
    """
    from omnisage_pipeline.tools.ablations import AblationConfig, AblationError, run_ablations

    config = AblationConfig(
        studies,
        variants=list(variants),
        scale=scale,
        days=days,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        negatives=negatives,
        preset=preset,
        device=device,
        data_root=data_root,
        root=out,
        experiment=experiment,
        engine=engine,
        torch_threads=torch_threads,
        blocks=[b.strip() for b in blocks.split(",") if b.strip()] if blocks else None,
    )
    try:
        result = run_ablations(config, echo=click.echo)
    except AblationError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("")
    click.echo(result.markdown)
    click.echo(f"tables: {result.markdown_path} and {result.json_path}; MLflow parent run {result.parent_run_id}")
    if result.summary["failed"]:
        raise click.ClickException(
            f"{len(result.summary['failed'])} variant(s) failed: " + "; ".join(result.summary["failed"])
        )
