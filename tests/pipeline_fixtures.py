"""A tiny end-to-end data set built with the LIBRARIES only (no Dagster), for tests that need real artifacts.

    art = build_library_pipeline(tmp_path, scale="tiny", days=3, seed=0)
    art.builder.build("pin", art.universe["pin"][:8])       # EntityBatch from the day's graph + feature store
    art.data.eval_pairs                                      # held-out sets (a TrainingData)

Chain (the same libraries the assets wrap, in the same order, for the last day D of the generated range):

    omnisage_pipeline.tools.synthetic.generate            -> data_root/ (contract input + _truth/)
    omnisage_pipeline.contract.validation.validate_*           -> warehouse/engagement_logs/dt=*/, entity_metadata/dt=D/
    graph_engine.duckdb_engine.extract_daily_edges  -> warehouse/daily_edges/dt=*/
    graph_engine.duckdb_engine.prune_window         -> warehouse/pruned_edges/dt=D/ (held-out pairs dropped:
                                                       holdout=ml.training_examples.holdout_of(config))
    graph_engine.snapshot.build_snapshot            -> graph/dt=D/ (+ neighborhoods/ cache)
    graph_engine.feature_store.build_feature_store  -> features/dt=D/
    ml.training_examples.build_training_examples    -> warehouse/training_examples/dt=D/

Everything is written under ``tmp_dir``; nothing reads environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from graph_engine.batch import NODE_TYPE_CODE, NeighborBlock, NeighborhoodLayout
from graph_engine.batch_builder import BatchBuilder
from graph_engine.duckdb_engine import DuckDBEdgeEngine
from graph_engine.feature_store import build_feature_store
from graph_engine.featurizer import Featurizer
from graph_engine.neighbor_sampler import NeighborhoodCache, NeighborSampler, build_neighborhood_cache
from graph_engine.pruning import PruningParams
from graph_engine.snapshot import DEFAULT_SUBSETS, GraphSnapshot, build_snapshot
from ml.training_examples import ExampleConfig, build_training_examples, holdout_of
from ml.training_examples_reader import TrainingData, load_training_examples
from ml.truth import Truth, load_truth
from omnisage_pipeline.contract.validation import (
    validate_boards,
    validate_engagement_logs,
    validate_pins,
    write_table,
)
from omnisage_pipeline.tools.synthetic import generate

START_DATE = "2024-01-01"


def fixture_layout() -> NeighborhoodLayout:
    """The paper's three blocks (4.1) at CPU-test sizes."""
    return NeighborhoodLayout(
        (
            NeighborBlock("pin_board", "pin", 8),
            NeighborBlock("pin_board", "board", 8),
            NeighborBlock("pin_pin", "pin", 8),
        )
    )


@dataclass
class PipelineArtifacts:
    root: Path
    data_root: Path  # generator output (contract input); ``truth`` read from its _truth/
    days: list[str]
    day: str  # the partition everything below belongs to (the last generated day)
    log_dirs: list[Path]  # validated engagement logs, one dir per day
    metadata_dir: Path  # validated entity metadata of ``day`` ({pins,boards}/)
    daily_edge_dirs: list[Path]
    pruned_dir: Path
    graph_dir: Path
    cache_dir: Path
    features_dir: Path
    examples_dir: Path
    layout: NeighborhoodLayout
    example_config: ExampleConfig
    snapshot: GraphSnapshot
    neighborhoods: NeighborhoodCache
    featurizer: Featurizer
    builder: BatchBuilder
    data: TrainingData
    universe: dict[str, np.ndarray]  # entity ids per type: graph nodes + metadata (sorted, unique)
    truth: Truth
    stats: dict = field(default_factory=dict)

    @property
    def image_dim(self) -> int:
        return self.featurizer.image_dim


def entity_universe(snapshot: GraphSnapshot, metadata_dir: Path) -> dict[str, np.ndarray]:
    """Every pin and board of the day: the graph's nodes plus the metadata's rows (sorted unique ids)."""
    node_type = np.asarray(snapshot.node_type)
    node_id = np.asarray(snapshot.node_id)
    out = {}
    for name, column in (("pin", "pin_id"), ("board", "board_id")):
        meta = pq.read_table(Path(metadata_dir) / f"{name}s", columns=[column])[column].to_numpy()
        out[name] = np.unique(np.concatenate([node_id[node_type == NODE_TYPE_CODE[name]], meta.astype(np.int64)]))
    return out


