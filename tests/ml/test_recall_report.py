"""The recall report's pieces (ml.baselines, ml.recall_report, the sparse recall path): baselines on exactly
the model's evaluation sets, co-occurrence = common neighbours with the pair's edge excluded, the sparse and
dense recall agree, a random-weight model carries no signal about the positive, the regression rule, and
the contract shape. The asset itself runs in tests/test_end_to_end.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pipeline_fixtures import build_library_pipeline

from ml.baselines import CooccurrenceEmbedder, PopularityEmbedder, oracle_baseline, random_baseline
from ml.config import TASK_NAMES as TASKS
from ml.config import small
from ml.evaluator import Evaluator, model_embedders
from ml.metrics import recall_at_k, recall_at_k_sparse
from ml.model import OmniSageModel
from ml.recall_report import Candidate, build_report, markdown, plot_png, regressions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return build_library_pipeline(tmp_path_factory.mktemp("pipe"), scale="tiny", days=3, seed=0)


@pytest.fixture(scope="module")
def evaluator(art):
    return Evaluator(art.data, art.universe, k=10, pool_size=10_000, seed=0)


@pytest.fixture(scope="module")
def report(art, evaluator):
    torch.manual_seed(0)
    cfg, _ = small(image_dim=art.image_dim)
    model = OmniSageModel(cfg).eval()
    co = CooccurrenceEmbedder(art.snapshot)
    pop = PopularityEmbedder(art.snapshot)
    baselines = {
        "oracle": Candidate(*oracle_baseline(art.truth, art.day)),
        "random": Candidate(*random_baseline(art.universe)),
        "cooccurrence": Candidate(co, co),
        "popularity": Candidate(pop, pop),
        "pinsage": Candidate(None, unavailable="not trained"),
    }
    return build_report(art.day, "7", evaluator, Candidate(*model_embedders(model, art.builder)), baselines)


def _neighbours(snapshot, row: int) -> set[int]:
    """Co-engagement is symmetric: row's neighbours are its own pruned list plus every list that holds it."""
    out = set()
    for subset in snapshot.subsets:
        indptr, indices, _ = snapshot.csr(subset)
        indptr, indices = np.asarray(indptr), np.asarray(indices)
        out |= set(indices[indptr[row] : indptr[row + 1]].tolist())
        holders = np.searchsorted(indptr, np.flatnonzero(indices == row), side="right") - 1
        out |= set(holders.tolist())
    return out


def test_report_has_the_contract_shape_and_every_baseline_uses_the_model_sets(report, evaluator):
    assert report["partition"] and report["model_version"] == "7" and report["negatives"] == 10_000
    assert list(report["baselines"]) == ["random", "popularity", "cooccurrence", "pinsage", "oracle"]
    model_n = {t: report["tasks"][t]["n"] for t in TASKS}
    assert model_n["entity_entity"] == evaluator.pairs["query_id"].size > 0
    assert model_n["user_entity"] == len(evaluator.histories) > 0
    for name in ("random", "popularity", "cooccurrence", "oracle"):
        tasks = report["baselines"][name]
        assert tasks["entity_entity"]["n"] == model_n["entity_entity"], name
        assert tasks["user_entity"]["n"] == model_n["user_entity"], name
        # per-source counts equal too: literally the same pairs, split the same way
        assert {s: v["n"] for s, v in tasks["entity_entity"]["per_source"].items()} == {
            s: v["n"] for s, v in report["tasks"]["entity_entity"]["per_source"].items()
        }
        assert tasks["entity_feature"] == {"recall@10": None, "n": 0, "reason": "no g_x encoders"}
    assert all(v["recall@10"] is None and v["n"] == 0 for v in report["baselines"]["pinsage"].values())
    # the planted structure is recoverable: oracle and co-occurrence far above chance, popularity in between
    ee = {
        name: report["baselines"][name]["entity_entity"]["recall@10"]
        for name in report["baselines"]
        if name != "pinsage"
    }
    assert ee["oracle"] > 5 * ee["random"] and ee["cooccurrence"] > 5 * ee["random"]
    md = markdown(report)
    for name in ("**model** v7", "| random |", "| oracle |", "| pinsage |"):
        assert name in md, name


