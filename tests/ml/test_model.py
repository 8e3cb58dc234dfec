"""Model tests: encoders, embedders, tasks, eq. 6 - small preset, random batches."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from graph_engine.batch import EntityBatch, FeatureArrays, NeighborBlock, NeighborhoodLayout
from ml.batches import PairBatch, SequenceBatch, make_pair_batch, make_sequence_batch
from ml.config import ModelConfig, TextHashConfig, paper, small
from ml.encoders import HashTextEncoder
from ml.entity_tensors import EntityTensors, as_entity_tensors
from ml.model import OmniSageModel
from ml.sequence_ids import dedupe_sequences
from ml.testing import random_entity_batch, synthetic_task_batches

IMG = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(image_dim=IMG, **changes) -> OmniSageModel:
    cfg, _ = small(image_dim=image_dim)
    if "aggregator" in changes:
        cfg = cfg.replace(embedder=dataclasses.replace(cfg.embedder, aggregator=changes.pop("aggregator")))
    cfg = cfg.replace(**changes)
    torch.manual_seed(0)
    return OmniSageModel(cfg)


def test_presets_follow_a3():
    m, t = paper()
    assert (m.embedder.n_layers, m.embedder.n_heads, m.embedder.d_model, m.embedder.ffn_dim) == (
        1,
        12,
        768,
        3072,
    )
    assert m.embedder.activation == "relu"
    assert (m.feature_task.layers, m.feature_task.hidden) == (4, 1024)
    assert (m.sequence.n_layers, m.sequence.n_heads, m.sequence.d_model, m.sequence.activation) == (
        4,
        4,
        512,
        "gelu",
    )
    assert t.lr == 0.005 and 10 <= m.loss.scale <= 30
    # the config round-trips through plain dicts (checkpoints, MLflow)
    assert ModelConfig.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match="tasks"):
        m.replace(tasks=("entity_entity", "nope"))


def test_hash_text_encoder_matches_per_token_reference():
    """One EmbeddingBag call == sum_j p_j(t) E[h_j(t)] averaged over the row's tokens, computed naively."""
    torch.manual_seed(0)
    enc = HashTextEncoder(TextHashConfig(num_buckets=97, num_hashes=3, importance_buckets=31, dim=5))
    with torch.no_grad():
        enc.importance.weight.normal_()
    rng = np.random.default_rng(1)
    ids = torch.as_tensor(rng.integers(0, 1 << 32, size=(6, 7)), dtype=torch.int64)
    lengths = torch.tensor([0, 1, 7, 3, 5, 2])
    vec, has = enc(ids, lengths)
    assert has.tolist() == [False, True, True, True, True, True]
    for r in range(6):
        ref = torch.zeros(5)
        n = int(lengths[r])
        for i in range(n):
            rows, imp = enc._hash(ids[r, i : i + 1])
            w = enc.importance.weight[imp[0]]
            for j in range(3):
                ref += w[j] * enc.table.weight[rows[0, j]] / n
        torch.testing.assert_close(vec[r], ref, atol=1e-6, rtol=1e-5)
    # k distinct rows per token (k hash functions), and the same token always hashes the same way
    rows, _ = enc._hash(ids[2])
    assert rows.shape == (7, 3)
    torch.testing.assert_close(enc._hash(ids[2])[0], rows)


@pytest.mark.parametrize("aggregator", ["transformer", "mean"])
@pytest.mark.parametrize("image_dim", [0, IMG])
def test_embeddings_unit_norm_and_finite(aggregator, image_dim):
    model = _model(image_dim=image_dim, aggregator=aggregator).eval()
    rng = np.random.default_rng(0)
    for t in ("pin", "board"):
        b = random_entity_batch(rng, t, 9, image_dim=image_dim)
        b.features.present[0] = False  # a node outside the feature store
        b.features.token_lengths[0] = 0
        b.neighbor_mask[1] = False  # a node outside the graph: all padding (3.5)
        b.neighbor_features.present[1] = False
        b.neighbor_features.token_lengths[1] = 0
        e = model.embed(b)
        assert e.shape == (9, model.config.out_dim) and e.dtype == torch.float32
        assert torch.isfinite(e).all()
        torch.testing.assert_close(e.norm(dim=1), torch.ones(9), atol=1e-5, rtol=0)


