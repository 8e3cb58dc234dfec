"""feature_store asset: the day's RocksDB feature store (paper 3.4.1 "Featurizer").

Reads ``warehouse/entity_metadata/dt=D/{pins,boards}`` and the day's graph snapshot ``graph/dt=D`` (node
set and degrees), builds every record in a staging directory (graph_engine.feature_store) and publishes it
atomically as ``features/dt=D``. Records exist for every entity with metadata AND every graph node, so
entities outside the graph still get features (3.4.1) and graph nodes without metadata still get their
degree.

Blocking check ``every_entity_has_features`` (on the staged store, before publishing): every entity of the
day - metadata ids UNION graph nodes, as the contract says - has a record.
"""

import dagster as dg
from pydantic import Field

from assets.checks import StagedGate, blocking_spec, features_complete
from assets.daily import ROW_COUNT, DayResult, materialize_days
from graph_engine.feature_store import STORE_MAX_TOKENS, build_feature_store
from graph_engine.snapshot import GraphSnapshot
from omnisage_pipeline.embedding.day import day_entities
from omnisage_pipeline.partitions import DAILY_BACKFILL_POLICY, DAILY_CHAIN_POOL, daily_partitions
from omnisage_pipeline.resources import StorageResource
from omnisage_pipeline.storage.leases import read_lease
from omnisage_pipeline.storage.publish import publish_partition


class FeatureStoreConfig(dg.Config):
    max_tokens: int = Field(
        default=STORE_MAX_TOKENS,
        description="token ids kept per entity (unigrams, then bigrams, then character trigrams; paper 3.2)",
    )


@dg.asset(
    partitions_def=daily_partitions,
    deps=[dg.AssetKey("entity_metadata"), dg.AssetKey("graph_snapshot")],
    backfill_policy=DAILY_BACKFILL_POLICY,
    pool=DAILY_CHAIN_POOL,
    check_specs=[
        blocking_spec(
            "every_entity_has_features",
            "feature_store",
            "every metadata entity and graph node has a record",
            partitions_def=daily_partitions,
        )
    ],
    group_name="graph",
    kinds={"rocksdb"},
    owners=["team:omnisage-graph"],
    tags={"layer": "features"},
    code_version="feature-store-2",
    description="RocksDB key-value store of every pin's and board's binarised features (text token ids, "
    "float16 image vector, segment, graph degree), including entities outside the graph (paper 3.4.1).",
)
def feature_store(context: dg.AssetExecutionContext, config: FeatureStoreConfig, storage: StorageResource):
    settings = storage.settings
    run_day = lambda day: _build_day(context, config, settings, day)
    yield from materialize_days(context, run_day, settings=settings, retain=("features",))


def _build_day(context, config: FeatureStoreConfig, settings, day: str) -> DayResult:
    # Leased while read: retention and re-publishing keep the versions being read.
    with (
        read_lease(settings.warehouse_dataset("entity_metadata"), day) as metadata_dir,
        read_lease(settings.graph_dir, day) as graph_dir,
    ):
        snapshot = GraphSnapshot.open(graph_dir)
        entities: dict = {}  # filled inside the publish (its start also clears a dead writer's staging)
        gate = StagedGate(day, lambda staged: [features_complete(staged, entities)])
        with publish_partition(settings.features_dir, day, validate=gate) as staging:
            entities.update(day_entities(metadata_dir, snapshot))
            manifest = build_feature_store(
                metadata_dir, snapshot, staging, max_tokens=config.max_tokens, source_partition=day
            )
        del snapshot
    seconds = manifest["build_seconds"]
    meta = {
        ROW_COUNT: manifest["entities"],
        "path": dg.MetadataValue.path(str(settings.features_dir / f"dt={day}")),
        "entities": manifest["entities"],
        **{f"entities_{t}": c for t, c in manifest["entities_by_type"].items()},
        "entities_with_metadata": manifest["entities_with_metadata"],
        "entities_in_graph": manifest["entities_in_graph"],
        "entities_without_metadata": manifest["entities_without_metadata"],
        "entities_outside_graph": manifest["entities_outside_graph"],
        "entities_with_image": manifest["entities_with_image"],
        "image_dim": manifest["image_dim"],
        "max_tokens": manifest["max_tokens"],
        "record_bytes": manifest["record_bytes"],
        "db_bytes": manifest["db_bytes"],
        "build_seconds": seconds,
        "entities_per_second": round(manifest["entities"] / seconds, 1) if seconds > 0 else 0.0,
    }
    context.log.info(
        f"feature_store dt={day}: {manifest['entities']} records ({manifest['entities_outside_graph']} outside "
        f"the graph), image_dim={manifest['image_dim']}, {manifest['db_bytes']} bytes in {seconds:.1f}s"
    )
    return DayResult(meta, gate.results)