def build_library_pipeline(
    tmp_dir: Path | str,
    scale: str = "tiny",
    days: int = 3,
    seed: int = 0,
    *,
    layout: NeighborhoodLayout | None = None,
    example_config: ExampleConfig | None = None,
    pruning: PruningParams | None = None,
    budget: int = 2_000,
    images: bool = True,
    drop_held_out: bool = True,
) -> PipelineArtifacts:
    """Generate ``days`` days at ``scale`` and run the library chain for the last day (module docstring).

    ``drop_held_out``: drop the held-out pairs from the window graph (the contract's evaluation protocol);
    False only for tests that need to show what the filter prevents.
    """
    import time

    t0 = time.perf_counter()
    root = Path(tmp_dir)
    layout = layout or fixture_layout()
    config = example_config or ExampleConfig()
    data_root = root / "input"
    generate(data_root, START_DATE, days, scale=scale, seed=seed, images=images)
    first = date.fromisoformat(START_DATE)
    day_keys = [(first + timedelta(days=i)).isoformat() for i in range(days)]
    day = day_keys[-1]
    wh = root / "warehouse"
    stats: dict = {"generate_s": time.perf_counter() - t0}

    # Ingest (contract validation) - one validated table per day, metadata for the partition day.
    log_dirs = []
    for key in day_keys:
        files = sorted((data_root / "engagement_logs" / f"dt={key}").glob("*.parquet"))
        result = validate_engagement_logs(files, key, data_root)
        out = wh / "engagement_logs" / f"dt={key}"
        write_table(result.valid, out)
        log_dirs.append(out)
    metadata_dir = wh / "entity_metadata" / f"dt={day}"
    write_table(validate_pins(sorted((data_root / "pins").glob("*.parquet")), data_root).valid, metadata_dir / "pins")
    write_table(
        validate_boards(sorted((data_root / "boards").glob("*.parquet")), data_root).valid,
        metadata_dir / "boards",
    )

    # Edges: daily extraction, then window + held-out filter + pruning (appendix A.1).
    engine = DuckDBEdgeEngine(scratch_dir=root / "scratch", threads=2)
    daily_dirs = []
    for key, logs in zip(day_keys, log_dirs):
        out = wh / "daily_edges" / f"dt={key}"
        out.mkdir(parents=True, exist_ok=True)
        engine.extract_daily_edges(logs, out, held_out_users=holdout_of(config) if drop_held_out else None)
        daily_dirs.append(out)
    pruned_dir = wh / "pruned_edges" / f"dt={day}"
    pruned_dir.mkdir(parents=True, exist_ok=True)
    engine.prune_window(
        daily_dirs,
        pruned_dir,
        pruning or PruningParams(),
        holdout=holdout_of(config) if drop_held_out else None,
    )
    stats["edges_s"] = time.perf_counter() - t0

    # Snapshot + neighbourhood cache (graph_snapshot asset), feature store (feature_store asset).
    graph_dir = root / "graph" / f"dt={day}"
    build_snapshot(pruned_dir, graph_dir, DEFAULT_SUBSETS, source_partition=day)
    snapshot = GraphSnapshot.open(graph_dir)
    cache_dir = graph_dir / "neighborhoods"
    build_neighborhood_cache(snapshot, NeighborSampler(snapshot, layout, budget=budget), cache_dir)
    neighborhoods = NeighborhoodCache.open(cache_dir, snapshot)
    features_dir = root / "features" / f"dt={day}"
    build_feature_store(metadata_dir, snapshot, features_dir, source_partition=day)
    featurizer = Featurizer(features_dir)
    builder = BatchBuilder(snapshot, neighborhoods, featurizer, layout)
    stats["graph_features_s"] = time.perf_counter() - t0

    # Training examples (training_examples asset).
    examples_dir = wh / "training_examples" / f"dt={day}"
    examples_dir.mkdir(parents=True, exist_ok=True)
    log_files = [p for d in log_dirs for p in sorted(d.glob("*.parquet"))]
    build_training_examples(log_files, metadata_dir / "pins", snapshot, neighborhoods, examples_dir, day, config)
    data = load_training_examples(examples_dir)
    stats["total_s"] = time.perf_counter() - t0
    return PipelineArtifacts(
        root=root,
        data_root=data_root,
        days=day_keys,
        day=day,
        log_dirs=log_dirs,
        metadata_dir=metadata_dir,
        daily_edge_dirs=daily_dirs,
        pruned_dir=pruned_dir,
        graph_dir=graph_dir,
        cache_dir=cache_dir,
        features_dir=features_dir,
        examples_dir=examples_dir,
        layout=layout,
        example_config=config,
        snapshot=snapshot,
        neighborhoods=neighborhoods,
        featurizer=featurizer,
        builder=builder,
        data=data,
        universe=entity_universe(snapshot, metadata_dir),
        truth=load_truth(data_root),
        stats=stats,
    )


#: omnisage_model config of the training, resume and kill tests. Small but real training: 20 steps are enough
#: for the trained model to beat an untrained one (mean recall@10 0.096 vs 0.085 in
#: tests/test_training_assets.py, a thin margin: pair_sampling="count" lost it); a step costs ~0.2 s on an
#: idle 2-core box.
TINY_TRAIN = {
    "preset": "small",
    "steps": 20,
    "warmup_steps": 3,
    "batch_size": 16,
    "num_random_negatives": 16,
    # the settings this margin was measured with (the asset's defaults before they were tuned)
    "pair_sampling": "uniform",
    "id_buckets": 0,
    "lambda_f": 1.0,
    "lambda_s": 1.0,
    "lr": 0.003,
    "pool_size": 400,
    "log_every": 5,
    "checkpoint_every": 5,
    "device": "cpu",
}