def test_cooccurrence_scores_common_neighbours_and_drops_the_pair_edge(art):
    snap = art.snapshot
    co = CooccurrenceEmbedder(snap)
    lo, hi = snap.type_range("pin")
    degree = np.asarray(snap.degree())
    q_row = lo + int(np.argmax(degree[lo:hi]))
    n_q = _neighbours(snap, q_row)
    ids = np.asarray(snap.node_id)
    candidates = np.arange(lo, min(hi, lo + 60))
    x_q = co.embed("pin", ids[[q_row]]).toarray()[0]
    x_c = co.embed("pin", ids[candidates]).toarray()
    for c, vec in zip(candidates, x_c):
        n_c = _neighbours(snap, c)
        expected = len(n_q & n_c) + (c in n_q) + (q_row in n_c) + (c == q_row)
        assert float(x_q @ vec) == expected, c
    # excluding a neighbour removes exactly that entry from the query's vector
    nb = min(n_q)
    x_ex = co.embed("pin", ids[[q_row]], exclude_neighbor_ids=ids[[nb]]).toarray()[0]
    assert x_q[nb] == 1.0 and x_ex[nb] == 0.0 and (x_q - x_ex).sum() == 1.0


def test_sparse_recall_matches_dense_recall(art):
    co = CooccurrenceEmbedder(art.snapshot)
    ids = np.asarray(art.snapshot.node_id)[:200]
    rng = np.random.default_rng(0)
    q = co.embed("pin", ids[:80])
    p = co.embed("pin", rng.permutation(ids[:80]))
    n = co.embed("pin", ids[80:200])
    keys = torch.arange(200)
    sparse = recall_at_k_sparse(
        q, p, n, k=5, query_keys=keys[:80], positive_keys=keys[:80] + 1000, negative_keys=keys[80:]
    )
    dense = recall_at_k(
        torch.tensor(q.toarray()),
        torch.tensor(p.toarray()),
        torch.tensor(n.toarray()),
        k=5,
        query_keys=keys[:80],
        positive_keys=keys[:80] + 1000,
        negative_keys=keys[80:],
    )
    assert torch.equal(sparse.outscored, dense.outscored)
    assert sparse.recall == dense.recall


def test_random_weight_model_knows_nothing_about_the_positive(art):
    """With every query's positive replaced by a random entity of the same type, a random-weight model scores
    at the random baseline's chance level: the evaluator leaks nothing about which entity is the positive.
    (On the true pairs a random-weight model is above chance: a random GNN still maps entities with shared
    neighbours and features to nearby vectors - see docs/quality.md.)"""
    torch.manual_seed(1)
    cfg, _ = small(image_dim=art.image_dim)
    model = OmniSageModel(cfg).eval()
    ev = Evaluator(art.data, art.universe, k=10, pool_size=150, seed=0)
    rng = np.random.default_rng(0)
    for t in ("pin", "board"):
        rows = ev.pairs["pos_type"] == t
        ev.pairs["pos_id"][rows] = rng.choice(art.universe[t], size=int(rows.sum()))
    n = ev.pairs["pos_id"].size
    model_recall = ev.evaluate(*model_embedders(model, art.builder), ["entity_entity"]).recall("entity_entity")
    random_recalls = [
        ev.evaluate(random_baseline(art.universe, seed=s)[0], tasks=["entity_entity"]).recall("entity_entity")
        for s in range(5)
    ]
    chance = 10 / 151
    sd = np.sqrt(chance * (1 - chance) / n)
    assert abs(model_recall - chance) < 4 * sd, (model_recall, chance, n)
    assert abs(np.mean(random_recalls) - chance) < 4 * sd / np.sqrt(5) + 0.01


def test_regression_rule_fires_only_on_a_drop_beyond_the_margin():
    def rep(ee, ue=None):
        return {
            "k": 10,
            "tasks": {
                "entity_entity": {"recall@10": ee, "n": 5},
                "entity_feature": {"recall@10": None, "n": 0},
                "user_entity": {"recall@10": ue, "n": 0 if ue is None else 3},
            },
        }

    assert regressions(rep(0.30), None, 0.05) == []
    assert regressions(rep(0.30), rep(0.34), 0.05) == []  # within the margin
    assert regressions(rep(0.40), rep(0.30), 0.05) == []  # an improvement
    drops = regressions(rep(0.20, 0.1), rep(0.30, 0.5), 0.05)
    assert [(r.task, round(r.drop, 6)) for r in drops] == [("entity_entity", 0.1), ("user_entity", 0.4)]
    assert regressions(rep(0.20, None), rep(0.20, 0.9), 0.05) == []  # a null task is not compared


def test_plot_is_a_png_of_the_history(report):
    older = dict(report, partition="2000-01-01")
    png = plot_png([older, report])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
