"""ann_index (daily): FAISS indexes over the day's published embeddings, for retrieval (paper 1, 4.3).

Reads ``embeddings/dt=D`` (and ``user_embeddings/dt=D`` when published), builds one index per entity type
(``omnisage_pipeline.serving``: exact below ``flat_max_vectors``, HNSW above, IVF-PQ with exact re-ranking
when ``memory_budget_mb`` asks for it), checks the STAGED index (recall@10 against exact search on sampled
queries; a failure refuses to publish and fails the step) and publishes ``indexes/dt=D`` atomically with its
``manifest.json``. Retention prunes ``indexes/`` like ``embeddings/``.

(No ``from __future__ import annotations`` here: Dagster resolves the Config type from the real annotation.)
"""

from typing import Literal

import dagster as dg
from pydantic import Field

from assets.daily import BlockingCheckFailed, DayResult, materialize_days
from omnisage_pipeline.partitions import DAILY_BACKFILL_POLICY, daily_partitions
from omnisage_pipeline.resources import StorageResource
from omnisage_pipeline.serving.build import CHECK_NAME, CheckParams, IndexCheckError, build_day_index
from omnisage_pipeline.serving.index import IndexParams


class AnnIndexConfig(dg.Config):
    index_type: Literal["auto", "flat", "hnsw", "ivfpq"] = Field(
        default=IndexParams.index_type,
        description="'auto': flat up to flat_max_vectors, hnsw above, ivfpq under memory_budget_mb",
    )
    flat_max_vectors: int = Field(
        default=IndexParams.flat_max_vectors, ge=1, description="largest type indexed exactly (IndexFlatIP)"
    )
    hnsw_m: int = Field(default=IndexParams.hnsw_m, ge=4, le=256, description="HNSW links per node (M)")
    hnsw_ef_construction: int = Field(default=IndexParams.hnsw_ef_construction, ge=8, description="HNSW efConstruction")
    hnsw_ef_search: int = Field(
        default=IndexParams.hnsw_ef_search, ge=1, description="HNSW efSearch (the start of the tuning)"
    )
    ivf_nlist: int = Field(default=IndexParams.ivf_nlist, ge=0, description="IVF lists; 0 = 4 sqrt(n), at most n / 39")
    ivf_nprobe: int = Field(
        default=IndexParams.ivf_nprobe, ge=1, description="IVF lists probed (the start of the tuning)"
    )
    pq_m: int = Field(
        default=IndexParams.pq_m,
        ge=0,
        description="PQ sub-quantizers (must divide d); 0 = the largest <= d / 4",
    )
    pq_nbits: int = Field(default=IndexParams.pq_nbits, ge=4, le=12, description="bits per PQ code")
    rerank_factor: int = Field(
        default=IndexParams.rerank_factor, ge=1, description="ivfpq: k * this candidates re-ranked exactly"
    )
    memory_budget_mb: float | None = Field(
        default=IndexParams.memory_budget_mb,
        gt=0,
        description="in-memory index budget (all types); over it the largest types use ivfpq",
    )
    train_sample: int = Field(
        default=IndexParams.train_sample, ge=256, description="ivfpq training vectors (seeded sample)"
    )
    check_queries: int = Field(
        default=CheckParams.queries, ge=10, description="sampled query entities per type for the check"
    )
    min_recall: float = Field(
        default=CheckParams.min_recall, ge=0.0, le=1.0, description="the check's minimum recall@10"
    )
    tune_search: bool = Field(
        default=CheckParams.tune, description="double efSearch / nprobe until the tuning sample passes"
    )
    max_ef_search: int = Field(default=CheckParams.max_ef_search, ge=1, description="cap of the efSearch tuning")
    faiss_threads: int = Field(default=2, ge=1, description="OpenMP threads of FAISS while building")
    seed: int = Field(default=IndexParams.seed, description="seed of the samples (training, tuning, check)")

    def index_params(self) -> IndexParams:
        names = IndexParams.__dataclass_fields__
        return IndexParams(**{k: v for k, v in self.model_dump().items() if k in names})

    def check_params(self) -> CheckParams:
        return CheckParams(
            queries=self.check_queries,
            min_recall=self.min_recall,
            tune=self.tune_search,
            max_ef_search=self.max_ef_search,
            seed=self.seed,
        )


@dg.asset(
    partitions_def=daily_partitions,
    backfill_policy=DAILY_BACKFILL_POLICY,
    deps=[dg.AssetDep("entity_embeddings")],
    check_specs=[
        dg.AssetCheckSpec(
            CHECK_NAME,
            asset="ann_index",
            blocking=True,
            description="recall@10 of the staged index against exact search on sampled queries >= min_recall "
            "(evaluated before publishing; a failure publishes nothing)",
            partitions_def=daily_partitions,
        )
    ],
    group_name="serving",
    kinds={"faiss"},
    owners=["team:omnisage-ml"],
    tags={"layer": "serving"},
    code_version="ann-index-1",
    description="Per-type FAISS indexes (pin, board) of the day's embeddings plus the users' query vectors: "
    "indexes/dt=D, read by `omnisage neighbors` and `omnisage serve`.",
)
def ann_index(context: dg.AssetExecutionContext, config: AnnIndexConfig, storage: StorageResource):
    import faiss

    settings = storage.settings
    faiss.omp_set_num_threads(config.faiss_threads)
    params, check = config.index_params(), config.check_params()

    def one_day(day: str) -> DayResult:
        try:
            manifest = build_day_index(
                settings.embeddings_dir,
                settings.user_embeddings_dir,
                settings.indexes_dir,
                day,
                params,
                check,
                log=lambda msg: context.log.info(f"ann_index {msg}"),
            )
        except IndexCheckError as exc:  # recorded as a failed check, then the step fails (assets.daily)
            failed = dg.AssetCheckResult(
                check_name=CHECK_NAME,
                asset_key=dg.AssetKey("ann_index"),
                passed=False,
                metadata={"recall": dg.MetadataValue.json(exc.recall), "min_recall": check.min_recall},
                description=str(exc),
            )
            raise BlockingCheckFailed(day, [failed]) from exc
        recall = manifest["check"]["recall"]
        types = manifest["types"]
        metadata = {
            "partition": day,
            "model_version": manifest["model_version"],
            "dimension": manifest["dimension"],
            "build_seconds": manifest["build_seconds"],
            "size_bytes": manifest["size_bytes"],
            "dagster/row_count": sum(e["count"] for e in types.values()),
            **{f"vectors_{t}": n for t, n in manifest["counts"].items()},
            **{f"recall_at_10.{t}": r for t, r in recall.items()},
            "index_types": dg.MetadataValue.json(
                {t: {"index_type": e["index_type"], **e["params"]} for t, e in types.items()}
            ),
            "path": dg.MetadataValue.path(str(settings.indexes_dir / f"dt={day}")),
        }
        result = dg.AssetCheckResult(
            check_name=CHECK_NAME,
            asset_key=dg.AssetKey("ann_index"),
            passed=True,  # a failing check raised before publishing (omnisage_pipeline.serving.build)
            metadata={
                "recall": dg.MetadataValue.json(recall),
                "min_recall": check.min_recall,
                "queries_per_type": check.queries,
            },
            description=f"recall@10 vs exact: {recall}",
        )
        return DayResult(metadata, [result])

    yield from materialize_days(context, one_day, settings=settings, retain=("indexes",))
