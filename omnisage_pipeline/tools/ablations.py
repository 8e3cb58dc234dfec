"""The ablation runner: the paper's offline ablations (4.2.3-4.2.5, appendix A.2) re-run on our data.

    omnisage ablate --studies graph_sources,pruning_alpha --scale tiny --steps 80

A **study** is one of the paper's ablation tables; its **variants** are the table's rows. Every variant is
trained with ``assets.training.train_and_register(register=False)`` into ONE MLflow experiment (default
``omnisage-ablations``) of the production tracking store (``MLFLOW_TRACKING_URI``), as a child of one parent
run that carries the resulting tables (``ablations.md``, ``ablations.json``) as artifacts. The registry is
never touched: no registered version, no alias.

Where things go (never the production ``warehouse/``, ``graph/``, ``features/``, ``embeddings/``,
``reports/``)::

    <root>/                          default $OMNISAGE_HOME/ablations/<UTC timestamp>/
      input/                         synthetic input (omnisage_pipeline.tools.synthetic.generate), unless --data-root
      _base/                         scratch OMNISAGE_HOME of the default data: every daily data asset
      <study>/<variant>/             scratch OMNISAGE_HOME of one trained variant:
                                       data variants: their own pruned_edges / graph / features /
                                       training_examples (engagement_logs, entity_metadata, daily_edges are
                                       read from _base through symlinks: they do not depend on the variant)
                                       model-only variants: warehouse/graph/features symlinked to _base
                                       (read-only), their own checkpoints/ and scratch/
      ablations.md, ablations.json   the tables (also printed and logged to the parent run)

Data variants change run config of the daily data assets (``assets.graph.PruningConfig.alpha``;
``assets.snapshot.GraphSnapshotConfig`` ``budget`` / ``subsets`` / ``blocks``) and are materialized in
process with ``dagster.materialize`` (ephemeral instance) and ``definitions.build_resources`` of the
variant's scratch settings. Model-only variants (tasks, aggregator, random negatives) change
``OmniSageModelConfig`` only and train on the default data.

``--blocks`` replaces the neighbourhood layout of the run's default data (every variant builds on it; the
asset default 25/75/50 is sized for billions of nodes and learns slowly on a tiny graph).

Variants with the same data and the same model config (every study's reference row: the default
configuration) are trained ONCE; the run is tagged ``ablation.member.<study> = <variant>`` for every row it
stands for, and the table says so.

Held-out sets: the hash-based holdout (graph_engine.holdout) picks the same engagement pairs and users
whatever the graph, so every variant of a study is evaluated on the same engagement pairs, users and
negative pool. Graph-neighbourhood pairs (part of "EE") are drawn from the variant's own graph, so for the
graph studies the comparable entity-entity number is "EE eng." (engagement pairs only) - the paper does the
same (4.2.3: graph-dependent evaluations are excluded from the graph-construction ablations). The table
shows n of every number and flags a study whose compared n differ.

Layering: this module sits above the assets and the definitions (``omnisage_pipeline.tools``; nothing below
imports it). It reads the asset configs' defaults (the reference rows), trains through the asset's
``train_and_register`` and materializes the data through ``omnisage_pipeline.definitions``; Dagster itself
is used only for that materialization.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from assets.graph import PruningConfig
from assets.snapshot import GraphSnapshotConfig
from assets.training import OmniSageModelConfig, train_and_register
from graph_engine.batch import NeighborhoodLayout, parse_blocks
from ml.config import TASK_NAMES
from omnisage_pipeline.resources import MlflowResource
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import require_published

EXPERIMENT = "omnisage-ablations"
TASK_SHORT = {"entity_entity": "EE", "entity_feature": "EF", "user_entity": "UE"}
#: The compared entity-entity metric: every held-out pair, or the engagement pairs only (graph studies).
EE_ALL, EE_ENGAGEMENT = "entity_entity", "entity_entity_engagement"

#: Daily data assets: built for every day of the window (the graph and the sequences read the window) ...
RANGE_ASSETS = ("engagement_logs", "daily_edges")
#: ... and for the training day only.
DAY_ASSETS = ("entity_metadata", "pruned_edges", "graph_snapshot", "feature_store", "training_examples")
#: A data variant re-runs these (from the first one its config touches) and reads the rest from _base.
VARIANT_ASSETS = ("pruned_edges", "graph_snapshot", "feature_store", "training_examples")
UPSTREAM_DATASETS = ("engagement_logs", "daily_edges", "entity_metadata")
#: Production outputs an ablation must never write (contract "Outputs").
PRODUCTION_OUTPUTS = ("warehouse", "graph", "features", "embeddings", "user_embeddings", "reports")

#: Paper differences smaller than this (relative) are what the paper itself calls insignificant (Table 4:
#: "no significant gain", Table 13: -0.1% "insignificant").
PAPER_TOLERANCE = 0.01
#: Our difference counts only beyond this many standard errors (binomial, unpaired: conservative).
NOISE_SE = 2.0


class AblationError(RuntimeError):
    """The ablation cannot run as asked (bad selection, a root inside the production outputs, ...)."""


# ==========================================================================================================
# Studies
# ==========================================================================================================
@dataclass(frozen=True)
class PaperRow:
    """What the paper reports for one row: absolute recall@10 per task, or the lift over the reference row."""

    values: dict[str, float]
    kind: str = "abs"  # "abs" | "lift"
    text: str = ""

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.kind == "lift":
            return ", ".join(f"{TASK_SHORT[t]} {v:+.1%}" for t, v in self.values.items()) or "reference"
        return ", ".join(f"{TASK_SHORT[t]} {v:.3f}" for t, v in self.values.items())


@dataclass(frozen=True)
class Variant:
    id: str  # folder-safe
    label: str
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # asset -> run config overrides
    model: dict[str, Any] = field(default_factory=dict)  # OmniSageModelConfig overrides
    paper: PaperRow | None = None
    note: str = ""


@dataclass(frozen=True)
class Study:
    id: str
    title: str
    statement: str  # what the paper reports, in words
    reference: str  # variant id the directions are measured from
    compare: tuple[str, ...]  # metrics compared with the paper (EE_ALL / EE_ENGAGEMENT / task names)
    variants: tuple[Variant, ...]
    kind: str  # "data" | "model"
    note: str = ""

    def variant(self, vid: str) -> Variant:
        for v in self.variants:
            if v.id == vid:
                return v
        raise AblationError(f"study {self.id!r} has no variant {vid!r} (has {[v.id for v in self.variants]})")


def empty_layout_supported() -> bool:
    """Whether the model embeds (and the entity-feature task encodes) nodes with a ZERO-width neighbourhood
    layout (no blocks). Probed on a 2-node batch: if it works, "no graph" is the layout with no blocks."""
    import numpy as np
    import torch

    from graph_engine.batch import EntityBatch, FeatureArrays, NeighborhoodLayout
    from ml.config import small
    from ml.data import as_entity_tensors
    from ml.model import OmniSageModel

    cfg, _ = small(image_dim=0)
    model = OmniSageModel(cfg).eval()
    batch = EntityBatch(
        "pin", np.arange(2, dtype=np.int64), FeatureArrays.empty((2,), 4, 0), np.zeros((2, 0), np.int64),
        FeatureArrays.empty((2, 0), 4, 0), np.zeros((2, 0), np.float32), np.zeros((2, 0), bool),
        NeighborhoodLayout(()),
    )  # fmt: skip
    try:
        with torch.no_grad():
            model.embed(batch)
            model.tasks["entity_feature"].queries(as_entity_tensors(batch, "cpu", "probe"))
    except Exception:  # noqa: BLE001 (any failure means: not supported; today a RuntimeError from a reshape)
        return False
    return True


#: "No graph" when the model cannot take a zero-width layout: one block of one column over a relation
#: subset that holds no edge, so every node's neighbourhood is a single padding column (mask False). The
#: embedder never sees a padding column (key-padding mask; zeroed tokens on the mean path) and the
#: entity-feature queries average no neighbour, so the model gets exactly no neighbour information.
NO_EDGES_SUBSET = "no_edges"


#: The compared metrics of the graph studies: engagement pairs only (the same for every graph) and users.
GRAPH_COMPARE = (EE_ENGAGEMENT, "user_entity")


@dataclass(frozen=True)
class _Defaults:
    """What the studies' rows are built from: the asset defaults and the run's layout."""

    budget: int
    alpha: float
    layout: NeighborhoodLayout
    no_graph: dict[str, dict[str, Any]]  # data overrides of the "no graph" row
    no_graph_note: str

    @property
    def pb_blocks(self) -> list[str]:
        return [f"{b.subset}:{b.node_type}:{b.k}" for b in self.layout.blocks if b.subset == "pin_board"]

    @property
    def halved(self) -> list[str]:
        return [f"{b.subset}:{b.node_type}:{b.k}" for b in self.layout.halved().blocks]

    @property
    def default_blocks(self) -> str:
        return "+".join(f"{b.node_type}{b.k}@{b.subset}" for b in self.layout.blocks)


def _no_graph_variant(empty_layout_ok: bool) -> tuple[dict[str, dict[str, Any]], str]:
    """The "no graph" row's data overrides and note: a layout without blocks where the model takes one."""
    if empty_layout_ok:
        # min_coverage 0: empty neighbourhoods are this variant's point, not a broken graph.
        return {"graph_snapshot": {"blocks": [], "min_coverage": 0.0}}, "layout without neighbour blocks"
    no_graph = {"graph_snapshot": {"subsets": {NO_EDGES_SUBSET: [NO_EDGES_SUBSET]},
                                   "blocks": [f"{NO_EDGES_SUBSET}:pin:1"], "min_coverage": 0.0}}  # fmt: skip
    return no_graph, (
        "every neighbourhood empty: one all-padding column (mask False), because a zero-width layout "
        "crashes the model (reshape(..., -1) of 0 elements in ml/encoders.py and ml/tasks/entity_feature.py)"
    )


