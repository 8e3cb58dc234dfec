"""``omnisage tune``: hyper-parameter search on the validation split (``ml.tuning``)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="tune")
@click.option("--system", type=click.Choice(["model", "pinsage"]), default="model", show_default=True)
@click.option("--trials", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True, help="Steps per trial.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the TPE sampler.")
@click.option("--partition", default=None, help="training_examples partition [default: the newest].")
@click.option(
    "--base",
    "base_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="JSON object of omnisage_model config fields the trials start from.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("omnisage-tuned.json"),
    show_default=True,
    help="Where the best settings go (omnisage train --config reads it); the study summary goes beside it.",
)
def tune(system, trials, steps, seed, partition, base_file, out) -> None:
    """Search the model's settings on the validation split only (Optuna TPE, median pruning); every trial is
    an MLflow run nested under the study's run (experiment '<experiment>-tuning')."""
    import json

    from ml.run_config import TrainingRunConfig
    from ml.tuning import TuneConfig
    from omnisage_pipeline.resources import MlflowResource
    from omnisage_pipeline.settings import Settings
    from omnisage_pipeline.training.tune import summary_path, tune_partition

    try:
        values = json.loads(base_file.read_text()) if base_file else {}
        base = TrainingRunConfig(**{**values, **({"training_partition": partition} if partition else {})})
        study = TuneConfig(system=system, trials=trials, steps=steps, seed=seed)
    except (ValueError, TypeError) as exc:  # pydantic names the field
        raise click.ClickException(f"tune config: {exc}") from exc
    settings = Settings.from_env()
    try:
        result = tune_partition(
            settings, MlflowResource.from_settings(settings).target(), base, study, out, log=click.echo
        )
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"best validation recall {result.best_value} ({result.summary['complete']} complete, "
        f"{result.summary['pruned']} pruned, {result.summary['seconds']} s): {out}, {summary_path(out)}"
    )