def _with_padding_and_garbage(
    b: EntityBatch, rng: np.random.Generator, extra: int = 2, extra_tokens: int = 3
) -> EntityBatch:
    """Same nodes; every block gets ``extra`` more (padding) columns, the token axis grows, and every masked
    slot / every token past token_lengths is filled with garbage."""
    old, new_layout = (
        b.layout,
        NeighborhoodLayout(tuple(NeighborBlock(x.subset, x.node_type, x.k + extra) for x in b.layout.blocks)),
    )
    n, k_new = len(b), new_layout.width
    ell, d = b.max_tokens + extra_tokens, b.image_dim
    cols = np.concatenate([np.arange(o2, o2 + blk.k) for o2, blk in zip(new_layout.offsets, old.blocks)])

    def widen(f: FeatureArrays, shape) -> FeatureArrays:
        g = FeatureArrays(
            token_ids=rng.integers(0, 1 << 32, size=shape + (ell,), dtype=np.int64),  # garbage everywhere ...
            token_lengths=rng.integers(0, ell + 1, size=shape).astype(np.int32),
            image=(rng.standard_normal(shape + (d,)) * 100).astype(np.float32),
            image_mask=rng.random(shape) < 0.5,
            degree=rng.integers(0, 10**6, size=shape).astype(np.float32),
            present=rng.random(shape) < 0.5,
        )
        return g

    nf = widen(b.neighbor_features, (n, k_new))
    # ... then the real neighbours' values copied into their columns (tokens past their length stay garbage)
    for name in ("token_lengths", "image", "image_mask", "degree", "present"):
        getattr(nf, name)[:, cols] = np.where(
            b.neighbor_mask.reshape(b.neighbor_mask.shape + (1,) * (getattr(b.neighbor_features, name).ndim - 2)),
            getattr(b.neighbor_features, name),
            getattr(nf, name)[:, cols],
        )
    real_tok = np.where(
        b.neighbor_mask[..., None], b.neighbor_features.token_ids, nf.token_ids[:, cols, : b.max_tokens]
    )
    live = np.arange(b.max_tokens) < b.neighbor_features.token_lengths[..., None]
    nf.token_ids[:, cols, : b.max_tokens] = np.where(live, real_tok, nf.token_ids[:, cols, : b.max_tokens])
    own = widen(b.features, (n,))
    for name in ("token_lengths", "image", "image_mask", "degree", "present"):
        getattr(own, name)[...] = getattr(b.features, name)
    own_live = np.arange(b.max_tokens) < b.features.token_lengths[:, None]
    own.token_ids[:, : b.max_tokens] = np.where(own_live, b.features.token_ids, own.token_ids[:, : b.max_tokens])
    mask = np.zeros((n, k_new), dtype=bool)
    mask[:, cols] = b.neighbor_mask
    scores = rng.random((n, k_new)).astype(np.float32) * 1e3  # garbage scores in padding slots
    scores[:, cols] = np.where(b.neighbor_mask, b.neighbor_scores, scores[:, cols])
    nb_ids = rng.integers(0, 10**6, size=(n, k_new))
    nb_ids[:, cols] = np.where(b.neighbor_mask, b.neighbor_ids, nb_ids[:, cols])
    return EntityBatch(b.entity_type, b.entity_ids, own, nb_ids, nf, scores, mask, new_layout)


@pytest.mark.parametrize("aggregator", ["transformer", "mean"])
@pytest.mark.parametrize("image_dim", [0, IMG])
def test_padding_never_changes_an_embedding(aggregator, image_dim):
    model = _model(image_dim=image_dim, aggregator=aggregator).eval()
    rng = np.random.default_rng(3)
    b = random_entity_batch(rng, "pin", 12, image_dim=image_dim, max_tokens=5)
    padded = _with_padding_and_garbage(b, rng)
    assert padded.layout.width > b.layout.width and padded.max_tokens > b.max_tokens
    with torch.no_grad():
        e1, e2 = model.embed(b), model.embed(padded)
    torch.testing.assert_close(e1, e2, atol=2e-6, rtol=0)
    # the comparison can fail: changing a REAL neighbour's features does change the embedding
    row, col = np.argwhere(b.neighbor_mask)[0]
    b.neighbor_features.degree[row, col] += 1000.0
    b.neighbor_scores[row, col] *= 0.1
    with torch.no_grad():
        e3 = model.embed(b)
    assert (e3[row] - e1[row]).abs().max() > 1e-4


