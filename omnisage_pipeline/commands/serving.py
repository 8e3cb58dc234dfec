"""``omnisage neighbors`` and ``omnisage serve``: queries of the published ann_index partitions
(``omnisage_pipeline.serving``)."""

from __future__ import annotations

import click

from omnisage_pipeline.commands.options import iso_date


@click.command()
@click.option(
    "--type",
    "source_type",
    type=click.Choice(["pin", "board"]),
    default=None,
    help="Type of the query entity (with --id).",
)
@click.option("--id", "entity_id", type=int, default=None, help="The query entity's id (the contract's int64 id).")
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
    callback=iso_date,
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
    click.echo(
        f"dt={loaded.partition} model {loaded.model_version}: {len(items)} nearest {target}s of {source} {query_id}"
    )
    for rank, item in enumerate(items, 1):
        click.echo(f"{rank:>4}  {item.id:>20d}  {item.score:.4f}")
    if as_json:
        click.echo(json.dumps([item.to_dict() for item in items]))


@click.command()
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
