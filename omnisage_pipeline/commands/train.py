"""``omnisage train``: one training run exactly as the ``omnisage_model`` asset does
(``omnisage_pipeline.training.runner.run_training``), in process or under torchrun."""

from __future__ import annotations

from pathlib import Path

import click

from omnisage_pipeline.commands.options import iso_date


@click.command()
@click.option(
    "--partition",
    default=None,
    callback=iso_date,
    help="training_examples partition to train on [default: the newest published].",
)
@click.option("--steps", type=click.IntRange(min=0), default=None, help="Optimizer steps [default: the preset's].")
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Training processes on this machine; > 1 launches torchrun (DDP: NCCL on GPUs, gloo on CPU).",
)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--preset", type=click.Choice(["auto", "small", "paper"]), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Entity-entity pairs per step and rank.")
@click.option("--negatives", type=click.IntRange(min=0), default=None, help="Random negatives per type and step.")
@click.option(
    "--num-workers",
    type=click.IntRange(min=0),
    default=None,
    help="Batch-building processes per rank [default: half of the rank's cores]; 0 = synchronous.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="JSON (or YAML) object of omnisage_model config fields; the options above override it.",
)
@click.option("--nnodes", default=None, help="torchrun: number of nodes (or MIN:MAX).")
@click.option("--node-rank", type=click.IntRange(min=0), default=None, help="torchrun: this node's rank.")
@click.option("--rdzv-backend", default=None, help="torchrun: rendezvous backend (c10d).")
@click.option("--rdzv-endpoint", default=None, help="torchrun: HOST:PORT of the rendezvous.")
@click.option("--rdzv-id", default=None, help="torchrun: job id shared by all nodes.")
@click.option("--master-addr", default=None, help="torchrun: master address (static rendezvous).")
@click.option("--master-port", type=int, default=None, help="torchrun: master port (static rendezvous).")
def train(
    partition, steps, nproc_per_node, device, preset, batch_size, negatives, num_workers, config_file, **rdzv
) -> None:
    """Train, evaluate, register and gate a model exactly as the omnisage_model asset does."""
    import json

    import yaml

    from ml.run_config import TrainingRunConfig
    from omnisage_pipeline.resources import MlflowResource
    from omnisage_pipeline.settings import Settings
    from omnisage_pipeline.training.runner import run_training

    values = {}
    if config_file is not None:
        text = config_file.read_text()
        values = json.loads(text) if config_file.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(values, dict):
            raise click.ClickException(f"{config_file}: expected an object of omnisage_model config fields")
    overrides = {
        "training_partition": partition,
        "steps": steps,
        "nproc_per_node": nproc_per_node,
        "device": device,
        "preset": preset,
        "batch_size": batch_size,
        "num_random_negatives": negatives,
        "num_workers": num_workers,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = TrainingRunConfig(**values)
    except Exception as exc:  # pydantic's ValidationError names the field
        raise click.ClickException(f"omnisage_model config: {exc}") from exc
    settings = Settings.from_env()
    try:
        outcome = run_training(
            settings,
            MlflowResource.from_settings(settings).target(),
            config,
            rdzv={k: v for k, v in rdzv.items() if v is not None} or None,
            log=lambda m: click.echo(m),
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    if outcome is None:
        click.echo("this node's ranks finished; rank 0 (another node) registers the model")
        return
    click.echo(
        f"model version {outcome.version} -> {outcome.alias} ({outcome.decision}); trained on "
        f"dt={outcome.training_partition}, {outcome.steps} steps in {outcome.train_seconds:.1f}s on "
        f"{outcome.device}; MLflow run {outcome.run_id}"
    )
