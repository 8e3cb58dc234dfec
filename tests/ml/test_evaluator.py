"""The one evaluator (paper 4.2.1; contract "Evaluation protocol"): chance level for random embeddings, the
same pools and sets for every embedder, the pair's own edge excluded, empty tasks -> None / 0, the
contract's JSON shape, and the model's embedders (entity, feature queries, users)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pipeline_fixtures import build_library_pipeline

from ml.config import small
from ml.evaluator import Evaluator, model_embedders, random_embedder
from ml.inference import embed_entities, embed_users
from ml.model import OmniSageModel
from ml.training_examples_reader import TrainingData

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return build_library_pipeline(tmp_path_factory.mktemp("pipe"), scale="tiny", days=3, seed=0)


@pytest.fixture(scope="module")
def model(art):
    torch.manual_seed(0)
    cfg, _ = small(image_dim=art.image_dim)
    return OmniSageModel(cfg).eval()


class Recording:
    """Wraps an embedder and records every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def embed(self, entity_type, ids, exclude_neighbor_ids=None):
        self.calls.append(
            (
                entity_type,
                np.array(ids),
                None if exclude_neighbor_ids is None else np.array(exclude_neighbor_ids),
            )
        )
        return self.inner.embed(entity_type, ids, exclude_neighbor_ids)


def test_random_embeddings_score_at_chance(art):
    """Many random embedders: mean recall@k close to k / (pool + 1) for every pair type."""
    ev = Evaluator(art.data, art.universe, k=10, pool_size=150, seed=0)
    assert {t: v.size for t, v in ev.pools.items()} == {"pin": 150, "board": 150}
    recalls = [ev.evaluate(random_embedder(art.universe, dim=16, seed=s)).recall("entity_entity") for s in range(20)]
    chance = 10 / 151  # query/positive are excluded from the pool by key, so the pool is ~150 for everyone
    assert abs(np.mean(recalls) - chance) < 0.02, (np.mean(recalls), chance)


def test_pools_and_sets_are_identical_across_embedders(art):
    ev = Evaluator(art.data, art.universe, k=10, pool_size=300, seed=5)
    a, b = Recording(random_embedder(art.universe, seed=1)), Recording(random_embedder(art.universe, seed=2))
    ev.evaluate(a)
    ev.evaluate(b)
    assert len(a.calls) == len(b.calls) > 0
    for (ta, ia, xa), (tb, ib, xb) in zip(a.calls, b.calls):
        assert ta == tb and np.array_equal(ia, ib)
        assert (xa is None) == (xb is None) and (xa is None or np.array_equal(xa, xb))
    # the pool is fixed by the seed, and a different seed gives another pool
    again = Evaluator(art.data, art.universe, k=10, pool_size=300, seed=5)
    other = Evaluator(art.data, art.universe, k=10, pool_size=300, seed=6)
    assert np.array_equal(again.pools["pin"], ev.pools["pin"])
    assert not np.array_equal(other.pools["pin"], ev.pools["pin"])
    # pool smaller than requested: all entities of the type
    full = Evaluator(art.data, art.universe, pool_size=10_000)
    assert np.array_equal(full.pools["board"], art.universe["board"])


def test_query_and_positive_are_excluded_from_the_pool(art):
    """A constant embedder ties everything: each pool entity outscores the positive (score >= positive's)
    unless it is the query or the positive itself. With the full pin pool (500) and k = 499, a pin -> pin
    pair is a hit only if BOTH its query and positive are left out (498 < 499); a board -> pin pair only
    has its positive in the pool (499 -> miss); pin -> board pairs face 199 boards (hit)."""

    class Constant:
        def embed(self, entity_type, ids, exclude_neighbor_ids=None):
            return np.ones((len(ids), 4), dtype=np.float32) / 2.0

    ev = Evaluator(art.data, art.universe, k=499, pool_size=10_000)
    assert ev.pools["pin"].size == 500
    per_source = ev.evaluate(Constant(), tasks=("entity_entity",)).to_json()["entity_entity"]["per_source"]
    for source, res in per_source.items():
        expected = 0.0 if source.endswith("board_pin") and not source.endswith("pin_board_pin") else 1.0
        assert res["recall"] == expected, (source, res)


