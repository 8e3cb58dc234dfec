"""Embed (this worker's shard of) one day and publish it when complete: the ``entity_embeddings`` service.
Dagster-free: the blocking check on the staged partition comes in as ``validate_for``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from omnisage_pipeline.embedding.champion import champion_training_partition, champion_version
from omnisage_pipeline.embedding.day import DayInputs, EmbedOptions, count_fields, embed_day
from omnisage_pipeline.embedding.shards import (
    publish_if_complete,
    publish_unsharded,
    shard_stage_dir,
    stage_shard,
)
from omnisage_pipeline.settings import Settings

#: (entities expected for the whole day, model version) -> the check of a staged embeddings partition.
ValidateFor = Callable[[int, str], Callable[[Path], None]]


def day_manifest(day: str, loaded, inputs: DayInputs, options: EmbedOptions, stage_key: str) -> dict:
    """The ``_manifest.json`` of a day (and the figures the asset reports): model, inputs, backfill flag."""
    training_partition = champion_training_partition(loaded)
    return {
        "partition": day,
        "model_version": champion_version(loaded),
        "model_run_id": str(getattr(loaded, "run_id", "") or ""),
        "training_partition": training_partition,
        "before_training_cutoff": bool(training_partition and day < training_partition),
        "num_shards": options.num_shards,
        "stage_key": stage_key,
        "inputs": {k: str(v) for k, v in vars(inputs).items() if v is not None},
    }


def embed_and_publish(
    settings: Settings,
    loaded,
    day: str,
    options: EmbedOptions | None = None,
    validate_for: ValidateFor | None = None,
    log=None,
) -> dict:
    """Embed (this shard of) day D and publish (when complete); returns the day's figures. ``validate_for``
    gives the check run on the staged partition before it is published (not run while shards are missing)."""
    options = options or EmbedOptions()
    options.check()
    version = champion_version(loaded)
    t0 = time.perf_counter()
    # Leases for the read only: what is published from here on is this step's own output.
    with DayInputs.leased(settings, day, options.with_users) as inputs:
        stage_key = f"v{version}-{inputs.fingerprint(options.with_users)}"
        result = embed_day(loaded, inputs, options, log=log)
    manifest = day_manifest(day, loaded, inputs, options, stage_key)
    manifest["embedding_dim"] = result.stats.get("embedding_dim", 0)
    validate = validate_for(result.stats["entities_total_day"], version) if validate_for else None
    if options.num_shards == 1:
        publish_unsharded(settings, day, result, {**manifest, **count_fields(result.stats)}, validate=validate)
        outcome = "published"
    else:
        stage = shard_stage_dir(settings, day, stage_key)
        stage_shard(stage, result, options.shard_index, options.num_shards)
        outcome = publish_if_complete(
            settings,
            day,
            stage,
            options.num_shards,
            options.shard_index,
            options.with_users,
            manifest,
            validate,
        )
    return {
        **manifest,
        **result.stats,
        "shard_index": options.shard_index,
        "publish": outcome,
        "partition_complete": outcome in ("published", "already_published"),
        "seconds": round(time.perf_counter() - t0, 3),
    }
