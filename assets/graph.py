"""Graph construction assets (paper 4.1, appendix A.1): ``daily_edges`` and ``pruned_edges``.

Thin wrappers around ``graph_engine.edge_engine``: the engine (``OMNISAGE_ENGINE``: spark by default,
or duckdb) is picked by name and used through its interface only; Spark starts only when the Spark
engine is used. Each asset publishes one partition atomically. They carry no asset checks: the rules a
check could test here hold by construction (the engines drop self loops, write literal edge types and
weights that are counts >= 1); what can go wrong upstream is checked at ingest.

daily_edges, partition D: ``warehouse/engagement_logs/dt=D`` -> ``warehouse/daily_edges/dt=D``: the day's
    canonical undirected edges weighted by the day's count (contract "Edges").
pruned_edges, partition D: the published daily_edges partitions of the OMNISAGE_WINDOW_DAYS days ending
    at D (the partition mapping gives the days; days never published are absent), weights summed per
    undirected edge, then Algorithm 2 per adjacency list -> one row per kept directed entry.
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_pyspark import LazyPySparkResource
from pydantic import Field

from assets.checks import parquet_rows
from assets.daily import ROW_COUNT, DayResult, materialize_days
from graph_engine.edge_engine import EdgeEngine, get_engine
from graph_engine.holdout import DEFAULT_EVAL_FRACTION, DEFAULT_HOLDOUT_SEED, Holdout
from graph_engine.pruning import PruningParams
from ml.layout import HOLDOUT_FILE
from omnisage_pipeline.partitions import (
    DAILY_BACKFILL_POLICY,
    DAILY_CHAIN_POOL,
    daily_partitions,
    window_keys,
    window_mapping,
)
from omnisage_pipeline.resources import StorageResource
from omnisage_pipeline.storage.publish import (
    partition_link,
    publish_partition,
    published_path,
    require_published,
)

#: Written into every pruned_edges partition: the held-out pairs the graph leaves out.
OWNERS = ["team:omnisage-graph"]


class HoldoutConfig(dg.Config):
    """The evaluation hold-out (graph_engine.holdout): daily_edges drops held-out users' events, pruned_edges
    held-out pairs, and training_examples follows pruned_edges' choice (its _holdout.json)."""

    eval_fraction: float = Field(
        default=DEFAULT_EVAL_FRACTION,
        description="share of entity pairs and users held out for evaluation: their edges and events never "
        "enter the graph (daily_edges and pruned_edges must agree; pruned_edges checks)",
    )
    holdout_seed: int = Field(default=DEFAULT_HOLDOUT_SEED, description="seed of the held-out hash")

    def holdout(self) -> Holdout:
        return Holdout(fraction=self.eval_fraction, seed=self.holdout_seed)


class DailyEdgesConfig(HoldoutConfig):
    """Whose engagement never becomes an edge: the user-entity evaluation's held-out users."""


def check_daily_holdout(daily_dir: Path, day: str, holdout: Holdout) -> None:
    """A daily_edges partition must have left out the same users pruned_edges' examples hold out."""
    path = daily_dir / HOLDOUT_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else None
    if recorded != asdict(holdout):
        raise ValueError(
            f"daily_edges dt={day} ({path}): held-out users {recorded} differ from pruned_edges' "
            f"eval_fraction/holdout_seed {asdict(holdout)}; re-materialize daily_edges with the same config "
            "(a partition written before held-out users were dropped has no record)"
        )


class PruningConfig(HoldoutConfig):
    """Algorithm 2's hyper-parameters (paper appendix A.1; values of A.1/A.3) and the sampling seed."""

    alpha: float = Field(default=0.86, description="alpha of A.1: a node of degree d keeps ~d**alpha entries")
    d_min: int = Field(default=10, description="d_min of A.1: lists this short or shorter are kept whole")
    d_max: int = Field(default=10_000, description="d_max of A.1: no list keeps more entries than this")
    seed: int = Field(default=0, description="seed of the portable sampling key (graph_engine.pruning)")

    def params(self) -> PruningParams:
        return PruningParams(alpha=self.alpha, d_min=self.d_min, d_max=self.d_max, seed=self.seed)


def _engine(storage: StorageResource, pyspark: LazyPySparkResource) -> EdgeEngine:
    settings = storage.settings
    # The factory defers pyspark.spark_session: the DuckDB engine never starts a JVM.
    return get_engine(
        settings.engine, spark_session_factory=lambda: pyspark.spark_session, scratch_dir=settings.scratch_dir
    )