def test_exclusion_masks_the_pair_from_both_neighbourhoods(art, model):
    """The evaluator passes the positive as the query's excluded neighbour (and vice versa), and the
    model embedder honours it: the embedding equals the one of a batch without that neighbour."""
    ev = Evaluator(art.data, art.universe, pool_size=50)
    rec = Recording(model_embedders(model, art.builder)[0])
    ev.evaluate(rec, tasks=("entity_entity",))
    with_ex = [c for c in rec.calls if c[2] is not None]
    assert with_ex
    qids = np.concatenate([c[1] for c in with_ex if c[0] == "pin"])
    assert set(ev.pairs["query_id"].tolist()) | set(ev.pairs["pos_id"].tolist()) >= set(qids.tolist())

    # find pairs whose positive IS in the query's cached neighbourhood (graph pairs are drawn from it)
    p = ev.pairs
    rows = np.flatnonzero(np.char.startswith(p["source"], "graph_pin_pin"))
    q, pos = p["query_id"][rows], p["pos_id"][rows]
    batch = art.builder.build("pin", q)
    inside = (batch.neighbor_mask & (batch.neighbor_ids == pos[:, None])).any(1)
    assert inside.any()
    q, pos = q[inside], pos[inside]
    plain = embed_entities(model, art.builder, "pin", q)
    masked = embed_entities(model, art.builder, "pin", q, exclude_neighbor_ids=pos)
    assert not np.allclose(plain, masked, atol=1e-5)
    # -1 = nothing excluded
    same = embed_entities(model, art.builder, "pin", q, exclude_neighbor_ids=np.full(q.size, -1))
    np.testing.assert_allclose(same, plain, atol=1e-6)
    assert np.allclose(np.linalg.norm(masked, axis=1), 1.0, atol=1e-5)
    # batching does not change an embedding
    np.testing.assert_allclose(
        embed_entities(model, art.builder, "pin", q, batch_size=3, exclude_neighbor_ids=pos),
        masked,
        atol=1e-5,
    )


def test_empty_tasks_report_none_and_zero(art):
    d = art.data
    empty = TrainingData(
        pairs=d.pairs,
        eval_pairs=d.eval_pairs.slice(0, 0),
        sequences=d.sequences,
        eval_sequences=d.eval_sequences.slice(0, 0),
        feature_nodes=d.feature_nodes,
        eval_feature_nodes=d.eval_feature_nodes.slice(0, 0),
        manifest=d.manifest,
    )
    ev = Evaluator(empty, art.universe)
    rep = ev.evaluate(random_embedder(art.universe), None)
    js = rep.to_json()
    for task in ("entity_entity", "entity_feature", "user_entity"):
        assert js[task]["recall@10"] is None and js[task]["n"] == 0
    assert rep.mean_recall is None
    # a non-model embedder has no entity-feature queries; no user embedder -> user_entity null
    full = Evaluator(d, art.universe).evaluate(random_embedder(art.universe), None)
    assert full.to_json()["entity_feature"] == {"recall@10": None, "n": 0, "reason": "no g_x encoders"}
    assert full.to_json()["user_entity"]["recall@10"] is None
    assert full.mean_recall == full.recall("entity_entity")  # null tasks are left out of the mean


def test_report_shape_and_breakdowns(art):
    ev = Evaluator(art.data, art.universe)
    js = ev.evaluate(random_embedder(art.universe)).to_json()
    ee = js["entity_entity"]
    assert set(js) == {"entity_entity", "entity_feature", "user_entity"}
    assert ee["n"] == art.data.eval_pairs.num_rows
    families = [ee["graph"]["recall"], ee["engagement"]["recall"]]
    families += [r["recall"] for s, r in ee["per_source"].items() if s.startswith("coengagement_")]
    assert ee["recall@10"] == pytest.approx(np.mean(families))  # each pair family weighs the same
    assert sum(v["n"] for v in ee["per_source"].values()) == ee["n"]
    assert set(ee["per_segment"]) <= {"organic", "promoted", "shopping", "video"} and ee["per_segment"]
    # max_queries caps every task with a seeded subset
    capped = Evaluator(art.data, art.universe, max_queries=50)
    assert capped.evaluate(random_embedder(art.universe)).to_json()["entity_entity"]["n"] == 50