def build_studies(empty_layout_ok: bool | None = None, blocks: list[str] | None = None) -> dict[str, Study]:
    """Every study, from the assets' own defaults (so the reference rows ARE the production configuration),
    except the neighbourhood layout when ``blocks`` ('subset:node_type:k' per block) replaces it for the run."""
    snap = GraphSnapshotConfig()
    if empty_layout_ok is None:
        empty_layout_ok = empty_layout_supported()
    no_graph, no_graph_note = _no_graph_variant(empty_layout_ok)
    d = _Defaults(
        budget=int(snap.budget),
        alpha=float(PruningConfig().alpha),
        layout=parse_blocks(list(blocks) if blocks else list(snap.blocks)),
        no_graph=no_graph,
        no_graph_note=no_graph_note,
    )
    studies = [
        _graph_sources_study(d),
        _tasks_study(),
        _pruning_alpha_study(d),
        _push_budget_study(d),
        _halved_kt_study(d),
        _aggregator_study(),
        _negatives_study(),
    ]
    return {s.id: s for s in studies}


def _graph_sources_study(d: _Defaults) -> Study:
    """Paper Table 3: no graph, Pin-Board only, Pin-Board + Pin-Pin (data variants)."""
    return Study(
        "graph_sources",
        "Graph sources (paper Table 3)",
        "Pin-Pin edges add a significant boost over Pin-Board alone, and any graph beats no graph, on both "
        "EE and UE (no graph 0.440/0.375 < Pin-Board 0.529/0.564 < Pin-{Board,Pin} 0.609/0.580).",
        "pin_board+pin_pin",
        GRAPH_COMPARE,
        (
            Variant(
                "no_graph",
                "no graph",
                d.no_graph,
                paper=PaperRow({"entity_entity": 0.440, "user_entity": 0.375}),
                note=d.no_graph_note,
            ),
            Variant(
                "pin_board",
                "pin_board",
                {"graph_snapshot": {"subsets": {"pin_board": ["pin_board"]}, "blocks": d.pb_blocks}},
                paper=PaperRow({"entity_entity": 0.529, "user_entity": 0.564}),
                note="neighbourhoods from {pin_board} only",
            ),
            Variant(
                "pin_board+pin_pin",
                "pin_board + pin_pin (default)",
                paper=PaperRow({"entity_entity": 0.609, "user_entity": 0.580}),
            ),
        ),
        "data",
        note="Node degrees (a node feature) still count every edge type in every variant: only the "
        "neighbourhoods change.",
    )