def test_missing_features_use_learned_tokens():
    model = _model().eval()
    rng = np.random.default_rng(4)
    b = random_entity_batch(rng, "pin", 4, image_dim=IMG)
    b.features.present[:] = [False, True, True, True]
    b.features.token_lengths[:] = [0, 0, 3, 3]  # row 1: a record without text
    b.features.image_mask[:] = [False, False, False, True]
    t = EntityTensors.from_batch(b)
    out = model.embedders["pin"].features(t.features)
    mt = model.embedders["pin"].features.missing_text
    torch.testing.assert_close(out["text"][0], mt[0])  # no record
    torch.testing.assert_close(out["text"][1], mt[1])  # record, no text
    mi = model.embedders["pin"].features.missing_image
    torch.testing.assert_close(out["image"][2], mi[1])
    assert not torch.allclose(out["image"][3], mi[1])


def test_image_dim_zero_trains_and_mismatch_is_a_clear_error():
    model = _model(image_dim=0).train()
    batches = synthetic_task_batches(np.random.default_rng(5), image_dim=0)
    out = model(batches)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert not any("image" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="image_dim"):
        _model(image_dim=IMG).embed(random_entity_batch(np.random.default_rng(0), "pin", 2, image_dim=3))


def test_user_entity_loss_trains_the_embedder():
    """3.3.3 / A.3.2: gradients of the sequence loss alone reach f_t (the public code's no_grad would not)."""
    model = _model(tasks=("user_entity",)).train()
    batches = synthetic_task_batches(np.random.default_rng(6), image_dim=IMG)
    out = model({"user_entity": batches["user_entity"]})
    assert set(out.losses) == {"user_entity/next", "user_entity/future"}
    out.loss.backward()
    emb = model.embedders["pin"]
    for name in (
        "features.text.table.weight",
        "neighbor_mlp.0.weight",
        "encoder.layers.0.self_attn.in_proj_weight",
        "head.2.weight",
        "features.image.0.weight",
    ):
        g = dict(emb.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    # and each entity is embedded once: the batch holds unique entities only
    seq = batches["user_entity"]
    assert len(np.unique(seq.entities.entity_ids)) == len(seq.entities)


def test_next_action_respects_padding():
    """Eq. 4's padding mask: garbage embeddings behind padding must not change the loss."""
    model = _model(tasks=("user_entity",), future_action=False).eval()
    rng = np.random.default_rng(7)
    ents = random_entity_batch(rng, "pin", 6, image_dim=IMG)
    seq = np.array([[0, 1, 2, -1, -1], [3, 4, -1, -1, -1]])
    with torch.no_grad():
        l1 = model({"s": SequenceBatch(ents, seq, None, None)}).loss
        # extend the batch with more unique entities that are never referenced
        more = random_entity_batch(rng, "pin", 9, image_dim=IMG)
        from ml.testing import concat_entity_batches

        l2 = model({"s": SequenceBatch(concat_entity_batches([ents, more]), seq, None, None)}).loss
        # padding positions pointing elsewhere are not allowed: the dataclass rejects holes
    torch.testing.assert_close(l1, l2)
    with pytest.raises(ValueError, match="padding"):
        SequenceBatch(ents, np.array([[0, -1, 2]]), None, None)


def test_switching_tasks_off_and_eq6_weights():
    rng = np.random.default_rng(8)
    batches = synthetic_task_batches(rng, image_dim=IMG)
    full = _model(lambda_p=1.0, lambda_f=1.0, lambda_s=1.0).eval()
    with torch.no_grad():
        out = full(batches)
    assert set(out.losses) == {"entity_entity", "entity_feature", "user_entity/next", "user_entity/future"}
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    weighted = _model(lambda_p=0.5, lambda_f=2.0, lambda_s=3.0).eval()
    with torch.no_grad():
        out_w = weighted(batches)
    l = out_w.losses
    torch.testing.assert_close(
        out_w.loss,
        0.5 * l["entity_entity"] + 2.0 * l["entity_feature"] + 3.0 * (l["user_entity/next"] + l["user_entity/future"]),
    )
    only_pair = _model(tasks=("entity_entity",)).eval()
    assert "entity_feature" not in only_pair.tasks and "user_entity" not in only_pair.tasks
    with torch.no_grad():
        out_p = only_pair(batches)  # batches of switched-off tasks are skipped
    assert set(out_p.losses) == {"entity_entity"}
    torch.testing.assert_close(out_p.loss, out.losses["entity_entity"])
    no_feat = _model(tasks=("entity_entity", "user_entity")).eval()
    with torch.no_grad():
        assert "entity_feature" not in no_feat(batches).losses


def test_sketch_updates_in_training_only_and_corrects_logits():
    model = _model(tasks=("entity_entity",))
    batches = {"entity_entity": synthetic_task_batches(np.random.default_rng(9), image_dim=IMG)["entity_entity"]}
    model.eval()
    with torch.no_grad():
        l_eval = model(batches).loss
    assert model.sketch("entity_entity/board").total == 0
    model.train()
    model(batches)
    assert model.sketch("entity_entity/board").total == len(batches["entity_entity"])
    # without the correction the loss differs (in-batch log Q is non-zero once the sketch has counts)
    no_corr = _model(
        tasks=("entity_entity",), loss=dataclasses.replace(model.config.loss, logq_correction=False)
    ).eval()
    with torch.no_grad():
        assert not torch.allclose(no_corr(batches).loss, l_eval)


def test_learned_scale_is_clamped_and_gets_gradient():
    cfg, _ = small(image_dim=IMG)
    loss_cfg = dataclasses.replace(cfg.loss, learn_scale=True, scale=100.0, scale_max=30.0)
    model = OmniSageModel(cfg.replace(loss=loss_cfg, tasks=("entity_entity",)))
    assert float(model.scale().detach()) == 30.0
    model2 = OmniSageModel(cfg.replace(loss=dataclasses.replace(loss_cfg, scale=20.0)))
    out = model2(synthetic_task_batches(np.random.default_rng(10), image_dim=IMG))
    out.loss.backward()
    assert model2.log_scale.grad is not None and model2.log_scale.grad.abs() > 0


def test_chunked_and_unchunked_losses_agree_through_the_model():
    rng = np.random.default_rng(11)
    batches = synthetic_task_batches(rng, image_dim=IMG, batch_size=10, num_users=5)
    a = _model(loss=dataclasses.replace(small()[0].loss, chunk_size=3)).eval()
    b = _model(loss=dataclasses.replace(small()[0].loss, chunk_size=None)).eval()
    with torch.no_grad():
        la, lb = a(batches), b(batches)
    for k in la.losses:
        torch.testing.assert_close(la.losses[k], lb.losses[k], atol=1e-5, rtol=1e-5)


class _FakeBuilder:
    """BatchBuilder stand-in: build(entity_type, ids) -> EntityBatch."""

    def __init__(self):
        self.calls = []

    def build(self, entity_type, entity_ids):
        self.calls.append((entity_type, np.asarray(entity_ids).copy()))
        return random_entity_batch(
            np.random.default_rng(len(self.calls)),
            entity_type,
            len(entity_ids),
            entity_ids=np.asarray(entity_ids),
            image_dim=IMG,
        )


def test_batches_from_id_arrays_with_a_batch_builder():
    builder = _FakeBuilder()
    pb = make_pair_batch(
        builder,
        "pin",
        np.array([1, 2, 3]),
        "board",
        np.array([7, 8, 9]),
        np.array([5, 6]),
        negative_log_q=-3.0,
        weights=np.array([1.0, 2.0, 1.0]),
    )
    assert isinstance(pb, PairBatch) and pb.positive.entity_type == "board" and len(pb.random_negatives) == 2
    seqs = np.array([[10, 11, 10, -1], [11, 12, -1, -1]])
    uniq, idx, fut = dedupe_sequences(seqs, np.array([13, -1]))
    assert uniq.tolist() == [10, 11, 12, 13]
    assert idx.tolist() == [[0, 1, 0, -1], [1, 2, -1, -1]] and fut.tolist() == [3, -1]
    sb = make_sequence_batch(builder, "pin", seqs, np.array([13, -1]), np.array([99, 98]))
    assert builder.calls[-2][1].tolist() == [10, 11, 12, 13]  # each entity built (and embedded) once
    model = _model()
    out = model({"pairs": pb, "seq": sb})
    assert set(out.losses) == {"pairs", "seq/next", "seq/future"} and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="random_negatives"):
        PairBatch(pb.query, pb.positive, pb.query)  # negatives must have the positive's type


