"""The ablation runner (`omnisage ablate`, omnisage_pipeline/tools/ablations.py and its ablation_* modules).

The integration test sets up a PRODUCTION home first (data assets + a registered champion), runs two small
studies through the CLI (pruning alpha: 0.5 vs the default, a data variant; aggregator: transformer vs mean,
a model-only variant), and checks the tables, the scratch homes, the single MLflow experiment with its tags,
and that neither the production outputs nor the registry moved. The other tests cover the catalogue, the
selection, the root guard and the direction arithmetic without training anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from omnisage_pipeline.settings import Settings
from omnisage_pipeline.tools.ablation_data import (
    PRODUCTION_OUTPUTS,
    build_base_data,
    check_root,
    merge_overrides,
)
from omnisage_pipeline.tools.ablation_report import (
    Row,
    directions,
    n_consistency,
    ours_sign,
    paper_sign,
    study_markdown,
)
from omnisage_pipeline.tools.ablation_studies import (
    EE_ENGAGEMENT,
    NO_EDGES_SUBSET,
    STUDY_IDS,
    AblationError,
    build_studies,
    empty_layout_supported,
    parse_selection,
)


# ------------------------------------------------------------------------------------------ no training
def test_catalogue_matches_the_cli_and_the_asset_defaults():
    from assets.snapshot import GraphSnapshotConfig
    from graph_engine.batch import parse_blocks
    from omnisage_pipeline.commands.ablate import ABLATION_STUDIES

    for empty_ok in (False, True):
        studies = build_studies(empty_layout_ok=empty_ok)
        assert tuple(studies) == STUDY_IDS == ABLATION_STUDIES
        for s in studies.values():
            ref = s.variant(s.reference)
            if s.id == "negatives":  # Table 12 reports lifts over no random negatives
                assert ref.data == {} and ref.model == {"num_random_negatives": 0}
            else:  # the reference row IS the production configuration: what lets studies share its run
                assert ref.data == {} and ref.model == {}, s.id
            assert all("/" not in v.id and v.id not in ("", ".", "..") for v in s.variants)
            assert all(v.paper is not None for v in s.variants), s.id
        no_graph = studies["graph_sources"].variant("no_graph").data["graph_snapshot"]
        assert no_graph["min_coverage"] == 0.0  # empty neighbourhoods are the point: graph_coverage opened up
        if empty_ok:
            assert no_graph == {"blocks": [], "min_coverage": 0.0}
        else:  # one padding column over a subset without edges: every neighbourhood is empty
            assert no_graph["subsets"] == {NO_EDGES_SUBSET: [NO_EDGES_SUBSET]}
            assert [b.k for b in parse_blocks(no_graph["blocks"]).blocks] == [1]
    halved = studies["halved_kt"].variant("halved").data["graph_snapshot"]["blocks"]
    assert parse_blocks(halved) == parse_blocks(list(GraphSnapshotConfig().blocks)).halved()
    pb = studies["graph_sources"].variant("pin_board").data["graph_snapshot"]
    assert set(pb["subsets"]) == {"pin_board"} and all(b.startswith("pin_board:") for b in pb["blocks"])
    assert studies["pruning_alpha"].reference == "0.86"


def test_empty_layout_probe_says_no_only_on_a_torch_shape_error(monkeypatch):
    """The "no graph" probe: a torch shape error (what a model without zero-width layouts raises) means
    "not supported"; any other error is a bug of the probe or the model and surfaces instead of quietly
    switching the "no graph" row to its padding-column fallback."""
    from ml.model import OmniSageModel

    def shape_error(self, x, *args, **kwargs):
        raise RuntimeError("cannot reshape tensor of 0 elements into shape [2, 0, -1]")

    monkeypatch.setattr(OmniSageModel, "embed", shape_error)
    assert empty_layout_supported() is False

    def bug(self, x, *args, **kwargs):
        raise TypeError("embed() got an unexpected keyword argument 'where'")

    monkeypatch.setattr(OmniSageModel, "embed", bug)
    with pytest.raises(TypeError, match="unexpected keyword"):
        empty_layout_supported()


def test_selection_and_root_guard(tmp_path):
    studies = build_studies(empty_layout_ok=False)
    sel = parse_selection(["aggregator", "pruning_alpha"], ["pruning_alpha:0.5"], studies)
    # catalogue order; a --variant keeps the study's reference row
    assert [(s.id, [v.id for v in vs]) for s, vs in sel] == [
        ("pruning_alpha", ["0.5", "0.86"]),
        ("aggregator", ["transformer", "mean"]),
    ]
    assert [s.id for s, _ in parse_selection(None, None, studies)] == list(STUDY_IDS)
    with pytest.raises(AblationError, match="unknown study"):
        parse_selection(["bogus"], None, studies)
    with pytest.raises(AblationError, match="has no variant 'x'"):
        parse_selection(None, ["tasks:x"], studies)

    home = tmp_path / "home"
    prod = Settings.from_env({"OMNISAGE_HOME": str(home)})
    for bad in (home, home / "warehouse" / "x", home / "graph", home / "embeddings" / "a" / "b"):
        with pytest.raises(AblationError):
            check_root(prod, bad)
    (home / "ablations" / "used").mkdir(parents=True)
    (home / "ablations" / "used" / "f").write_text("x")
    with pytest.raises(AblationError, match="not empty"):
        check_root(prod, home / "ablations" / "used")
    assert check_root(prod, home / "ablations" / "new") == (home / "ablations" / "new").absolute()

    from omnisage_pipeline.cli import main

    out = CliRunner().invoke(main, ["ablate", "--studies", "graph_sources,bogus"])
    assert out.exit_code == 2 and "bogus" in out.output and "halved_kt" in out.output


def test_direction_arithmetic():
    studies = build_studies(empty_layout_ok=False)
    g = studies["graph_sources"]
    ref_paper = g.variant(g.reference).paper
    # Table 3: no graph is below the full graph on both tasks
    assert paper_sign(g.variant("no_graph").paper, ref_paper, "entity_entity") == -1
    assert paper_sign(g.variant("no_graph").paper, ref_paper, "user_entity") == -1
    b = studies["push_budget"]
    # Table 4: 0.576 vs 0.580 (-0.7%) is inside the paper's own "no significant" band; Table 10: 0.584 vs
    # 0.576 (+1.4%) is outside it
    assert paper_sign(b.variant("B_half").paper, b.variant("B").paper, "user_entity") == 0
    a = studies["pruning_alpha"]
    assert paper_sign(a.variant("0.5").paper, a.variant("0.86").paper, "user_entity") == 1
    n = studies["negatives"]
    assert paper_sign(n.variant("1K").paper, n.variant("0").paper, "user_entity") == 1  # a lift row
    assert paper_sign(n.variant("1K").paper, n.variant("0").paper, "entity_entity") is None

    assert ours_sign({"recall": 0.5, "n": 1000}, {"recall": 0.3, "n": 1000}) == 1
    assert ours_sign({"recall": 0.3, "n": 1000}, {"recall": 0.5, "n": 1000}) == -1
    assert ours_sign({"recall": 0.5, "n": 12}, {"recall": 0.4, "n": 12}) == 0  # 12 users: noise
    assert ours_sign({"recall": None, "n": 0}, {"recall": 0.4, "n": 12}) is None

    rows = [
        Row(
            "graph_sources",
            "no_graph",
            "no graph",
            "k1",
            recall={EE_ENGAGEMENT: {"recall": 0.2, "n": 500}, "user_entity": {"recall": 0.45, "n": 500}},
        ),
        Row(
            "graph_sources",
            "pin_board+pin_pin",
            "all",
            "k2",
            recall={EE_ENGAGEMENT: {"recall": 0.4, "n": 500}, "user_entity": {"recall": 0.40, "n": 500}},
        ),
    ]
    directions(g, rows)
    assert rows[0].directions[EE_ENGAGEMENT] == {"paper": -1, "ours": -1, "agree": "same"}
    assert rows[0].directions["user_entity"] == {"paper": -1, "ours": 0, "agree": "unresolved"}
    assert rows[1].directions == {}  # the reference row
    assert n_consistency(g, rows)[EE_ENGAGEMENT] == {"n": [500], "consistent": True}
    rows[1].recall["user_entity"]["n"] = 499
    assert n_consistency(g, rows)["user_entity"]["consistent"] is False
    md = study_markdown(g, rows, n_consistency(g, rows))
    assert "EE eng. − / − ✓" in md and "n differs across variants" in md

    # a variant's data overrides go on top of the run's (--blocks) per config field
    base = {"graph_snapshot": {"blocks": ["a:pin:1"]}}
    assert merge_overrides(base, {"graph_snapshot": {"budget": 5}, "pruned_edges": {"alpha": 0.5}}) == {
        "graph_snapshot": {"blocks": ["a:pin:1"], "budget": 5},
        "pruned_edges": {"alpha": 0.5},
    }
    assert merge_overrides(base, {"graph_snapshot": {"blocks": []}}) == {"graph_snapshot": {"blocks": []}}
    assert base == {"graph_snapshot": {"blocks": ["a:pin:1"]}}  # not mutated


# ------------------------------------------------------------------------------------------ integration
BLOCKS = ["pin_board:pin:4", "pin_board:board:4", "pin_pin:pin:4"]


def _tree_state(home: Path) -> dict:
    """Every entry (files, dirs, publish symlinks, dot-directories) under the production outputs."""
    state = {}
    for name in PRODUCTION_OUTPUTS:
        top = home / name
        state[name] = top.exists()
        if not top.exists():
            continue
        for p in sorted(top.rglob("*")):
            st = p.lstat()
            link = os.readlink(p) if p.is_symlink() else None
            state[str(p.relative_to(home))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, link)
    return state


def _registry_state(uri: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    out = {}
    for m in client.search_registered_models():
        versions = client.search_model_versions(f"name='{m.name}'")
        out[m.name] = {
            "aliases": {k: str(v) for k, v in dict(m.aliases).items()},
            "versions": sorted((v.version, v.run_id, v.status, v.last_updated_timestamp) for v in versions),
        }
    return out


@pytest.mark.slow
def test_ablate_two_studies_in_scratch_homes(omnisage_env, one_torch_thread):
    import mlflow

    from assets.training import OmniSageModelConfig, train_from_asset_config
    from graph_engine.batch import parse_blocks
    from graph_engine.neighbor_sampler import NeighborhoodCache
    from graph_engine.snapshot import GraphSnapshot
    from omnisage_pipeline.cli import main
    from omnisage_pipeline.partitions import daily_partitions
    from omnisage_pipeline.resources import MlflowResource
    from omnisage_pipeline.storage.publish import require_published
    from omnisage_pipeline.tools.synthetic import generate

    # ---- production: the daily data assets and a registered champion
    prod = Settings.from_env()
    start = daily_partitions.start.strftime("%Y-%m-%d")
    summary = generate(prod.data_root, start_date=start, days=3, scale="tiny", seed=1)
    days = list(summary["days"])
    build_base_data(prod, days)
    champion = train_from_asset_config(
        prod,
        MlflowResource.from_settings(prod),
        OmniSageModelConfig(
            steps=2,
            batch_size=16,
            num_random_negatives=8,
            pool_size=200,
            pinsage_baseline=False,
            device="cpu",
            preset="small",
        ),
        log=lambda m: None,
    )
    assert champion.alias == "champion" and champion.version == "1"
    outputs_before = _tree_state(prod.home)
    registry_before = _registry_state(prod.mlflow_tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=prod.mlflow_tracking_uri, registry_uri=prod.mlflow_tracking_uri)
    prod_exp = client.get_experiment_by_name("omnisage").experiment_id
    prod_runs_before = {r.info.run_id for r in client.search_runs([prod_exp])}

    # ---- the ablation: alpha 0.5 vs 0.86 (data variant) + transformer vs mean (model-only variant)
    args = [
        "ablate",
        "--studies",
        "pruning_alpha,aggregator",
        "--variant",
        "pruning_alpha:0.5",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--negatives",
        "8",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--preset",
        "small",
        "--blocks",
        ",".join(BLOCKS),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)

    # default root: $OMNISAGE_HOME/ablations/<stamp>/ holding the input, the homes and the tables
    (root,) = list((prod.home / "ablations").iterdir())
    report = json.loads((root / "ablations.json").read_text())
    markdown = (root / "ablations.md").read_text()
    assert markdown.strip() in result.output  # printed at the end
    s = report["summary"]
    assert s["experiment"] == "omnisage-ablations" and s["days"] == days and s["training_partition"] == days[-1]
    assert s["unique_runs"] == 3 and s["rows"] == 4 and s["failed"] == []
    assert Path(s["data_root"]) == root / "input" and (root / "input" / "engagement_logs").is_dir()

    # ---- tables: one per study, one row per variant, the paper's numbers beside ours
    assert [st["id"] for st in report["studies"]] == ["pruning_alpha", "aggregator"]
    rows = {(st["id"], v["variant"]): v for st in report["studies"] for v in st["variants"]}
    assert list(rows) == [
        ("pruning_alpha", "0.5"),
        ("pruning_alpha", "0.86"),
        ("aggregator", "transformer"),
        ("aggregator", "mean"),
    ]
    for (sid, vid), row in rows.items():
        for metric in ("entity_entity", "entity_feature", "user_entity", EE_ENGAGEMENT):
            r = row["recall"][metric]
            assert 0.0 <= r["recall"] <= 1.0 and r["n"] > 0, (sid, vid, metric)
        assert row["train_seconds"] > 0 and row["run_id"]
    for st in report["studies"]:  # every compared number on the same held-out set
        assert all(c["consistent"] for c in st["n_consistency"].values()), st["id"]
    assert set(rows[("pruning_alpha", "0.5")]["directions"]) == {EE_ENGAGEMENT, "user_entity"}
    assert set(rows[("aggregator", "mean")]["directions"]) == {"entity_entity"}
    assert rows[("aggregator", "transformer")]["shared_with"] == "pruning_alpha/0.86"
    assert rows[("aggregator", "transformer")]["run_id"] == rows[("pruning_alpha", "0.86")]["run_id"]
    assert rows[("pruning_alpha", "0.5")]["data_seconds"] > 0
    assert "## Pruning alpha (paper Table 10)" in markdown and "## Neighbour aggregator (paper A.2.4)" in markdown
    assert markdown.count("| variant | recall@10 EE | EE eng. | EF | UE | n (EE / eng. / EF / UE) |") == 2
    assert "| alpha 0.5 |" in markdown and "EE 0.584, UE 0.584" in markdown
    assert "(same run as pruning_alpha/0.86)" in markdown

    # ---- scratch homes: one per trained run, under the root, never the production home
    homes = {rows[k]["home"] for k in rows}
    assert len(homes) == 3
    for h in homes:
        assert Path(h).parent.parent == root
    day = days[-1]
    a05, a086 = Path(rows[("pruning_alpha", "0.5")]["home"]), Path(rows[("pruning_alpha", "0.86")]["home"])
    mean = Path(rows[("aggregator", "mean")]["home"])
    # the data variant built its own graph (fewer kept entries at alpha 0.5) and read the upstream from _base
    assert not (a05 / "warehouse" / "pruned_edges").is_symlink()
    assert (a05 / "warehouse" / "engagement_logs").is_symlink()
    assert os.path.realpath(a05 / "warehouse" / "engagement_logs") == str(
        (root / "_base" / "warehouse" / "engagement_logs").resolve()
    )
    kept = {h: pq.read_table(require_published(h / "warehouse" / "pruned_edges", day)).num_rows for h in (a05, a086)}
    assert kept[a05] < kept[a086]
    assert rows[("pruning_alpha", "0.5")]["graph_entries"] == kept[a05]
    assert rows[("pruning_alpha", "0.86")]["graph_entries"] == kept[a086]
    assert (a05 / "graph").is_dir() and not (a05 / "graph").is_symlink()
    # --blocks is the layout of every variant's data: the alpha variant kept it under its own override
    for h in (a05, root / "_base"):
        graph = require_published(h / "graph", day)
        cache = NeighborhoodCache.open(graph / "neighborhoods", GraphSnapshot.open(graph))
        assert cache.layout == parse_blocks(BLOCKS)
    assert s["layout"] == BLOCKS
    # model-only variants read the default data
    for h in (a086, mean):
        assert (h / "warehouse").is_symlink() and (h / "graph").is_symlink() and (h / "features").is_symlink()

    # ---- MLflow: every variant run in the ONE ablation experiment, tagged, children of the parent run
    exp = client.get_experiment_by_name("omnisage-ablations")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    parent = runs[s["parent_run_id"]]
    assert parent.data.tags["ablation.role"] == "parent" and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"ablations.md", "ablations.json"}
    children = {rid: r for rid, r in runs.items() if rid != parent.info.run_id}
    assert set(children) == {row["run_id"] for row in rows.values()}
    for (sid, vid), row in rows.items():
        tags = children[row["run_id"]].data.tags
        assert tags[f"ablation.member.{sid}"] == vid
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["gate.alias"] == "" and tags["model_version"] == ""  # never registered
        assert children[row["run_id"]].info.status == "FINISHED"
    shared = children[rows[("pruning_alpha", "0.86")]["run_id"]].data.tags
    assert (shared["ablation.study"], shared["ablation.variant"]) == ("pruning_alpha", "0.86")
    assert children[rows[("aggregator", "mean")]["run_id"]].data.params["config.aggregator"] == "mean"

    # ---- production untouched: outputs, registry (versions and aliases), production experiment
    assert _tree_state(prod.home) == outputs_before
    assert _registry_state(prod.mlflow_tracking_uri) == registry_before
    assert registry_before["omnisage"]["aliases"] == {"champion": "1"}
    assert {r.info.run_id for r in client.search_runs([prod_exp])} == prod_runs_before