def _tasks_study() -> Study:
    """Paper Table 5: the task combinations (model variants)."""
    return Study(
        "tasks",
        "Task combinations (paper Table 5)",
        "Each single task scores higher alone than in the full model except UE, which gains from the other "
        "tasks; EE and EF help each other (EE+EF beats EE alone and EF alone).",
        "all",
        ("entity_entity", "entity_feature", "user_entity"),
        (
            Variant("EE", "EE", model={"tasks": ["entity_entity"]}, paper=PaperRow({"entity_entity": 0.623})),
            Variant(
                "EF", "EF", model={"tasks": ["entity_feature"]}, paper=PaperRow({"entity_feature": 0.373})
            ),
            Variant("UE", "UE", model={"tasks": ["user_entity"]}, paper=PaperRow({"user_entity": 0.564})),
            Variant(
                "EE+EF",
                "EE + EF",
                model={"tasks": ["entity_entity", "entity_feature"]},
                paper=PaperRow({"entity_entity": 0.628, "entity_feature": 0.379}),
            ),
            Variant(
                "all",
                "EE + EF + UE (default)",
                paper=PaperRow({"entity_entity": 0.609, "entity_feature": 0.338, "user_entity": 0.580}),
            ),
        ),
        "model",
    )


def _pruning_alpha_study(d: _Defaults) -> Study:
    """Paper Table 10: the pruning alpha (data variants)."""
    return Study(
        "pruning_alpha",
        "Pruning alpha (paper Table 10)",
        "A larger graph (higher alpha) improves pair-level retrieval (EE 0.584 -> 0.592 -> 0.609) with a "
        "slight decrease in sequence-level retrieval (UE 0.584 -> 0.582 -> 0.576).",
        f"{d.alpha:g}",
        GRAPH_COMPARE,
        (
            Variant(
                "0.5",
                "alpha 0.5",
                {"pruned_edges": {"alpha": 0.5}},
                paper=PaperRow({"entity_entity": 0.584, "user_entity": 0.584}),
            ),
            Variant(
                "0.7",
                "alpha 0.7",
                {"pruned_edges": {"alpha": 0.7}},
                paper=PaperRow({"entity_entity": 0.592, "user_entity": 0.582}),
            ),
            Variant(
                f"{d.alpha:g}",
                f"alpha {d.alpha:g} (default)",
                paper=PaperRow({"entity_entity": 0.609, "user_entity": 0.576}),
            ),
        ),
        "data",
    )