def test_tensorized_batches_give_the_same_loss():
    from ml.batches import tensorize_step

    def factory(epoch):
        rng = np.random.default_rng([5, epoch])
        for _ in range(2):
            yield synthetic_task_batches(rng, image_dim=IMG)

    model = _model().eval()
    got = [tensorize_step(step) for step in factory(0)]
    assert len(got) == 2 and isinstance(got[0]["entity_entity"].query, EntityTensors)
    with torch.no_grad():
        for tensorized, raw in zip(got, factory(0)):
            torch.testing.assert_close(model(tensorized).loss, model(raw).loss)


def test_user_embeddings_at_the_last_valid_step():
    model = _model().eval()
    s = synthetic_task_batches(np.random.default_rng(12), image_dim=IMG)["user_entity"]
    u = model.user_embeddings(s)
    assert u.shape == (len(s), model.config.out_dim)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(len(s)), atol=1e-5, rtol=0)
    # causal: appending steps after a user's last valid one does not change earlier states
    seq = np.asarray(s.sequence_index).copy()
    short = seq.copy()
    short[0, 2:] = -1
    u_short = model.user_embeddings(dataclasses.replace(s, sequence_index=short))
    full_states = model.tasks["user_entity"].user_states(
        model.embed(s.entities)[torch.as_tensor(seq).clamp_min(0)] * torch.as_tensor(seq >= 0)[..., None],
        torch.as_tensor(seq >= 0),
    )
    torch.testing.assert_close(u_short[0], full_states[0, 1], atol=1e-5, rtol=1e-5)


