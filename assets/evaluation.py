"""recall_report (daily): the champion's recall@10 on day D's held-out sets (paper 4.2.1) beside its
baselines - random, popularity, item co-occurrence, ALS (implicit; fitted on the window's logs less the
evaluation's pairs and users, tuned on a validation split carved from them), the PinSage-like model trained
with it (Table 2) and, on generator input, the oracle - all scored by one evaluator on the same sets
(``ml.recall_report``).

Publishes ``reports/dt=D/{recall.json, recall.md, recall.png}``, logs them and the recall metrics to the
champion's MLflow run, shows the table and the plot (recall per task over recent days) as markdown in the
Dagster UI, and its asset check flags a drop of more than ``max_recall_drop`` against the previous report.
"""

import base64
import json
import time
from datetime import date
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.daily import DayResult, materialize_days
from assets.inference import champion_builder, champion_version, load_champion, resolve_device
from assets.training import PINSAGE_ARTIFACT_PATH
from omnisage_pipeline.partitions import DAILY_BACKFILL_POLICY, DAILY_CHAIN_POOL, daily_partitions
from omnisage_pipeline.resources import MlflowResource, StorageResource
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import (
    list_published,
    publish_partition,
    published_path,
    require_published,
)

REPORT_FILE = "recall.json"
MARKDOWN_FILE = "recall.md"
PLOT_FILE = "recall.png"
REGRESSION_CHECK = "recall_no_regression"


class RecallReportConfig(dg.Config):
    k: int = Field(default=10, description="k of recall@k (4.2.1)")
    pool_size: int = Field(
        default=10_000,
        description="random negatives of the positive's type per query (all entities when fewer)",
    )
    seed: int = Field(
        default=0, description="seed of the negative pool (the training gate uses the same default)"
    )
    max_queries: int | None = Field(
        default=None, description="cap on queries per task (seeded subset); None = all"
    )
    baselines: list[str] = Field(
        default=["random", "popularity", "cooccurrence", "als", "pinsage", "oracle"],
        description="baselines scored on the same sets (oracle only when the input came from the generator)",
    )
    als_grid: str = Field(
        default="report",
        description="ALS tuning grid: 'report' (ml.baselines.REPORT_ALS_GRID, 4 fits) or 'full' (DEFAULT_ALS_GRID)",
    )
    max_recall_drop: float = Field(
        default=0.05,
        description="the asset check fails when a task's recall@k falls by more than this (absolute)",
    )
    history_days: int = Field(default=14, description="previous reports shown in the plot")
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu' or 'cuda[:i]'")


# --------------------------------------------------------------------------------------------------------
def previous_report(settings: Settings, day: str) -> dict | None:
    """The newest published report before ``day`` (the regression check's reference)."""
    earlier = [d for d in list_published(settings.reports_dir) if d < day]
    return read_report(settings, earlier[-1]) if earlier else None


def read_report(settings: Settings, day: str) -> dict | None:
    path = published_path(settings.reports_dir, day)
    return json.loads((path / REPORT_FILE).read_text()) if path and (path / REPORT_FILE).is_file() else None


def build_day_report(settings: Settings, day: str, config: RecallReportConfig, loaded, pinsage, log) -> dict:
    """Score the champion and the baselines on day D's held-out sets. Dagster-free."""
    from omnisage_pipeline.storage.retention import read_lease

    # Reader leases: retention never removes the graph or the feature store while they are scored.
    with (
        read_lease(settings.graph_dir, day) as graph_dir,
        read_lease(settings.features_dir, day) as features_dir,
    ):
        return _score_day(settings, day, config, loaded, pinsage, log, graph_dir, features_dir)


