"""One day of training examples, Dagster-free: the day's published inputs resolved (the window's validated
logs, entity metadata, the held-out split pruned_edges recorded, the graph and its neighbourhood cache) and
``ml.training_examples.build_training_examples`` run into a staged ``warehouse/training_examples/dt=D``."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ml.layout import HOLDOUT_FILE, NEIGHBORHOODS_DIR
from ml.training_examples import ExampleConfig
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.leases import read_lease
from omnisage_pipeline.storage.publish import publish_partition, published_path, require_published


@dataclass
class WindowLogs:
    """The validated engagement logs of day D's window: days found, days never published, their files."""

    present: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


@dataclass
class ExamplesDay:
    manifest: dict
    logs: WindowLogs
    example_config: ExampleConfig
    seconds: float


def window_logs(settings: Settings, day: str, window: list[str]) -> WindowLogs:
    """The published logs of the ``window`` days (oldest first); day D itself must be published."""
    logs_ds = settings.warehouse_dataset("engagement_logs")
    out = WindowLogs()
    for key in window:
        path = published_path(logs_ds, key)
        if path is None:
            out.missing.append(key)
            continue
        out.present.append(key)
        out.files.extend(sorted(path.glob("*.parquet")))
    if day not in out.present:
        require_published(logs_ds, day)  # the day itself must exist: raises with the dataset and key
    return out


def with_day_holdout(settings: Settings, day: str, example_config: ExampleConfig) -> ExampleConfig:
    """Hold out exactly the pairs the day's graph left out (pruned_edges records its choice)."""
    holdout = json.loads(
        (require_published(settings.warehouse_dataset("pruned_edges"), day) / HOLDOUT_FILE).read_text()
    )
    return dataclasses.replace(
        example_config, eval_fraction=float(holdout["fraction"]), holdout_seed=int(holdout["seed"])
    )


def build_examples_day(
    settings: Settings,
    day: str,
    example_config: ExampleConfig,
    window: list[str],
    validate: Callable[[Path], None] | None = None,
) -> ExamplesDay:
    """Build and publish ``training_examples/dt=D`` from the logs of the ``window`` days (the partition
    mapping's, oldest first); ``validate`` checks the staged partition before it is published."""
    from graph_engine.neighbor_sampler import NeighborhoodCache
    from graph_engine.snapshot import GraphSnapshot
    from ml.training_examples import build_training_examples

    logs = window_logs(settings, day, window)
    example_config = with_day_holdout(settings, day, example_config)
    # Leased for the whole build: a re-publish or retention pass meanwhile keeps the versions read here.
    with (
        read_lease(settings.warehouse_dataset("entity_metadata"), day) as metadata_dir,
        read_lease(settings.graph_dir, day) as graph,
    ):
        snapshot = GraphSnapshot.open(graph)
        cache = NeighborhoodCache.open(graph / NEIGHBORHOODS_DIR, snapshot)
        t0 = time.perf_counter()
        with publish_partition(settings.warehouse_dataset("training_examples"), day, validate=validate) as staging:
            manifest = build_training_examples(
                logs.files,
                metadata_dir / "pins",
                snapshot,
                cache,
                staging,
                day,
                example_config,
                boards_dir=metadata_dir / "boards",
            )
        seconds = time.perf_counter() - t0
        del snapshot, cache
    return ExamplesDay(manifest, logs, example_config, seconds)
