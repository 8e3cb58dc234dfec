"""graph_snapshot asset: the day's memory-mapped graph snapshot and its neighbourhood cache (paper 3.1.1,
3.4.1, 4.1).

``graph/dt=D/`` holds the snapshot (graph_engine.snapshot layout) and ``neighborhoods/`` (every node
sampled once, graph_engine.neighbor_sampler), built together in one staging directory and published in
one atomic step, so a reader never sees a snapshot without its matching cache.

Blocking check ``graph_coverage`` (on the staged cache, before publishing): at least ``min_coverage`` of the
graph's nodes have a non-empty neighbourhood N(u); a layout whose blocks miss most node types, or a
restart probability / budget that leaves neighbourhoods empty, is refused and the previous day stays.

(No `from __future__ import annotations` here: Dagster resolves the Config type from the real annotation.)
"""

import time

import dagster as dg
from pydantic import Field

from assets.checks import StagedGate, blocking_spec, graph_coverage
from assets.daily import DayResult, materialize_days
from graph_engine.batch import NeighborhoodLayout, parse_blocks
from graph_engine.neighbor_sampler import NeighborSampler, build_neighborhood_cache
from graph_engine.ppr import DEFAULT_BUDGET, DEFAULT_RESTART_PROB
from graph_engine.snapshot import DEFAULT_SUBSETS, GraphSnapshot, build_snapshot
from ml.layout import NEIGHBORHOODS_DIR
from omnisage_pipeline.partitions import DAILY_BACKFILL_POLICY, DAILY_CHAIN_POOL, daily_partitions
from omnisage_pipeline.resources import StorageResource
from omnisage_pipeline.storage.publish import publish_partition, require_published

_DEFAULT_LAYOUT = NeighborhoodLayout.paper_default()


class GraphSnapshotConfig(dg.Config):
    restart_prob: float = Field(
        default=DEFAULT_RESTART_PROB,
        description="restart probability of the random walk with restart (3.1.1)",
    )
    budget: int = Field(default=DEFAULT_BUDGET, description="B of 3.1.1: forward-push threshold delta = 1/B")
    subsets: dict[str, list[str]] = Field(
        default={k: list(v) for k, v in DEFAULT_SUBSETS.items()},
        description="relation subsets R_i (3.1.1): name -> edge types (contract 'Names')",
    )
    blocks: list[str] = Field(
        default=[f"{b.subset}:{b.node_type}:{b.k}" for b in _DEFAULT_LAYOUT.blocks],
        description="neighbourhood layout, 'subset:node_type:k_t' per block (4.1 defaults 25 pins + 75 boards "
        "on pin_board, 50 pins on pin_pin)",
    )
    batch_size: int = Field(default=8192, description="nodes per sampling batch while building the cache")
    min_coverage: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="blocking check graph_coverage: least share of nodes with a non-empty neighbourhood",
    )


@dg.asset(
    partitions_def=daily_partitions,
    deps=[dg.AssetKey("pruned_edges")],
    backfill_policy=DAILY_BACKFILL_POLICY,
    pool=DAILY_CHAIN_POOL,
    check_specs=[
        blocking_spec(
            "graph_coverage",
            "graph_snapshot",
            "share of nodes with a non-empty neighbourhood >= min_coverage",
            partitions_def=daily_partitions,
        )
    ],
    group_name="graph",
    kinds={"numpy"},
    owners=["team:omnisage-graph"],
    tags={"layer": "graph"},
    code_version="graph-snapshot-2",
    description="Memory-mapped CSR snapshot of the day's pruned graph per relation subset, with every node's "
    "heterogeneous forward-push neighbourhood precomputed (paper 3.1.1, 3.4.1).",
)
def graph_snapshot(context: dg.AssetExecutionContext, config: GraphSnapshotConfig, storage: StorageResource):
    settings = storage.settings
    run_day = lambda day: _build_day(context, config, settings, day)
    yield from materialize_days(context, run_day, settings=settings, retain=("graph",))


def _build_day(context, config: GraphSnapshotConfig, settings, day: str) -> DayResult:
    layout = parse_blocks(config.blocks)
    subsets = {k: tuple(v) for k, v in config.subsets.items()}
    for block in layout.blocks:
        if block.subset not in subsets:
            raise ValueError(
                f"graph_snapshot config field 'blocks': block {block} names subset {block.subset!r}, "
                f"not in field 'subsets' ({sorted(subsets)})"
            )
    pruned = require_published(settings.warehouse_dataset("pruned_edges"), day)

    gate = StagedGate(day, lambda staged: [graph_coverage(staged / NEIGHBORHOODS_DIR, config.min_coverage)])
    with publish_partition(settings.graph_dir, day, validate=gate) as staging:
        manifest = build_snapshot(pruned, staging, subsets, source_partition=day)
        snapshot = GraphSnapshot.open(staging)
        sampler = NeighborSampler(snapshot, layout, restart_prob=config.restart_prob, budget=config.budget)
        t0 = time.perf_counter()
        cache = build_neighborhood_cache(snapshot, sampler, staging / NEIGHBORHOODS_DIR, batch_size=config.batch_size)
        sampling_seconds = time.perf_counter() - t0
        del snapshot, sampler  # drop the maps before the directory moves

    published = settings.graph_dir / f"dt={day}"
    meta = {
        "path": dg.MetadataValue.path(str(published)),
        "num_nodes": manifest["num_nodes"],
        **{f"num_nodes_{t}": c for t, c in manifest["num_nodes_by_type"].items()},
        "num_entries": manifest["num_entries"],
        **{f"entries_{name}": s["num_entries"] for name, s in manifest["subsets"].items()},
        "build_seconds": manifest["build_seconds"],
        "sampling_seconds": round(sampling_seconds, 3),
        "nodes_per_second": cache["nodes_per_second"] or 0.0,
        "neighborhood_fill_rate": round(cache["fill_rate"], 4),
        "restart_prob": config.restart_prob,
        "budget": config.budget,
        "layout": dg.MetadataValue.json(cache["layout"]),
    }
    context.log.info(
        f"graph_snapshot dt={day}: {manifest['num_nodes']} nodes, {manifest['num_entries']} entries, "
        f"sampled every node in {sampling_seconds:.1f}s"
    )
    return DayResult(meta, gate.results)