def table1_markdown(before: dict[str, Any], after: dict[str, Any] | None = None) -> str:
    """The paper's Table 1 (4.1) as markdown: per node type |V_t| and average degree, per edge type |E_r|
    (undirected edges before pruning; kept directed entries after)."""
    lines = []
    if after is None:
        lines += ["| node type | nodes | avg degree |", "| --- | ---: | ---: |"]
        for t, v in before["node_types"].items():
            lines.append(f"| {t} | {v['nodes']:,} | {v['avg_degree']:.2f} |")
        lines += ["", "| edge type | edges | weight |", "| --- | ---: | ---: |"]
        for e, v in before["edge_types"].items():
            lines.append(f"| {e} | {v['edges']:,} | {v['weight']:,.0f} |")
        return "\n".join(lines)
    lines += [
        "| node type | nodes before | avg degree before | nodes after | avg degree after |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for t in sorted(set(before["node_types"]) | set(after["node_types"])):
        b = before["node_types"].get(t, {"nodes": 0, "avg_degree": 0.0})
        a = after["node_types"].get(t, {"nodes": 0, "avg_degree": 0.0})
        lines.append(f"| {t} | {b['nodes']:,} | {b['avg_degree']:.2f} | {a['nodes']:,} | {a['avg_degree']:.2f} |")
    lines += [
        "",
        "| edge type | undirected edges before | entries before | entries kept |",
        "| --- | ---: | ---: | ---: |",
    ]
    for e in sorted(set(before["edge_types"]) | set(after["edge_types"])):
        b = before["edge_types"].get(e, {"edges": 0, "entries": 0})
        a = after["edge_types"].get(e, {"entries": 0})
        lines.append(f"| {e} | {b['edges']:,} | {b['entries']:,} | {a['entries']:,} |")
    return "\n".join(lines)


@dg.asset(
    partitions_def=daily_partitions,
    deps=[dg.AssetDep("engagement_logs")],
    backfill_policy=DAILY_BACKFILL_POLICY,
    pool=DAILY_CHAIN_POOL,
    group_name="graph",
    kinds={"parquet", "duckdb", "spark"},
    owners=OWNERS,
    tags={"layer": "graph"},
    code_version="daily-edges-2",
    description="The day's typed, weighted, undirected edges (paper 4.1): pin_board from saves, pin_pin from "
    "related-pins saves/clicks; canonical orientation, weight = the day's count.",
)
def daily_edges(
    context: dg.AssetExecutionContext,
    config: DailyEdgesConfig,
    storage: StorageResource,
    pyspark: LazyPySparkResource,
):
    settings = storage.settings
    engine = _engine(storage, pyspark)
    dataset = settings.warehouse_dataset("daily_edges")
    holdout = config.holdout()

    def run_day(day: str) -> DayResult:
        events = require_published(settings.warehouse_dataset("engagement_logs"), day)
        with publish_partition(dataset, day) as staging:
            stats = engine.extract_daily_edges(events, staging, held_out_users=holdout)
            (staging / HOLDOUT_FILE).write_text(json.dumps(asdict(holdout)))  # pruned_edges checks it
        return _daily_result(engine, dataset, day, stats)

    yield from materialize_days(context, run_day)


def _daily_result(engine: EdgeEngine, dataset: Path, day: str, stats: dict[str, Any]) -> DayResult:
    table = stats["table1"]
    return DayResult(
        metadata={
            ROW_COUNT: parquet_rows([partition_link(dataset, day)]),
            "engine": engine.name,
            "events": stats["events"],
            "held_out_user_events": int(stats.get("held_out_user_events", 0)),
            "edges": sum(v["edges"] for v in table["edge_types"].values()),
            "nodes": table["total_nodes"],
            "table1": dg.MetadataValue.md(table1_markdown(table)),
            "table1_json": dg.MetadataValue.json(table),
            "path": dg.MetadataValue.path(str(partition_link(dataset, day))),
        },
    )


@dg.asset(
    partitions_def=daily_partitions,
    # Nothing-typed input: nothing is loaded through an IO manager; the input only carries the window
    # mapping, so Dagster's lineage and the days this asset reads come from one definition.
    ins={"daily_edges": dg.AssetIn(partition_mapping=window_mapping(), dagster_type=dg.Nothing)},
    backfill_policy=DAILY_BACKFILL_POLICY,
    pool=DAILY_CHAIN_POOL,
    group_name="graph",
    kinds={"parquet", "duckdb", "spark"},
    owners=OWNERS,
    tags={"layer": "graph"},
    code_version="pruned-edges-2",
    description="The graph of day D: daily edges of the OMNISAGE_WINDOW_DAYS days ending at D summed, then "
    "degree-based pruning (paper appendix A.1, Algorithm 2); one row per kept directed adjacency entry.",
)
def pruned_edges(
    context: dg.AssetExecutionContext,
    config: PruningConfig,
    storage: StorageResource,
    pyspark: LazyPySparkResource,
):
    settings = storage.settings
    params = config.params()
    daily = settings.warehouse_dataset("daily_edges")
    engine = _engine(storage, pyspark)
    dataset = settings.warehouse_dataset("pruned_edges")

    def run_day(day: str) -> DayResult:
        window = window_keys(day)
        present: list[str] = []
        dirs: list[Path] = []
        for key in window:
            path = published_path(daily, key)
            if path is not None:
                check_daily_holdout(path, key, config.holdout())
                present.append(key)
                dirs.append(path)
        missing = [k for k in window if k not in present]
        if missing:
            context.log.info(f"dt={day}: {len(missing)} day(s) of the window have no published daily_edges: {missing}")
        holdout = config.holdout()
        with publish_partition(dataset, day) as staging:
            stats = engine.prune_window(dirs, staging, params, holdout)
            # Readers skip "_" files; training_examples reads it to hold out exactly these pairs.
            (staging / HOLDOUT_FILE).write_text(json.dumps(asdict(holdout)))
        before, after = stats["before"], stats["after"]
        return DayResult(
            metadata={
                ROW_COUNT: parquet_rows([partition_link(dataset, day)]),
                "engine": engine.name,
                "window_days": len(window),
                "window": dg.MetadataValue.json(
                    {
                        "first": window[0] if window else None,
                        "last": window[-1] if window else None,
                        "present": present,
                        "missing": missing,
                    }
                ),
                "pruning_params": dg.MetadataValue.json(params.to_dict()),
                "kept_fraction": float(stats["kept_fraction"]),
                "held_out_edges": int(stats["held_out_edges"]),
                "entries_before": before["total_entries"],
                "entries_after": after["total_entries"],
                "nodes": after["total_nodes"],
                "table1": dg.MetadataValue.md(table1_markdown(before, after)),
                "table1_before": dg.MetadataValue.json(before),
                "table1_after": dg.MetadataValue.json(after),
                "path": dg.MetadataValue.path(str(partition_link(dataset, day))),
            },
        )

    yield from materialize_days(context, run_day)