def _score_day(
    settings: Settings,
    day: str,
    config: RecallReportConfig,
    loaded,
    pinsage,
    log,
    graph_dir: Path,
    features_dir: Path,
) -> dict:
    from graph_engine.snapshot import GraphSnapshot
    from ml.baselines import CooccurrenceEmbedder, PopularityEmbedder, oracle_baseline, random_baseline
    from ml.evaluator import Evaluator, model_embedders
    from ml.example_loader import load_training_examples
    from ml.recall_report import Candidate, build_report

    examples_dir = require_published(settings.warehouse_dataset("training_examples"), day)
    data = load_training_examples(examples_dir)
    universe = data.universe()
    evaluator = Evaluator(
        data,
        universe,
        k=config.k,
        pool_size=config.pool_size,
        seed=config.seed,
        max_queries=config.max_queries,
    )
    model = Candidate(
        *model_embedders(loaded.model, champion_builder(loaded, graph_dir, features_dir, log)),
        tasks=tuple(loaded.config.tasks),
    )
    snapshot = GraphSnapshot.open(graph_dir)
    baselines: dict[str, Candidate] = {}
    for name in config.baselines:
        if name == "random":
            baselines[name] = Candidate(*random_baseline(universe, seed=config.seed))
        elif name == "popularity":
            pop = PopularityEmbedder(snapshot)
            baselines[name] = Candidate(pop, pop)
        elif name == "cooccurrence":
            co = CooccurrenceEmbedder(snapshot)
            baselines[name] = Candidate(co, co)
        elif name == "als":
            baselines[name] = _als_candidate(settings, day, data, universe, config, log)
        elif name == "pinsage":
            if pinsage is None:
                baselines[name] = Candidate(
                    None, unavailable="the champion's run has no PinSage-like baseline"
                )
            else:
                entity, _ = model_embedders(
                    pinsage.model, champion_builder(pinsage, graph_dir, features_dir, log)
                )
                baselines[name] = Candidate(entity, tasks=("entity_entity",))
        elif name == "oracle":
            if (settings.data_root / "_truth" / "meta.json").is_file():
                from omnisage_pipeline.tools.synthetic import load_truth

                baselines[name] = Candidate(*oracle_baseline(load_truth(settings.data_root), day))
            else:
                log("oracle skipped: the input has no _truth/ (not generator output)")
        else:
            raise ValueError(f"recall_report config field 'baselines': unknown baseline {name!r}")
    return build_report(
        day,
        champion_version(loaded),
        evaluator,
        model,
        baselines,
        extra={"model_run_id": loaded.run_id, "training_partition": loaded.training_partition},
    )


def _als_candidate(settings: Settings, day: str, data, universe, config: RecallReportConfig, log):
    """ALS on the validated logs of day D's window, the evaluation pairs' events and the evaluation users left
    out (they are embedded from their histories), tuned on a validation split of the rest (ml.baselines)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ml.baselines import DEFAULT_ALS_GRID, REPORT_ALS_GRID, fit_als_baseline
    from ml.recall_report import Candidate
    from omnisage_pipeline.partitions import window_keys

    if config.als_grid not in ("report", "full"):
        raise ValueError(
            f"recall_report config field 'als_grid': {config.als_grid!r} is not 'report' or 'full'"
        )
    logs_ds = settings.warehouse_dataset("engagement_logs")
    tables = [pq.read_table(f) for key in window_keys(day) if (path := published_path(logs_ds, key)) is not None
              for f in sorted(path.glob("*.parquet"))]  # fmt: skip
    if not tables:
        return Candidate(None, unavailable="no validated engagement logs in the window")
    logs = pa.concat_tables(tables, promote_options="default")
    als, tuning = fit_als_baseline(
        logs, exclude_pairs=data.eval_pairs, exclude_users=data.eval_sequences["user_id"].to_numpy(),
        universe=universe, grid=DEFAULT_ALS_GRID if config.als_grid == "full" else REPORT_ALS_GRID, k=config.k,
        seed=config.seed,
    )  # fmt: skip
    log(
        f"als: {als.index.matrix.shape[0]} users x {als.index.matrix.shape[1]} items, {als.index.matrix.nnz} "
        f"interactions; tuned on {tuning.validation_pairs} validation pairs: {tuning.best} "
        f"(recall@{config.k} {tuning.best_recall})"
    )
    return Candidate(als, als, tasks=("entity_entity", "user_entity"))


def publish_report(settings: Settings, day: str, report: dict, history_days: int) -> tuple[str, bytes]:
    """Write recall.json / recall.md / recall.png atomically; returns (markdown, png)."""
    from ml.recall_report import markdown, plot_png

    previous = previous_report(settings, day)
    earlier = [d for d in list_published(settings.reports_dir) if d < day][-max(history_days - 1, 0) :]
    history = [r for r in (read_report(settings, d) for d in earlier) if r] + [report]
    md = markdown(report, previous)
    png = plot_png(history)
    with publish_partition(settings.reports_dir, day) as staging:
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=1, sort_keys=False))
        (staging / MARKDOWN_FILE).write_text(md + "\n")
        (staging / PLOT_FILE).write_bytes(png)
    return md, png


def log_to_mlflow(mlflow: MlflowResource, report: dict, day: str, published: Path) -> None:
    """recall.json and the plot as artifacts of the champion's run, the recalls as metrics (step = the day)."""
    from mlflow.entities import Metric

    run_id = report.get("model_run_id")
    if not run_id:
        return
    client = mlflow.client()
    k = report.get("k", 10)
    step = (date.fromisoformat(day) - date(1970, 1, 1)).days
    ts = int(time.time() * 1000)
    metrics = []
    for system, tasks in [("model", report["tasks"]), *report.get("baselines", {}).items()]:
        for task, entry in tasks.items():
            value = entry.get(f"recall@{k}")
            if value is not None:
                name = (
                    f"report/recall_at_{k}/{task}"
                    if system == "model"
                    else f"report/{system}/recall_at_{k}/{task}"
                )
                metrics.append(Metric(name, float(value), ts, step))
    client.log_batch(run_id, metrics=metrics)
    client.log_artifact(run_id, str(published / REPORT_FILE), artifact_path=f"reports/dt={day}")
    client.log_artifact(run_id, str(published / PLOT_FILE), artifact_path=f"reports/dt={day}")


