"""entity_embeddings asset: daily batch inference with the registry's champion (paper 3.4.1 "Inference",
3.5), plus user embeddings (beyond the paper). Wiring only: ``omnisage_pipeline.embedding`` embeds and
publishes (its ``day`` module describes the outputs and the sharding); this module holds the run config,
the blocking ``embeddings_valid`` check and the materialization metadata.

Sharding: run the asset N times for the same partition, with run config ``ops: {entity_embeddings: {config:
{num_shards: N, shard_index: i}}}`` for i = 0..N-1 (N Dagster runs, e.g. from the launchpad or ``dagster
asset materialize --select entity_embeddings --partition D --config shard_i.yaml``; every worker needs the
same OMNISAGE_HOME on a shared POSIX filesystem). The worker that completes the set publishes the day; one
that finishes early reports ``publish: waiting`` as an ``AssetObservation``, not a materialization.

(No ``from __future__ import annotations`` here: Dagster resolves the Config type from the real annotation.)
"""

import dagster as dg
from pydantic import Field

from assets.checks import StagedGate, embeddings_valid
from assets.daily import ROW_COUNT, DayResult, materialize_days
from omnisage_pipeline.embedding.champion import champion_training_partition, champion_version, load_champion
from omnisage_pipeline.embedding.day import EmbedOptions
from omnisage_pipeline.embedding.run import embed_and_publish
from omnisage_pipeline.partitions import DAILY_BACKFILL_POLICY, daily_partitions
from omnisage_pipeline.resources import MlflowResource, StorageResource
from omnisage_pipeline.settings import Settings


class EmbeddingsConfig(dg.Config):
    num_shards: int = Field(default=1, ge=1, description="workers splitting one day (see the module docstring)")
    shard_index: int = Field(default=0, description="this worker's shard, 0 <= shard_index < num_shards")
    batch_size: int = Field(default=512, description="entities per forward pass")
    user_batch_size: int = Field(default=256, description="user sequences per forward pass")
    user_embeddings: bool = Field(default=True, description="also write user_embeddings/dt=D (beyond the paper)")
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu' or 'cuda[:i]'")
    log_every: int = Field(default=50_000, description="log progress (entities/s) every this many entities")
    norm_tolerance: float = Field(
        default=1e-3,
        gt=0.0,
        description="blocking check embeddings_valid: largest allowed | ||e|| - 1 | of an entity embedding",
    )

    def options(self) -> EmbedOptions:
        return EmbedOptions(
            num_shards=self.num_shards,
            shard_index=self.shard_index,
            batch_size=self.batch_size,
            user_batch_size=self.user_batch_size,
            with_users=self.user_embeddings,
            log_every=self.log_every,
            norm_tolerance=self.norm_tolerance,
        )


def run_day(settings: Settings, loaded, day: str, *, log=None, **options) -> dict:
    """Embed (this shard of) day D and publish (when complete), ``options`` being ``EmbedOptions`` fields.
    Returns the day's figures and, under ``check_results``, the blocking ``embeddings_valid`` check
    evaluated on the staged partition before it was published (none when this shard waits for others)."""
    opts = EmbedOptions(**options)
    gates: list[StagedGate] = []

    def validate_for(expected: int, version: str) -> StagedGate:
        gates.append(StagedGate(day, lambda staged: [embeddings_valid(staged, expected, version, opts.norm_tolerance)]))
        return gates[-1]

    figures = embed_and_publish(settings, loaded, day, opts, validate_for, log=log)
    return {"check_results": gates[0].results if gates else [], **figures}


def _not_evaluated(config: EmbeddingsConfig, publish: str) -> list[dg.AssetCheckResult]:
    """Nothing of this day was published by this worker, so there was nothing to check; Dagster still takes
    one result per check and step."""
    return [
        dg.AssetCheckResult(
            asset_key="entity_embeddings",
            check_name="embeddings_valid",
            passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"evaluated": False, "publish": publish},
            description=f"not evaluated: shard {config.shard_index} {publish}; the worker that publishes the "
            "partition checks it",
        )
    ]


def _day_metadata(settings: Settings, day: str, figures: dict) -> dict:
    metadata = {k: v for k, v in figures.items() if k != "inputs"}
    metadata["training_partition"] = figures["training_partition"] or ""
    metadata["inputs"] = dg.MetadataValue.json(figures["inputs"])
    metadata["path"] = dg.MetadataValue.path(str(settings.embeddings_dir / f"dt={day}"))
    metadata["user_path"] = dg.MetadataValue.path(str(settings.user_embeddings_dir / f"dt={day}"))
    if figures["partition_complete"]:
        metadata[ROW_COUNT] = int(figures["entities_total_day"])
    return metadata


@dg.asset(
    partitions_def=daily_partitions,
    backfill_policy=DAILY_BACKFILL_POLICY,
    deps=[
        # The registry's champion (assets.sources): a promotion changes its data version and stales the
        # embedded days; a challenger (a new omnisage_model materialization) does not.
        dg.AssetDep("champion_model"),
        dg.AssetDep("graph_snapshot"),
        dg.AssetDep("feature_store"),
        dg.AssetDep("entity_metadata"),
        dg.AssetDep("training_examples"),
    ],
    check_specs=[
        dg.AssetCheckSpec(
            "embeddings_valid",
            asset="entity_embeddings",
            blocking=True,
            description="finite, unit-norm, one per entity of the day, all from the champion version the run resolved",
            partitions_def=daily_partitions,
        )
    ],
    # A shard that waits for the others publishes nothing: no output, no materialization (assets.daily).
    output_required=False,
    group_name="inference",
    kinds={"pytorch", "parquet"},
    owners=["team:omnisage-ml"],
    tags={"layer": "inference"},
    code_version="entity-embeddings-2",
    description="Embeddings of every pin and board of the day (metadata + graph; zero-imputed neighbours "
    "outside the graph, paper 3.5) and of the window's active users, with the MLflow champion.",
)
def entity_embeddings(
    context: dg.AssetExecutionContext,
    config: EmbeddingsConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
):
    from ml.train import resolve_device

    options = config.options()
    options.check()
    settings = storage.settings
    loaded = load_champion(mlflow.tracking_uri, mlflow.registered_model_name)
    device = resolve_device(config.device)
    loaded.model.to(device).eval()
    context.log.info(
        f"champion: version {champion_version(loaded)} (run {getattr(loaded, 'run_id', '?')}, trained on "
        f"dt={champion_training_partition(loaded)}) on {device}; shard {config.shard_index}/{config.num_shards}"
    )

    def one_day(day: str) -> DayResult:
        log = lambda msg: context.log.info(f"entity_embeddings dt={day}: {msg}")
        figures = run_day(settings, loaded, day, log=log, **vars(options))
        checks = figures.pop("check_results")
        if figures["publish"] != "published":
            checks = _not_evaluated(config, figures["publish"])
        if figures["before_training_cutoff"]:
            context.log.warning(
                f"dt={day} is before the champion's training partition dt={figures['training_partition']}: "
                "embedded with a model that has seen later engagement (backfill)"
            )
        if figures["publish"] == "waiting":
            context.log.info(
                f"dt={day}: shard {config.shard_index} of {config.num_shards} staged; the partition is published "
                "by the worker that completes the set"
            )
        metadata = _day_metadata(settings, day, figures)
        return DayResult(metadata, checks, published=figures["partition_complete"])

    yield from materialize_days(context, one_day, settings=settings, retain=("embeddings", "user_embeddings"))