def test_a_zero_width_neighbourhood_layout_embeds_and_encodes_features():
    """ "No graph" (Table 3's ablation): a layout without neighbour blocks must embed entities and give the
    entity-feature queries, with finite outputs of the model's width (it crashed in a reshape before)."""
    from ml.entity_tensors import as_entity_tensors
    from ml.model import OmniSageModel

    cfg, _ = small(image_dim=0)
    model = OmniSageModel(cfg).eval()
    batch = EntityBatch(
        "pin",
        np.arange(3, dtype=np.int64),
        FeatureArrays.empty((3,), 4, 0),
        np.zeros((3, 0), np.int64),
        FeatureArrays.empty((3, 0), 4, 0),
        np.zeros((3, 0), np.float32),
        np.zeros((3, 0), bool),
        NeighborhoodLayout(()),
    )
    with torch.no_grad():
        emb = model.embed(batch)
        queries = model.tasks["entity_feature"].queries(as_entity_tensors(batch, "cpu", "zero-width"))
    assert emb.shape == (3, cfg.out_dim) and torch.isfinite(emb).all()
    assert queries and all(q.shape == (3, cfg.out_dim) and torch.isfinite(q).all() for q, _ in queries.values())


def _same_content_batch(ids, neighbour, degree=3.0) -> EntityBatch:
    """Pins ``ids`` with identical features (of ``degree`` in the day's graph) and one neighbour each."""
    n = len(ids)
    own = FeatureArrays.empty((n,), 4, 0)
    own.degree[:] = degree
    return EntityBatch(
        "pin",
        np.asarray(ids, np.int64),
        own,
        np.full((n, 1), neighbour, np.int64),
        FeatureArrays.empty((n, 1), 4, 0),
        np.ones((n, 1), np.float32),
        np.ones((n, 1), bool),
        NeighborhoodLayout((NeighborBlock("pin_pin", "pin", 1),)),
    )