def baselines_markdown(report: dict, k: int) -> str:
    """recall@k of the model and every baseline per task, as a markdown table (null -> n/a)."""
    from ml.recall_report import recall_of

    systems = [("model", report["tasks"]), *report.get("baselines", {}).items()]
    tasks = sorted({t for _, per_task in systems for t in per_task})
    lines = [f"| system | {' | '.join(tasks)} |", "| --- |" + " ---: |" * len(tasks)]
    for name, per_task in systems:
        cells = [recall_of(per_task[t], k) if t in per_task else None for t in tasks]
        lines.append(f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines)


@dg.asset(
    partitions_def=daily_partitions,
    backfill_policy=DAILY_BACKFILL_POLICY,
    pool=DAILY_CHAIN_POOL,
    deps=[
        dg.AssetDep("omnisage_model"),
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
        )
    ],
    group_name="evaluation",
    kinds={"pytorch", "mlflow"},
    owners=["team:omnisage-ml"],
    tags={"layer": "evaluation"},
    code_version="recall-report-2",
    description="recall@10 of the champion per task on the day's held-out sets (4.2.1) and of the baselines "
    "(random, popularity, co-occurrence, ALS, PinSage-like, oracle) on the same sets: reports/dt=D/recall.json.",
)
def recall_report(
    context: dg.AssetExecutionContext,
    config: RecallReportConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
):
    from ml.recall_report import recall_of, regressions
    from ml.registry import ModelRegistry

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
        log_to_mlflow(mlflow, report, day, published)
        drops = regressions(report, previous, config.max_recall_drop)
        k = config.k
        metadata = {
            "model_version": report["model_version"],
            "negatives": report["negatives"],
            **{
                f"recall_at_{k}.{task}": dg.MetadataValue.float(v)
                if (v := recall_of(entry, k)) is not None
                else dg.MetadataValue.text("null")
                for task, entry in report["tasks"].items()
            },
            "baselines": dg.MetadataValue.md(baselines_markdown(report, k)),
            "report": dg.MetadataValue.md(
                md
                + "\n\n![recall over recent days](data:image/png;base64,"
                + base64.b64encode(png).decode()
                + ")"
            ),
            "path": dg.MetadataValue.path(str(published / REPORT_FILE)),
        }
        check = dg.AssetCheckResult(
            check_name=REGRESSION_CHECK,
            asset_key=dg.AssetKey("recall_report"),
            passed=not drops,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "previous_partition": (previous or {}).get("partition") or "",
                "max_recall_drop": config.max_recall_drop,
                "drops": dg.MetadataValue.json(
                    {r.task: {"previous": r.previous, "current": r.current, "drop": r.drop} for r in drops}
                ),
            },
            description=(
                "; ".join(f"{r.task} fell {r.drop:.4f} ({r.previous:.4f} -> {r.current:.4f})" for r in drops)
                or "no regression"
            ),
        )
        return DayResult(metadata, [check])

    yield from materialize_days(context, one_day)
