"""The ablation studies: the paper's ablation tables (4.2.3-4.2.5, appendix A.2) as data.

A **study** is one of the paper's ablation tables; its **variants** are the table's rows, each with the run
config overrides of the daily data assets (data variants) or of ``OmniSageModelConfig`` (model-only
variants) and the paper's own numbers. Every study is built from the assets' own defaults, so its reference
row IS the production configuration (what lets studies share that row's run). ``omnisage_pipeline.tools
.ablations`` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from assets.graph import PruningConfig
from assets.snapshot import GraphSnapshotConfig
from graph_engine.batch import EntityBatch, FeatureArrays, NeighborhoodLayout, parse_blocks

TASK_SHORT = {"entity_entity": "EE", "entity_feature": "EF", "user_entity": "UE"}
#: The compared entity-entity metric: every held-out pair, or the engagement pairs only (graph studies).
EE_ALL, EE_ENGAGEMENT = "entity_entity", "entity_entity_engagement"


class AblationError(RuntimeError):
    """The ablation cannot run as asked (bad selection, a root inside the production outputs, ...)."""


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
    """One row of a study: its data (run config) and model overrides over the run's defaults."""

    id: str  # folder-safe
    label: str
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # asset -> run config overrides
    model: dict[str, Any] = field(default_factory=dict)  # OmniSageModelConfig overrides
    paper: PaperRow | None = None
    note: str = ""


@dataclass(frozen=True)
class Study:
    """One of the paper's ablation tables: its rows, the reference row and the metrics compared."""

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

    from ml.config import small
    from ml.entity_tensors import as_entity_tensors
    from ml.model import OmniSageModel

    cfg, _ = small(image_dim=0)
    model = OmniSageModel(cfg).eval()
    no_neighbours = (2, 0)
    batch = EntityBatch(
        entity_type="pin",
        entity_ids=np.arange(2, dtype=np.int64),
        features=FeatureArrays.empty((2,), 4, 0),
        neighbor_ids=np.zeros(no_neighbours, np.int64),
        neighbor_features=FeatureArrays.empty(no_neighbours, 4, 0),
        neighbor_scores=np.zeros(no_neighbours, np.float32),
        neighbor_mask=np.zeros(no_neighbours, bool),
        layout=NeighborhoodLayout(()),
    )
    try:
        with torch.no_grad():
            model.embed(batch)
            model.tasks["entity_feature"].queries(as_entity_tensors(batch, "cpu", "probe"))
    except RuntimeError:
        # torch's shape errors (reshape(..., -1) of 0 elements) mean: not supported; any other error is a
        # bug of the probe or the model and must surface, not silently change the "no graph" row.
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
    snapshot = {
        "subsets": {NO_EDGES_SUBSET: [NO_EDGES_SUBSET]},
        "blocks": [f"{NO_EDGES_SUBSET}:pin:1"],
        "min_coverage": 0.0,
    }
    return {"graph_snapshot": snapshot}, (
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
            Variant("EF", "EF", model={"tasks": ["entity_feature"]}, paper=PaperRow({"entity_feature": 0.373})),
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
        "Random negatives are crucial for UE and more help, with a plateau: +31.2% (1K) and +43.5% (10K) over none.",
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


def default_blocks() -> list[str]:
    """The graph_snapshot asset's default neighbourhood layout ('subset:node_type:k' per block)."""
    return list(GraphSnapshotConfig().blocks)


STUDY_IDS = ("graph_sources", "tasks", "pruning_alpha", "push_budget", "halved_kt", "aggregator", "negatives")


def parse_selection(
    studies: list[str] | None, variants: list[str] | None, catalogue: dict[str, Study]
) -> list[tuple[Study, list[Variant]]]:
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