def _identity_model(buckets: int, id_dropout: float = 0.0) -> OmniSageModel:
    cfg, _ = small(image_dim=0)
    torch.manual_seed(0)
    embedder = dataclasses.replace(cfg.embedder, id_buckets=buckets, id_dropout=id_dropout)
    return OmniSageModel(cfg.replace(embedder=embedder)).eval()


def test_the_identity_token_tells_apart_entities_with_the_same_content():
    """Two pins with the same features and neighbours are one point for a content-only f_t (the paper's),
    two points with the identity token (``EmbedderConfig.id_buckets``); a neighbour's identity changes u's
    embedding too. Without the token the neighbour ids are never read."""
    for buckets in (0, 64):
        model = _identity_model(buckets)
        with torch.no_grad():
            a, b = model.embed(_same_content_batch([11, 12], 7))
            c = model.embed(_same_content_batch([11], 8))[0]
        assert torch.allclose(a, b, atol=1e-5) == (buckets == 0)
        assert torch.allclose(a, c, atol=1e-5) == (buckets == 0)


def test_a_cold_entity_is_embedded_from_content_and_graph_alone():
    """An entity of degree 0 (no engagement in the window: its ID row was only ever a random negative) gets no
    identity token: two cold pins with the same content are one point, whatever their ids."""
    model = _identity_model(64)
    with torch.no_grad():
        a, b = model.embed(_same_content_batch([11, 12], 7, degree=0.0))
    assert torch.allclose(a, b, atol=1e-5)


def test_id_dropout_zeroes_identity_tokens_in_training_only():
    """``id_dropout``: in training a share of rows lose their identity tokens (the content + graph path
    trains alone on them); in eval every warm entity keeps its token."""
    model = _identity_model(64, id_dropout=0.5)
    x = as_entity_tensors(_same_content_batch(list(range(400)), 7), "cpu")
    emb = model.embedders["pin"]
    ident = lambda: emb.tokens(x)[0][:, emb.num_own - 1] - emb.own_kind[emb.num_own - 1]
    with torch.no_grad():
        assert (ident().abs().sum(1) > 0).all()
        emb.train()
        kept = (ident().abs().sum(1) > 0).float().mean().item()
    assert 0.35 < kept < 0.65


def test_the_query_entity_is_never_its_own_negative():
    """Pin pairs 1 -> 2 and 2 -> 1 with random negatives pins 1 and 2: every candidate other than the target
    is the query itself or its positive again, so eq. 1 has nothing left to contrast and the loss is 0."""
    rng = np.random.default_rng(3)
    model = _model(tasks=("entity_entity",)).eval()
    pins = lambda ids: random_entity_batch(rng, "pin", len(ids), entity_ids=np.asarray(ids, np.int64), image_dim=IMG)
    batch = PairBatch(query=pins([1, 2]), positive=pins([2, 1]), random_negatives=pins([1, 2]))
    with torch.no_grad():
        loss = model({"entity_entity": batch}).loss
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_log_q_comes_from_one_sketch_per_positive_type():
    """A pin -> pin and a pin -> board sub-batch of 8 distinct positives each: each type's sketch has seen
    its own 8, so every in-batch log Q = log(1 - (1 - 1/8)^8), the inclusion probability of p = 1/8 in B = 8
    draws (one shared sketch gives the second sub-batch p = 1/16)."""
    rng = np.random.default_rng(4)
    model = _model(tasks=("entity_entity",)).train()
    ent = lambda t, ids: random_entity_batch(rng, t, len(ids), entity_ids=np.asarray(ids, np.int64), image_dim=IMG)
    batches = {
        "pp": PairBatch(query=ent("pin", range(8)), positive=ent("pin", range(100, 108))),
        "pb": PairBatch(query=ent("pin", range(8)), positive=ent("board", range(200, 208))),
    }
    seen = []
    real = model.softmax_loss

    def spy(query, c, *args, **kwargs):
        seen.append(c.positive_log_q.detach().clone())
        return real(query, c, *args, **kwargs)

    model.softmax_loss = spy
    model(batches)
    expected = torch.full((8,), math.log(1 - (7 / 8) ** 8))
    assert len(seen) == 2 and all(torch.allclose(lq, expected) for lq in seen)
    assert model.sketch("entity_entity/pin").total == 8 and model.sketch("entity_entity/board").total == 8