def _push_budget_study(d: _Defaults) -> Study:
    """Paper Table 4: the forward-push budget B/2, B, 2B (data variants)."""
    return Study(
        "push_budget",
        "Forward-push budget B = 1/delta (paper Table 4)",
        "No significant gain from a budget beyond B: the method is robust to the random-walk budget "
        "(EE 0.609 / 0.609 / 0.612, UE 0.576 / 0.580 / 0.576 for B/2, B, 2B).",
        "B",
        GRAPH_COMPARE,
        (
            Variant(
                "B_half",
                f"B/2 = {d.budget // 2}",
                {"graph_snapshot": {"budget": d.budget // 2}},
                paper=PaperRow({"entity_entity": 0.609, "user_entity": 0.576}),
            ),
            Variant(
                "B",
                f"B = {d.budget} (default)",
                paper=PaperRow({"entity_entity": 0.609, "user_entity": 0.580}),
            ),
            Variant(
                "B_double",
                f"2B = {2 * d.budget}",
                {"graph_snapshot": {"budget": 2 * d.budget}},
                paper=PaperRow({"entity_entity": 0.612, "user_entity": 0.576}),
            ),
        ),
        "data",
    )


def _halved_kt_study(d: _Defaults) -> Study:
    """Paper Table 13: every block's k_t halved (a data variant)."""
    return Study(
        "halved_kt",
        "Halved k_t (paper Table 13)",
        "Halving every block's k_t is neutral for EE (-0.1%) and costs UE (-1.4%).",
        "default",
        GRAPH_COMPARE,
        (
            Variant("default", f"default k_t ({d.default_blocks})", paper=PaperRow({}, "lift", "reference")),
            Variant(
                "halved",
                "every k_t halved ("
                + "+".join(f"{b.node_type}{b.k}@{b.subset}" for b in d.layout.halved().blocks)
                + ")",
                {"graph_snapshot": {"blocks": d.halved}},
                paper=PaperRow({"entity_entity": -0.001, "user_entity": -0.014}, "lift"),
            ),
        ),
        "data",
    )


def _aggregator_study() -> Study:
    """Paper A.2.4: transformer vs mean aggregation (a model variant)."""
    return Study(
        "aggregator",
        "Neighbour aggregator (paper A.2.4)",
        "The transformer aggregator beats simpler aggregation on EE: GAT is -6.0% (1-hop) and -8.5% (2-hop) "
        "below it (Table 11). Mean pooling itself is not in the paper; its PinSage baseline (Table 2) is "
        "0.461 vs 0.609.",
        "transformer",
        (EE_ALL,),
        (
            Variant("transformer", "transformer (default)", paper=PaperRow({}, "lift", "reference")),
            Variant(
                "mean",
                "mean pooling",
                model={"aggregator": "mean"},
                paper=PaperRow({"entity_entity": -0.06}, "lift", "GAT 1-hop EE -6.0% (no mean-pooling row)"),
            ),
        ),
        "model",
    )


def _negatives_study() -> Study:
    """Paper Table 12: 0, 1K, 10K random negatives (model variants)."""
    return Study(
        "negatives",
        "Random negatives (paper Table 12)",
        "Random negatives are crucial for UE and more help, with a plateau: +31.2% (1K) and +43.5% (10K) over "
        "none.",
        "0",
        ("user_entity",),
        (
            Variant("0", "0", model={"num_random_negatives": 0}, paper=PaperRow({}, "lift", "reference")),
            Variant(
                "1K",
                "1K",
                model={"num_random_negatives": 1_000},
                paper=PaperRow({"user_entity": 0.312}, "lift"),
            ),
            Variant(
                "10K",
                "10K",
                model={"num_random_negatives": 10_000},
                paper=PaperRow({"user_entity": 0.435}, "lift"),
            ),
        ),
        "model",
    )


def _default_blocks() -> list[str]:
    return list(GraphSnapshotConfig().blocks)


STUDY_IDS = ("graph_sources", "tasks", "pruning_alpha", "push_budget", "halved_kt", "aggregator", "negatives")


# ==========================================================================================================
# Settings and homes
# ==========================================================================================================
def scratch_settings(
    production: Settings, home: Path, data_root: Path, engine: str | None = None
) -> Settings:
    """Settings of a scratch OMNISAGE_HOME: same engine (unless given), Spark master, start date, window and
    MLflow tracking URI as production; everything written goes under ``home``."""
    return dataclasses.replace(
        production, home=Path(home), data_root=Path(data_root), data_root_is_default=False,
        engine=engine or production.engine,
    )  # fmt: skip


def check_root(production: Settings, root: Path) -> Path:
    root = Path(root).absolute()
    home = production.home.absolute()
    if root == home:
        raise AblationError(f"ablation root {root} is OMNISAGE_HOME itself: pick a folder of its own")
    for name in PRODUCTION_OUTPUTS + ("mlflow-artifacts", "dagster", "checkpoints"):
        out = home / name
        if root == out or out in root.parents:
            raise AblationError(f"ablation root {root} is inside the production output {out}")
    if root.exists() and any(root.iterdir()):
        raise AblationError(f"ablation root {root} exists and is not empty")
    return root


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target.absolute(), link, target_is_directory=True)


def link_base_data(base: Settings, home: Path, datasets: tuple[str, ...] | None = None) -> None:
    """Make ``home`` read the base data: the given warehouse datasets (data variants), or the whole
    warehouse, graph and features (model-only variants)."""
    if datasets is None:
        _link(base.warehouse, home / "warehouse")
        _link(base.graph_dir, home / "graph")
        _link(base.features_dir, home / "features")
    else:
        for name in datasets:
            _link(base.warehouse_dataset(name), home / "warehouse" / name)


# ==========================================================================================================
# Materialization (the one place that uses Dagster)
# ==========================================================================================================
def materialize(
    settings: Settings,
    selection: tuple[str, ...],
    *,
    day: str | None = None,
    days: list[str] | None = None,
    run_config: dict | None = None,
) -> None:
    """Materialize ``selection`` in process (ephemeral instance) for the scratch ``settings``: one
    partition ``day`` or a single run over ``days`` (the assets' single-run backfill policy)."""
    import dagster as dg

    # Loaded on first use: the definitions read the environment and set the process scratch when imported.
    from omnisage_pipeline.definitions import build_resources, defs

    tags = {}
    if days:
        tags = {"dagster/asset_partition_range_start": days[0], "dagster/asset_partition_range_end": days[-1]}
    config = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    if run_config:
        config["ops"] = {asset: {"config": cfg} for asset, cfg in run_config.items()}
    result = dg.materialize(
        list(defs.assets), selection=list(selection), partition_key=day, tags=tags,
        resources=build_resources(settings), run_config=config, raise_on_error=True,
    )  # fmt: skip
    if not result.success:  # pragma: no cover - raise_on_error raises first
        raise AblationError(f"materializing {selection} for {settings.home} failed")


def build_base_data(base: Settings, days: list[str], overrides: dict[str, dict] | None = None) -> None:
    """The default data of an ablation (every daily data asset of the training day, the window's logs and
    edges) in the scratch home of ``base``; ``overrides``: run config of the day's assets."""
    materialize(base, RANGE_ASSETS, days=days)
    materialize(base, DAY_ASSETS, day=days[-1], run_config=overrides or None)


def merge_overrides(base: dict[str, dict], variant: dict[str, dict]) -> dict[str, dict]:
    """The run's base overrides with the variant's on top (per asset, per config field)."""
    out = {asset: dict(cfg) for asset, cfg in base.items()}
    for asset, cfg in variant.items():
        out.setdefault(asset, {}).update(cfg)
    return out


def graph_entries(settings: Settings, day: str) -> int:
    """Rows of the day's published pruned_edges (one per kept directed adjacency entry)."""
    import pyarrow.dataset as pads

    path = require_published(settings.warehouse_dataset("pruned_edges"), day)
    return int(pads.dataset(path, format="parquet", exclude_invalid_files=True).count_rows())


def universe_sizes(settings: Settings, day: str) -> dict[str, int]:
    """Entities per type in the day's universe (training_examples' universe.parquet)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(require_published(settings.warehouse_dataset("training_examples"), day) / "universe.parquet",
                          columns=["entity_type"])  # fmt: skip
    counts = pc.value_counts(table["entity_type"]).to_pylist()
    return {str(c["values"]): int(c["counts"]) for c in counts}


def build_variant_data(base: Settings, variant: Settings, day: str, overrides: dict[str, dict]) -> None:
    """Re-run the data assets a variant's config touches (and everything after them) in its own home."""
    unknown = [a for a in overrides if a not in VARIANT_ASSETS]
    if unknown:
        raise AblationError(f"data overrides for {unknown}: only {VARIANT_ASSETS} can vary")
    first = min(VARIANT_ASSETS.index(a) for a in overrides)
    rerun = VARIANT_ASSETS[first:]
    before = VARIANT_ASSETS[:first]
    warehouse_before = tuple(a for a in before if a in ("pruned_edges", "training_examples"))
    link_base_data(base, variant.home, UPSTREAM_DATASETS + warehouse_before)
    if "graph_snapshot" in before:
        _link(base.graph_dir, variant.graph_dir)
    if "feature_store" in before:
        _link(base.features_dir, variant.features_dir)
    materialize(variant, rerun, day=day, run_config=overrides)


# ==========================================================================================================
# Results, directions, tables
# ==========================================================================================================
@dataclass
class Row:
    study: str
    variant: str
    label: str
    run_key: str
    run_id: str = ""
    home: str = ""
    shared_with: str = ""  # "<study>/<variant>" whose run this row reuses
    recall: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> {"recall", "n"}
    train_seconds: float = 0.0
    data_seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    paper: str = ""
    directions: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""  # why the variant failed (its numbers are then missing)
    graph_entries: int = 0  # kept adjacency entries of the training day's pruned graph (Table 10's |E|)


def metric_label(metric: str) -> str:
    return "EE eng." if metric == EE_ENGAGEMENT else TASK_SHORT[metric]


def recall_by_metric(outcome) -> dict[str, dict[str, Any]]:
    """{metric: {"recall", "n"}} from a TrainingOutcome: the three tasks and the engagement-pair EE."""
    out = {t: dict(outcome.new_recall.get(t, {"recall": None, "n": 0})) for t in TASK_NAMES}
    ee = (outcome.evaluation or {}).get("new", {}).get("entity_entity", {})
    eng = ee.get("engagement") or {}
    out[EE_ENGAGEMENT] = {"recall": eng.get("recall"), "n": int(eng.get("n", 0) or 0)}
    return out


def _sign(d: float, tol: float) -> int:
    return 0 if abs(d) <= tol else (1 if d > 0 else -1)


def ours_sign(value: dict, ref: dict) -> int | None:
    """+1 / -1 when the difference exceeds NOISE_SE binomial standard errors, else 0; None if missing."""
    if value.get("recall") is None or ref.get("recall") is None or not value.get("n") or not ref.get("n"):
        return None
    p1, n1, p2, n2 = float(value["recall"]), int(value["n"]), float(ref["recall"]), int(ref["n"])
    # Laplace-smoothed proportions so 0/n and n/n still get a standard error
    q1, q2 = (p1 * n1 + 1) / (n1 + 2), (p2 * n2 + 1) / (n2 + 2)
    se = math.sqrt(q1 * (1 - q1) / n1 + q2 * (1 - q2) / n2)
    return _sign(p1 - p2, NOISE_SE * se)


def paper_sign(row: PaperRow | None, ref: PaperRow | None, task: str) -> int | None:
    if row is None:
        return None
    if row.kind == "lift":
        if task not in row.values:
            return None
        return _sign(row.values[task], PAPER_TOLERANCE)
    if ref is None or task not in row.values or task not in ref.values:
        return None
    return _sign((row.values[task] - ref.values[task]) / ref.values[task], PAPER_TOLERANCE)


SYMBOL = {1: "+", -1: "−", 0: "≈", None: "?"}


def directions(study: Study, rows: list[Row]) -> None:
    """Fill every row's ``directions``: per compared metric, the paper's and our sign vs the reference."""
    ref_row = next(r for r in rows if r.variant == study.reference)
    ref_paper = study.variant(study.reference).paper
    for row in rows:
        if row.variant == study.reference:
            continue
        paper = study.variant(row.variant).paper
        for metric in study.compare:
            task = "entity_entity" if metric == EE_ENGAGEMENT else metric
            p = paper_sign(paper, ref_paper, task)
            o = ours_sign(row.recall.get(metric, {}), ref_row.recall.get(metric, {}))
            if p is None or o is None:
                continue
            agree = "same" if p == o else ("opposite" if p * o == -1 else "unresolved")
            row.directions[metric] = {"paper": p, "ours": o, "agree": agree}


def n_consistency(study: Study, rows: list[Row]) -> dict[str, Any]:
    """Per compared metric: the set of n over the variants that report it (must be one value)."""
    out = {}
    for metric in study.compare:
        ns = sorted({int(r.recall.get(metric, {}).get("n", 0)) for r in rows
                     if r.recall.get(metric, {}).get("recall") is not None})  # fmt: skip
        out[metric] = {"n": ns, "consistent": len(ns) <= 1}
    return out


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


COLUMNS = (EE_ALL, EE_ENGAGEMENT, "entity_feature", "user_entity")


def study_markdown(study: Study, rows: list[Row], consistency: dict[str, Any]) -> str:
    lines = [f"## {study.title}", "", f"**Paper:** {study.statement}", ""]
    compared = ", ".join(metric_label(m) for m in study.compare)
    lines.append(f"Compared with the paper: {compared}, each variant against the reference row "
                 f"`{study.reference}`.")  # fmt: skip
    lines += [
        "",
        (
            "| variant | recall@10 EE | EE eng. | EF | UE | n (EE / eng. / EF / UE) | data s | train s "
            "| paper | direction vs reference: paper / ours |"
        ),
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        vals = [_fmt(r.recall.get(m, {}).get("recall")) for m in COLUMNS]
        ns = " / ".join(str(r.recall.get(m, {}).get("n", 0)) for m in COLUMNS)
        if r.variant == study.reference:
            dirs = "reference"
        elif not r.directions:
            dirs = "–"
        else:
            mark = {"same": "✓", "opposite": "✗", "unresolved": "~"}
            dirs = "; ".join(
                f"{metric_label(m)} {SYMBOL[d['paper']]} / {SYMBOL[d['ours']]} {mark[d['agree']]}"
                for m, d in r.directions.items()
            )
        label = r.label + (f" (same run as {r.shared_with})" if r.shared_with else "")
        data_s = f"{r.data_seconds:.1f}" if r.data_seconds else "–"
        lines.append(
            f"| {label} | {' | '.join(vals)} | {ns} | {data_s} | {r.train_seconds:.1f} | {r.paper} | {dirs} |"
        )
    lines.append("")
    bad = {m: c["n"] for m, c in consistency.items() if not c["consistent"]}
    if bad:
        lines.append("**n differs across variants** for " + ", ".join(f"{metric_label(m)} {n}" for m, n in bad.items())
                     + ": these numbers are not on the same held-out set.")  # fmt: skip
    else:
        lines.append("Same held-out set for every compared number (n equal across variants).")
    notes = [f"`{r.variant}`: {n}" for r in rows for n in r.notes]
    if study.kind == "data":
        notes.append("kept adjacency entries of the pruned graph: " + ", ".join(
            f"`{r.variant}` {r.graph_entries:,}" for r in rows if r.graph_entries))  # fmt: skip
    notes += [f"`{r.variant}` **failed**: {r.error}" for r in rows if r.error and not r.shared_with]
    if study.note:
        notes.insert(0, study.note)
    for n in notes:
        lines.append(f"- {n}")
    agree = [d["agree"] for r in rows for d in r.directions.values()]
    if agree:
        lines.append(
            f"- Directions: {agree.count('same')} same, {agree.count('opposite')} opposite, "
            f"{agree.count('unresolved')} unresolved (one side within noise) of {len(agree)} compared."
        )
    return "\n".join(lines)


HOW_TO_READ = (
    "How to read: recall@10 on the held-out sets of the training day (4.2.1), against the whole negative "
    "pool. *EE* averages graph-neighbourhood and engagement pairs; *EE eng.* is engagement pairs only (the "
    "same pairs for every graph, so the graph studies compare it, as the paper does in 4.2.3). *paper* is the "
    "paper's row (absolute recall@10, or the lift over the reference row). *direction*: + / − / ≈ for the "
    "row vs the reference; ours counts only beyond "
    f"{NOISE_SE:g} binomial standard errors, the paper's only beyond {PAPER_TOLERANCE:.0%} relative; "
    "✓ same, ✗ opposite, ~ one side within noise. *train s*: wall seconds of the optimizer steps."
)


def report_markdown(summary: dict, sections: list[str]) -> str:
    s = summary
    head = [
        f"# OmniSage ablations ({s['stamp']})",
        "",
        (
            f"- data: `{s['scale']}` synthetic, {len(s['days'])} days ({s['days'][0]} .. {s['days'][-1]}), "
            f"trained and evaluated on dt={s['days'][-1]}; input {s['data_root']}"
        ),
        (
            f"- training: {s['steps']} steps, batch {s['batch_size']}, {s['negatives']} random negatives (outside the "
            f"negatives study), seed {s['seed']}, preset {s['preset']}, device {s['device']}; engine {s['engine']}"
        ),
        f"- neighbourhood layout (subset:node_type:k_t): {', '.join(s['layout'])}"
        + (
            " (--blocks; the graph_snapshot default is the paper's 25/75/50)"
            if s.get("blocks")
            else " (the default)"
        ),
        (
            f"- universe: {s['universe'].get('pin', 0)} pins, {s['universe'].get('board', 0)} boards; MLflow experiment "
            f"`{s['experiment']}`, parent run `{s['parent_run_id']}`"
        ),
        f"- {s['unique_runs']} trained runs for {s['rows']} rows; wall time {s['wall_seconds']:.0f} s"
        + (f"; **{len(s['failed'])} failed**" if s.get("failed") else ""),
        "",
        HOW_TO_READ,
    ]
    return "\n".join(head + [""] + [sec + "\n" for sec in sections]).rstrip() + "\n"


# ==========================================================================================================
# The runner
# ==========================================================================================================
@dataclass
class AblationResult:
    root: Path
    markdown_path: Path
    json_path: Path
    markdown: str
    summary: dict[str, Any]
    rows: list[Row]
    parent_run_id: str


def parse_selection(studies: list[str] | None, variants: list[str] | None,
                    catalogue: dict[str, Study]) -> list[tuple[Study, list[Variant]]]:  # fmt: skip
    """Studies in the catalogue's order; ``variants`` ("study:variant") keeps only those rows of a study
    (its reference row is always kept: directions are measured from it)."""
    chosen = list(studies) if studies else list(catalogue)
    unknown = [s for s in chosen if s not in catalogue]
    if unknown:
        raise AblationError(f"unknown study {unknown}; known: {list(catalogue)}")
    keep: dict[str, set[str]] = {}
    for spec in variants or []:
        sid, _, vid = spec.partition(":")
        if sid not in catalogue or not vid:
            raise AblationError(f"--variant {spec!r}: expected STUDY:VARIANT with STUDY in {list(catalogue)}")
        catalogue[sid].variant(vid)  # raises for an unknown variant
        keep.setdefault(sid, set()).add(vid)
        if sid not in chosen:
            chosen.append(sid)
    out = []
    for sid, study in catalogue.items():
        if sid not in chosen:
            continue
        vs = [v for v in study.variants if sid not in keep or v.id in keep[sid] or v.id == study.reference]
        out.append((study, vs))
    return out


@dataclass(frozen=True)
class AblationConfig:
    """What one ablation run does (the ``omnisage ablate`` flags; the module docstring explains each)."""

    studies: list[str] | None = None  # study ids in catalogue order; None = every study
    variants: list[str] | None = None  # "study:variant" rows to keep (the reference row is always kept)
    scale: str = "tiny"  # synthetic scale when no data_root is given
    days: int = 3
    steps: int = 300
    seed: int = 0
    batch_size: int = 64
    negatives: int = 64  # random negatives outside the negatives study
    preset: str = "auto"
    device: str = "auto"
    data_root: Path | None = None  # contract input; None = generate synthetic input under the root
    root: Path | None = None  # None = $OMNISAGE_HOME/ablations/<UTC timestamp>
    experiment: str = EXPERIMENT
    engine: str | None = None  # None = the production engine
    torch_threads: int | None = None
    blocks: list[str] | None = None  # the run's neighbourhood layout ('subset:node_type:k' per block)

    def model_config(self, day: str) -> dict[str, Any]:
        """The OmniSageModelConfig of a variant before its own overrides."""
        return {"steps": self.steps, "batch_size": self.batch_size, "num_random_negatives": self.negatives,
                "seed": self.seed, "preset": self.preset, "device": self.device, "pinsage_baseline": False,
                "training_partition": day}  # fmt: skip

    def base_overrides(self) -> dict[str, dict]:
        """Run config of the default data: the --blocks layout, when given."""
        if not self.blocks:
            return {}
        try:
            parse_blocks(list(self.blocks))
        except ValueError as exc:
            raise AblationError(f"--blocks: {exc}") from exc
        return {"graph_snapshot": {"blocks": list(self.blocks)}}


@dataclass
class _Run:
    """The state every variant of one ablation run shares."""

    config: AblationConfig
    production: Settings
    stamp: str
    data_root: Path
    day: str
    base: Settings  # scratch settings of the default data (_base)
    base_overrides: dict[str, dict]
    mlflow: MlflowResource
    client: Any  # the MLflow client of the parent run
    parent_id: str
    echo: Callable[[str], None]


def _train_variant(
    row: Row, study: Study, v: Variant, home: Path, cfg: dict, model_over: dict, run: _Run
) -> None:
    """Materialize the variant's data (or link the default data) in its own scratch home and train it."""
    echo = run.echo
    home.mkdir(parents=True, exist_ok=False)
    row.home = str(home)
    vs = scratch_settings(run.production, home, run.data_root, run.config.engine)
    t0 = time.perf_counter()
    if v.data:
        echo(f"[{study.id}/{v.id}] materializing its data ({json.dumps(v.data)}) in {home}")
        build_variant_data(run.base, vs, run.day, merge_overrides(run.base_overrides, v.data))
        row.data_seconds = time.perf_counter() - t0
    else:
        link_base_data(run.base, home)
    what = json.dumps(model_over) if model_over else "default model"
    echo(f"[{study.id}/{v.id}] training {cfg['steps']} steps ({what})")
    tags = {
        "ablation.study": study.id, "ablation.variant": v.id, "ablation.stamp": run.stamp,
        f"ablation.member.{study.id}": v.id, "mlflow.parentRunId": run.parent_id, "ablation.home": str(home),
    }  # fmt: skip
    outcome = train_and_register(vs, run.mlflow, OmniSageModelConfig(**cfg), log=lambda m: None, register=False,
                                 experiment_name=run.config.experiment, run_tags=tags)  # fmt: skip
    run.mlflow.client().set_tag(outcome.run_id, "mlflow.runName", f"{study.id}/{v.id}")
    row.run_id = outcome.run_id
    row.graph_entries = graph_entries(vs, run.day)
    row.recall = recall_by_metric(outcome)
    row.train_seconds = float(outcome.train_seconds)
    echo(f"[{study.id}/{v.id}] " + ", ".join(
        f"{metric_label(m)} {_fmt(r['recall'])} (n={r['n']})" for m, r in row.recall.items()))  # fmt: skip


def _input_days(config: AblationConfig, production: Settings, root: Path, echo) -> tuple[Path, list[str]]:
    """The run's contract input (generated under the root unless --data-root) and its last ``days`` days."""
    if config.data_root is None:
        from omnisage_pipeline.tools.synthetic import generate

        data_root = root / "input"
        echo(
            f"generating {config.days} days of '{config.scale}' synthetic data from {production.start_date} "
            f"into {data_root}"
        )
        summary = generate(
            data_root,
            start_date=production.start_date,
            days=config.days,
            scale=config.scale,
            seed=config.seed,
        )
        return data_root, list(summary["days"])
    data_root = Path(config.data_root).absolute()
    found = sorted(p.name[3:] for p in (data_root / "engagement_logs").glob("dt=*") if p.is_dir())
    day_keys = [d for d in found if d >= production.start_date][-config.days :]
    if not day_keys:
        raise AblationError(f"{data_root}/engagement_logs holds no dt=YYYY-MM-DD folder on or after "
                            f"OMNISAGE_START_DATE={production.start_date}")  # fmt: skip
    return data_root, day_keys


def _open_parent_run(mlflow_res: MlflowResource, client, config: AblationConfig, stamp: str, params: dict):
    """(experiment id, parent run id): the parent run that carries the tables, with the run's parameters."""
    experiment_id = mlflow_res.experiment_id(config.experiment)
    parent = client.create_run(experiment_id, run_name=f"ablations {stamp}",
                               tags={"ablation.role": "parent", "ablation.stamp": stamp})  # fmt: skip
    for k, v in params.items():
        client.log_param(parent.info.run_id, k, str(v))
    return experiment_id, parent.info.run_id


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` for the block (unchanged when None), restored after."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _variant_row(study: Study, v: Variant, run: _Run, negative_cap: int) -> tuple[Row, dict, dict]:
    """The row of a variant (notes, paper value), its model config and its own model overrides (random
    negatives capped at the universe)."""
    model_over = dict(v.model)
    notes = [v.note] if v.note else []
    if "num_random_negatives" in model_over and model_over["num_random_negatives"] > negative_cap:
        notes.append(f"{model_over['num_random_negatives']:,} random negatives capped at the universe "
                     f"size {negative_cap}")  # fmt: skip
        model_over["num_random_negatives"] = negative_cap
    cfg = run.config.model_config(run.day)
    cfg.update(model_over)
    key = json.dumps({"data": v.data, "model": cfg}, sort_keys=True)
    row = Row(study.id, v.id, v.label, key, config={"data": v.data, "model": cfg},
              paper=v.paper.describe() if v.paper else "", notes=notes)  # fmt: skip
    return row, cfg, model_over


def _reuse(row: Row, first: Row) -> None:
    """``row`` stands for the same configuration as ``first``: it shares its run and numbers."""
    row.run_id, row.home, row.recall = first.run_id, first.home, first.recall
    row.train_seconds, row.data_seconds = first.train_seconds, first.data_seconds
    row.graph_entries = first.graph_entries
    row.shared_with, row.error = f"{first.study}/{first.variant}", first.error


def _run_studies(run: _Run, selection, root: Path, negative_cap: int) -> tuple[dict[str, Row], list]:
    """Train every selected variant once per distinct configuration; returns (runs by key, rows by study)."""
    runs: dict[str, Row] = {}  # run key -> the row that trained it
    rows_by_study: list[tuple[Study, list[Row]]] = []
    for study, chosen in selection:
        rows = []
        for v in chosen:
            row, cfg, model_over = _variant_row(study, v, run, negative_cap)
            rows.append(row)
            if row.run_key in runs:
                _reuse(row, runs[row.run_key])
                run.client.set_tag(row.run_id, f"ablation.member.{study.id}", v.id)
                run.echo(
                    f"[{study.id}/{v.id}] same configuration as {row.shared_with}: reusing run {row.run_id}"
                )
                continue
            try:
                _train_variant(row, study, v, root / study.id / v.id, cfg, model_over, run)
            except Exception as exc:  # noqa: BLE001 (one broken variant must not lose the others' hours of training)
                row.error = f"{type(exc).__name__}: {exc}"
                run.echo(f"[{study.id}/{v.id}] FAILED: {row.error}")
            runs[row.run_key] = row
        directions(study, rows)
        rows_by_study.append((study, rows))
    return runs, rows_by_study


def _studies_json(rows_by_study) -> tuple[list[str], list[dict]]:
    sections, studies_json = [], []
    for study, rows in rows_by_study:
        consistency = n_consistency(study, rows)
        sections.append(study_markdown(study, rows, consistency))
        studies_json.append({
            "id": study.id, "title": study.title, "paper": study.statement, "reference": study.reference,
            "compare": list(study.compare), "n_consistency": consistency,
            "variants": [dataclasses.asdict(r) for r in rows],
        })  # fmt: skip
    return sections, studies_json


def _write_report(run: _Run, root: Path, summary: dict, rows_by_study) -> tuple[str, Path, Path]:
    """ablations.md / ablations.json in the root and as artifacts of the parent run, which is then closed."""
    sections, studies_json = _studies_json(rows_by_study)
    markdown = report_markdown(summary, sections)
    md_path, json_path = root / "ablations.md", root / "ablations.json"
    md_path.write_text(markdown)
    json_path.write_text(json.dumps({"summary": summary, "studies": studies_json}, indent=2, default=str))
    client = run.client
    client.log_artifact(run.parent_id, str(md_path))
    client.log_artifact(run.parent_id, str(json_path))
    client.log_metric(run.parent_id, "wall_seconds", summary["wall_seconds"])
    client.set_terminated(run.parent_id, status="FINISHED")
    return markdown, md_path, json_path


def run_ablations(
    config: AblationConfig | None = None,
    *,
    settings: Settings | None = None,
    echo: Callable[[str], None] = print,
) -> AblationResult:
    """Run the selected studies (module docstring) and return the tables."""
    config = config or AblationConfig()
    t_start = time.perf_counter()
    production = settings or Settings.from_env()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    root = check_root(production, config.root or production.home / "ablations" / stamp)
    root.mkdir(parents=True, exist_ok=True)
    base_overrides = config.base_overrides()
    selection = parse_selection(config.studies, config.variants, build_studies(blocks=config.blocks))
    data_root, day_keys = _input_days(config, production, root, echo)
    day = day_keys[-1]

    base = scratch_settings(production, root / "_base", data_root, config.engine)
    t0 = time.perf_counter()
    echo(f"materializing the default data for {day_keys[0]} .. {day} in {base.home}")
    build_base_data(base, day_keys, base_overrides)
    base_seconds = time.perf_counter() - t0
    universe = universe_sizes(base, day)
    negative_cap = max(universe.values()) if universe else 0

    mlflow_res = MlflowResource(tracking_uri=production.mlflow_tracking_uri,
                                artifact_root=str(production.home / "mlflow-artifacts"))  # fmt: skip
    c = config
    params = {"scale": c.scale, "days": ",".join(day_keys), "steps": c.steps, "seed": c.seed,
              "batch_size": c.batch_size, "negatives": c.negatives, "preset": c.preset, "device": c.device,
              "root": str(root), "studies": ",".join(s.id for s, _ in selection)}  # fmt: skip
    client = mlflow_res.client()
    experiment_id, parent_id = _open_parent_run(mlflow_res, client, config, stamp, params)
    run = _Run(
        config, production, stamp, data_root, day, base, base_overrides, mlflow_res, client, parent_id, echo
    )
    try:
        with _torch_threads(config.torch_threads):
            runs, rows_by_study = _run_studies(run, selection, root, negative_cap)
            summary = {
                "stamp": stamp, "root": str(root), "data_root": str(data_root), "scale": c.scale, "days": day_keys,
                "training_partition": day, "steps": c.steps, "batch_size": c.batch_size, "negatives": c.negatives,
                "seed": c.seed, "preset": c.preset, "device": c.device, "engine": base.engine, "universe": universe,
                "negative_cap": negative_cap, "experiment": c.experiment, "experiment_id": experiment_id,
                "blocks": list(c.blocks) if c.blocks else None, "base_overrides": base_overrides,
                "layout": list(c.blocks) if c.blocks else _default_blocks(),
                "parent_run_id": parent_id, "tracking_uri": production.mlflow_tracking_uri,
                "unique_runs": len(runs), "rows": sum(len(r) for _, r in rows_by_study),
                "failed": [f"{r.study}/{r.variant}: {r.error}" for _, rows in rows_by_study for r in rows if r.error],
                "base_data_seconds": base_seconds, "wall_seconds": time.perf_counter() - t_start,
            }  # fmt: skip
            markdown, md_path, json_path = _write_report(run, root, summary, rows_by_study)
    except BaseException:
        with contextlib.suppress(Exception):  # the run's own failure is what must surface
            client.set_terminated(parent_id, status="FAILED")
        raise
    return AblationResult(root, md_path, json_path, markdown, summary,
                          [r for _, rows in rows_by_study for r in rows], parent_id)  # fmt: skip