def test_model_embedders_cover_all_three_tasks(art, model):
    ev = Evaluator(art.data, art.universe, pool_size=200)
    ent, usr = model_embedders(model, art.builder)
    rep = ev.evaluate(ent, usr)
    js = rep.to_json()
    for task in ("entity_entity", "entity_feature", "user_entity"):
        assert js[task]["n"] > 0 and 0.0 <= js[task]["recall@10"] <= 1.0, task
    assert set(js["entity_feature"]["per_feature"]) == ({"text", "image"} if art.image_dim else {"text"})
    assert set(js["user_entity"]) >= {"next", "future"}
    assert rep.mean_recall == pytest.approx(np.mean([js[t]["recall@10"] for t in js]))
    # user embeddings: unit rows, the last history step's state; an empty history -> zeros
    hist = ev.histories[:3] + [np.zeros(0, np.int64)]
    u = embed_users(model, art.builder, hist, batch_size=2)
    assert np.allclose(np.linalg.norm(u[:3], axis=1), 1.0, atol=1e-5) and not u[3].any()
    longer = [np.concatenate([h, h]) for h in ev.histories[:3]]  # truncation keeps the most recent t_max
    assert embed_users(model, art.builder, longer).shape == (3, model.config.out_dim)
    # evaluation leaves a training model in training mode
    model.train()
    ev.evaluate(ent, usr, tasks=("entity_entity",))
    assert model.training
    model.eval()


def test_a_model_without_feature_or_user_tasks_reports_them_null(art):
    cfg, _ = small(image_dim=art.image_dim)
    ee_only = OmniSageModel(cfg.replace(tasks=("entity_entity",))).eval()
    ent, usr = model_embedders(ee_only, art.builder)
    assert usr is None
    js = Evaluator(art.data, art.universe, pool_size=100, max_queries=20).evaluate(ent, usr).to_json()
    assert js["entity_entity"]["n"] == 20
    assert js["entity_feature"]["recall@10"] is None and js["entity_feature"]["n"] == 0
    assert js["user_entity"]["recall@10"] is None and js["user_entity"]["n"] == 0


def test_inference_encodes_each_graph_node_once_with_the_same_embeddings(art, model):
    """``EncodedFeatureCache``: over one pass every graph node's features are encoded once per embedder
    (a batch without it encodes every distinct entity it names, so shared neighbours are encoded again in
    every batch), and the embeddings equal the per-batch encoding's, exclusions included."""
    from ml.inference import EncodedFeatureCache

    rows_encoded = []
    hook = model.embedders["pin"].features.register_forward_hook(
        lambda mod, args, out: rows_encoded.append(int(args[0].token_lengths.shape[0]))
    )
    try:
        pairs = Evaluator(art.data, art.universe).pairs
        sel = pairs["query_type"] == "pin"
        q, pos = pairs["query_id"][sel], pairs["pos_id"][sel]
        ids = np.concatenate([art.universe["pin"], q])
        exclude = np.concatenate([np.full(art.universe["pin"].size, -1), pos])
        plain = embed_entities(
            model,
            art.builder,
            "pin",
            ids,
            batch_size=64,
            exclude_neighbor_ids=exclude,
            feature_cache=EncodedFeatureCache(len(art.builder.snapshot.node_id), max_bytes=0),
        )
        per_batch, rows_encoded[:] = sum(rows_encoded), []
        cache = EncodedFeatureCache(len(art.builder.snapshot.node_id))
        cached = embed_entities(
            model, art.builder, "pin", ids, batch_size=64, exclude_neighbor_ids=exclude, feature_cache=cache
        )
        encoded = sum(rows_encoded)
        # the cache serves one model: another model's encoder would read this one's rows
        cfg, _ = small(image_dim=art.image_dim)
        with pytest.raises(ValueError, match="another model"):
            embed_entities(OmniSageModel(cfg).eval(), art.builder, "pin", ids[:10], feature_cache=cache)
    finally:
        hook.remove()
    np.testing.assert_allclose(cached, plain, atol=2e-5)
    graph_nodes = len(art.builder.snapshot.node_id)
    outside = int((art.builder.snapshot.lookup(np.int8(0), ids) < 0).sum())
    assert encoded <= graph_nodes + outside + ids.size // 64 + 1  # + a padding row per batch
    assert per_batch > 3 * encoded