def test_sketches_of_old_checkpoints_are_dropped_with_a_warning():
    from ml.count_min_sketch import CountMinSketch

    model = _model(tasks=("entity_entity",))
    cfg = model.config.loss
    old = CountMinSketch(cfg.sketch_width, cfg.sketch_depth, cfg.sketch_seed)
    old.update(torch.arange(5))
    typed = CountMinSketch(cfg.sketch_width, cfg.sketch_depth, cfg.sketch_seed)
    typed.update(torch.arange(3))
    state = {"entity_entity": old.state_dict(), "entity_entity/board": typed.state_dict()}
    with pytest.warns(UserWarning, match="not per positive type"):
        model.load_sketch_state_dict(state)
    assert set(model.sketch_state_dict()) == {"entity_entity/board"}
    assert model.sketch("entity_entity/board").total == 3


def test_entity_feature_queries_are_per_node_and_averaged_as_eq3():
    """Eq. 3 read per node: g_x(w) of ONE node's raw x-features for w = u and every live neighbour v, each a
    query against f(u) over the same candidates; mean over S_x(u), then over X_u, then over the batch."""
    import math

    from ml.batches import FeatureTaskBatch
    from ml.losses import entity_key

    rng = np.random.default_rng(5)
    model = _model(tasks=("entity_feature",)).eval()
    batch = FeatureTaskBatch(
        nodes=random_entity_batch(rng, "pin", 4, image_dim=IMG),
        random_negatives=random_entity_batch(rng, "pin", 3, image_dim=IMG),
        random_negative_log_q=-2.0,
    )
    task = model.tasks["entity_feature"]
    with torch.no_grad():
        got = model({"f": batch}).loss.item()
        (pos, neg), (x, xn) = model.embed_many([batch.nodes, batch.random_negatives])
        t = x.table
        vec, has_text = task.text(t.token_ids, torch.where(t.present, t.token_lengths, 0))
        has_img = t.image_mask & t.present
        raw = {"text": (vec, has_text), "image": (torch.where(has_img[:, None], t.image, 0), has_img)}
        cands = torch.cat([pos, neg])
        keys = torch.cat([model.keys(x), model.keys(xn)]).tolist()
        nb_keys = entity_key(x.column_node_type[None, :].expand_as(x.neighbor_ids), x.neighbor_ids)
        lam, total, neighbour_queries = model.scale(), 0.0, 0
        for u in range(len(x)):
            slots = [(int(x.own_row[u]), keys[u])] + [
                (int(x.neighbor_row[u, j]), int(nb_keys[u, j]))
                for j in range(x.neighbor_mask.shape[1])
                if x.neighbor_mask[u, j]
            ]
            per_x = []
            for kind, (feat, has) in raw.items():
                ls = []
                for row, wkey in slots:
                    if not has[row]:
                        continue
                    neighbour_queries += row != int(x.own_row[u])
                    q = torch.nn.functional.normalize(task.g[kind](feat[row][None]), dim=-1)[0]
                    kept = [j for j in range(len(keys)) if j == u or keys[j] not in (keys[u], wkey)]
                    logits = [lam * float(q @ cands[j]) - (-2.0 if j >= len(x) else 0.0) for j in kept]
                    ls.append(math.log(sum(math.exp(v) for v in logits)) - logits[kept.index(u)])
                if ls:
                    per_x.append(sum(ls) / len(ls))
            total += sum(per_x) / len(per_x) if per_x else 0.0
    assert neighbour_queries > 0 and got == pytest.approx(total / len(x), rel=1e-4)
    # evaluation queries: g_x(u) of the node's own features, where u has x
    with torch.no_grad():
        q_eval = task.queries(x)
    for kind, (feat, has) in raw.items():
        q, avail = q_eval[kind]
        assert torch.equal(avail, has[x.own_row])
        want = torch.nn.functional.normalize(task.g[kind](feat[x.own_row]), dim=-1)
        torch.testing.assert_close(q[avail], want[avail])
