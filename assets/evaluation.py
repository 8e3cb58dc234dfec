"""recall_report (daily): the champion's recall@10 on day D's held-out sets (paper 4.2.1) beside its
baselines, scored and published by ``omnisage_pipeline.evaluation.report`` (its docstring lists them).

Publishes ``reports/dt=D/{recall.json, recall.md, recall.png}``, logs them and the recall metrics to the
champion's MLflow run, shows the table and the plot (recall per task over recent days) as markdown in the
Dagster UI, and its asset check flags a drop of more than ``max_recall_drop`` against the previous report.
"""

import base64
from typing import Literal

import dagster as dg
from pydantic import Field

from assets.daily import DayResult, materialize_days
from ml.layout import PINSAGE_ARTIFACT_PATH, REPORT_FILE
from omnisage_pipeline.embedding.champion import champion_version, load_champion
from omnisage_pipeline.evaluation.report import (
    baselines_markdown,
    build_day_report,
    log_to_mlflow,
    previous_report,
    publish_report,
    report_inputs,
)
from omnisage_pipeline.partitions import DAILY_BACKFILL_POLICY, DAILY_CHAIN_POOL, daily_partitions
from omnisage_pipeline.resources import MlflowResource, StorageResource
from omnisage_pipeline.storage.publish import require_published

REGRESSION_CHECK = "recall_no_regression"


class RecallReportConfig(dg.Config):
    k: int = Field(default=10, description="k of recall@k (4.2.1)")
    pool_size: int = Field(
        default=10_000,
        description="random negatives of the positive's type per query (all entities when fewer)",
    )
    seed: int = Field(default=0, description="seed of the negative pool (the training gate uses the same default)")
    max_queries: int | None = Field(default=None, description="cap on queries per task (seeded subset); None = all")
    baselines: list[str] = Field(
        default=[
            "random",
            "popularity",
            "cooccurrence",
            "window_cooccurrence",
            "ease",
            "als",
            "pinsage",
            "oracle",
        ],
        description="baselines scored on the same sets (oracle only when the input came from the generator; ease "
        "only up to ml.item_baselines.REPORT_EASE_MAX_ITEMS items)",
    )
    als_grid: Literal["report", "full"] = Field(
        default="report",
        description="ALS tuning grid: 'report' (ml.baselines.REPORT_ALS_GRID, 4 fits) or 'full' "
        "(DEFAULT_ALS_GRID, 72 fits)",
    )
    max_recall_drop: float = Field(
        default=0.05,
        description="the asset check fails when a task's recall@k falls by more than this (absolute)",
    )
    history_days: int = Field(default=14, description="previous reports shown in the plot")
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu' or 'cuda[:i]'")


@dg.asset(
    partitions_def=daily_partitions,
    backfill_policy=DAILY_BACKFILL_POLICY,
    pool=DAILY_CHAIN_POOL,
    deps=[
        dg.AssetDep("champion_model"),  # what load_champion reads (assets.sources), not omnisage_model
        dg.AssetDep("training_examples"),
        dg.AssetDep("graph_snapshot"),
        dg.AssetDep("feature_store"),
        dg.AssetDep("entity_embeddings"),  # reported after the day's embeddings, with the same champion
    ],
    check_specs=[
        dg.AssetCheckSpec(
            REGRESSION_CHECK,
            asset="recall_report",
            description="no task's recall@10 fell by more than max_recall_drop against the previous report",
            partitions_def=daily_partitions,
        )
    ],
    group_name="evaluation",
    kinds={"pytorch", "mlflow"},
    owners=["team:omnisage-ml"],
    tags={"layer": "evaluation"},
    code_version="recall-report-3",
    description="recall@10 of the champion per task on the day's held-out sets (4.2.1) and of the baselines "
    "(random, popularity, co-occurrence, windowed co-occurrence, EASE, ALS, PinSage-like, oracle) on the same "
    "sets: reports/dt=D/recall.json.",
)
def recall_report(
    context: dg.AssetExecutionContext,
    config: RecallReportConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
):
    from ml.recall_report import regressions
    from ml.registry import ModelRegistry
    from ml.train import resolve_device

    settings = storage.settings
    device = resolve_device(config.device)
    loaded = load_champion(mlflow.tracking_uri, mlflow.registered_model_name)
    loaded.model.to(device).eval()
    pinsage = None
    if "pinsage" in config.baselines and loaded.run_id:
        pinsage = ModelRegistry(mlflow.tracking_uri, mlflow.registered_model_name).load_run_model(
            loaded.run_id, PINSAGE_ARTIFACT_PATH, map_location=device
        )
    context.log.info(
        f"recall_report: champion v{champion_version(loaded)}; PinSage-like baseline: {pinsage is not None}"
    )

    def one_day(day: str) -> DayResult:
        report = build_day_report(settings, day, config, loaded, pinsage, context.log.info)
        previous = previous_report(settings, day)
        md, png = publish_report(settings, day, report, config.history_days)
        published = require_published(settings.reports_dir, day)
        experiment = mlflow.experiment_id(f"{mlflow.experiment_name}-evaluation")
        tags = {"dagster_run_id": context.run_id}
        run_id = log_to_mlflow(
            mlflow.client(),
            experiment,
            mlflow.registered_model_name,
            report,
            day,
            published,
            report_inputs(settings, day),
            tags,
        )
        drops = regressions(report, previous, config.max_recall_drop)
        metadata = _report_metadata(report, config.k, md, png)
        metadata["path"] = dg.MetadataValue.path(str(published / REPORT_FILE))
        metadata["mlflow_evaluation_run_id"] = run_id
        return DayResult(metadata, [_regression_check(drops, previous, config.max_recall_drop)])

    yield from materialize_days(context, one_day)


def _report_metadata(report: dict, k: int, md: str, png: bytes) -> dict:
    from ml.recall_report import recall_of

    time_split = (report.get("time_split") or {}).get("entity_entity", {})
    value = lambda v: dg.MetadataValue.text("null") if v is None else dg.MetadataValue.float(v)
    return {
        "model_version": report["model_version"],
        "negatives": report["negatives"],
        **{f"recall_at_{k}.{task}": value(recall_of(entry, k)) for task, entry in report["tasks"].items()},
        # what predicts the next engagement (ml.time_split), where the day has pairs first engaged late
        **({f"recall_at_{k}.time_split.entity_entity": value(recall_of(time_split["model"], k))} if time_split else {}),
        "baselines": dg.MetadataValue.md(baselines_markdown(report, k)),
        "report": dg.MetadataValue.md(
            md + "\n\n![recall over recent days](data:image/png;base64," + base64.b64encode(png).decode() + ")"
        ),
    }


def _regression_check(drops, previous: dict | None, max_recall_drop: float) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=REGRESSION_CHECK,
        asset_key=dg.AssetKey("recall_report"),
        passed=not drops,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "previous_partition": (previous or {}).get("partition") or "",
            "max_recall_drop": max_recall_drop,
            "drops": dg.MetadataValue.json(
                {r.task: {"previous": r.previous, "current": r.current, "drop": r.drop} for r in drops}
            ),
        },
        description=(
            "; ".join(f"{r.task} fell {r.drop:.4f} ({r.previous:.4f} -> {r.current:.4f})" for r in drops)
            or "no regression"
        ),
    )
