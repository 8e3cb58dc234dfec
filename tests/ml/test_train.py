"""Training loop tests: schedule, logging, exact checkpoint resume, a planted learning test."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import numpy as np
import pytest
import torch

from graph_engine.batch import EntityBatch, FeatureArrays
from ml.batches import PairBatch, UniformNegativeSampler
from ml.checkpoint import load_checkpoint
from ml.config import small
from ml.losses import entity_key
from ml.metrics import recall_at_k
from ml.testing import small_layout, synthetic_task_batches
from ml.train import ModelSelection, Trainer, load_model, warmup_cosine

IMG = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_warmup_then_cosine():
    lr = [warmup_cosine(s, 10, 110) for s in range(111)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(lr[:10]))  # linear warm-up
    assert all(a >= b for a, b in itertools.pairwise(lr[10:]))  # then monotone annealing
    assert lr[60] == pytest.approx(0.5, abs=1e-9) and lr[110] == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(110, 10, 110, min_ratio=0.1) == pytest.approx(0.1)


def _factory(epoch_len: int = 4, seed: int = 0):
    def factory(epoch: int):
        rng = np.random.default_rng([seed, epoch])  # deterministic per epoch: what resume relies on
        for _ in range(epoch_len):
            yield synthetic_task_batches(rng, image_dim=IMG, batch_size=6, num_negatives=6, num_users=3, seq_len=4)

    return factory


def _configs(**train_changes):
    mc, tc = small(image_dim=IMG)
    # dropout on: resuming must also restore the RNG streams to reproduce the next loss exactly
    mc = mc.replace(embedder=dataclasses.replace(mc.embedder, dropout=0.1))
    base = {
        "device": "cpu",
        "precision": "fp32",
        "warmup_steps": 2,
        "total_steps": 7,
        "log_every": 1,
        "seed": 3,
    }
    tc = tc.replace(**{**base, **train_changes})
    return mc, tc


def test_checkpoint_resume_reproduces_the_uninterrupted_run(tmp_path):
    mc, tc = _configs()
    logs_a: dict[int, dict] = {}
    full = Trainer(mc, tc, _factory(), on_log=lambda s, m: logs_a.__setitem__(s, m), progress=None)
    full.fit()
    assert sorted(logs_a) == list(range(1, 8))

    first = Trainer(mc, tc, _factory(), progress=None)
    first.fit(stop_after=3)
    ckpt = first.save(tmp_path / "ck.pt")
    state = load_checkpoint(ckpt)  # weights_only=True
    assert (
        state["step"] == 3
        and state["batch_in_epoch"] == 3
        and any(k.startswith("entity_entity/") for k in state["sketches"])
    )

    torch.manual_seed(12345)  # a different process state: only the checkpoint may matter
    np.random.seed(7)
    logs_b: dict[int, dict] = {}
    resumed = Trainer(mc, tc, _factory(), on_log=lambda s, m: logs_b.__setitem__(s, m), progress=None)
    resumed.fit(resume=ckpt)
    assert sorted(logs_b) == [4, 5, 6, 7]  # crosses the epoch boundary (4 batches per epoch)
    for s in (4, 5, 6, 7):
        for k in ("loss", "entity_entity", "entity_feature", "user_entity/next", "user_entity/future"):
            assert logs_b[s][k] == logs_a[s][k], (s, k)  # exactly, not approximately
    for (n, p), (_, q) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(p, q), n
    # a restart without the checkpoint would not reproduce it (the test can fail)
    fresh = Trainer(mc, tc.replace(total_steps=1), _factory(seed=1), on_log=lambda s, m: None, progress=None)
    fresh.fit()
    assert fresh.history[-1]["loss"] != logs_a[4]["loss"]


def test_logging_progress_line_and_checkpoint_dir(tmp_path):
    mc, tc = _configs(checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=2, log_every=2, total_steps=4)
    lines: list[str] = []
    logs: list[tuple[int, dict]] = []
    trainer = Trainer(
        mc.replace(tasks=("entity_entity", "user_entity")),
        tc,
        _factory(),
        on_log=lambda s, m: logs.append((s, m)),
        progress=lines.append,
    )
    result = trainer.fit()
    assert result.steps == 4 and [s for s, _ in logs] == [2, 4]
    m = logs[-1][1]
    assert {"loss", "entity_entity", "user_entity/next", "user_entity/future", "lr", "examples_per_s"} <= set(m)
    assert "entity_feature" not in m  # switched off
    assert m["examples_per_s"] > 0 and all(math.isfinite(v) for v in m.values())
    assert "examples/s" in lines[-1] and "entity_entity" in lines[-1]
    model = load_model(result.checkpoint)
    b = synthetic_task_batches(np.random.default_rng(0), image_dim=IMG)["entity_entity"].query
    with torch.no_grad():
        torch.testing.assert_close(model.embed(b), trainer.model.eval().embed(b))


def test_model_selection_restores_the_best_steps_sketches(tmp_path):
    """The count-min sketches are not in ``state_dict``: selection must bring back the best step's, with the
    weights (the registered model and a warm start continue from them), and keep them for a resume."""
    mc, tc = _configs(total_steps=8, checkpoint_dir=str(tmp_path))
    snaps: list[dict] = []
    scores = iter([0.1, 0.4, 0.2, 0.3])

    def score(model):
        snaps.append({n: {k: v.clone() for k, v in st.items()} for n, st in model.sketch_state_dict().items()})
        return next(scores)

    trainer = Trainer(mc, tc, _factory(), progress=None, selection=ModelSelection(score, checks=4))
    trainer.fit()
    assert trainer.selection.best_step == 4
    best, last = snaps[1], snaps[3]
    assert any(not torch.equal(best[n]["table"], last[n]["table"]) for n in best)  # the test can fail

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(
            torch.equal(a[n]["table"], b[n]["table"]) and int(a[n]["total"]) == int(b[n]["total"]) for n in a
        )

    assert same(trainer.model.sketch_state_dict(), best)
    # the checkpoint's selection state carries them, so a resumed run restores the same sketches
    resumed = ModelSelection(score)
    resumed.load_state_dict(load_checkpoint(tmp_path / "last.pt")["selection"])
    assert same(resumed.best_sketches, best)


def test_bad_precision_and_empty_factory_are_clear_errors():
    mc, tc = _configs()
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        Trainer(mc, tc.replace(precision="fp16"), _factory(), progress=None)
    with pytest.raises(ValueError, match="no batches"):
        Trainer(mc, tc, lambda epoch: iter(()), progress=None).fit()


# --------------------------------------------------------------------------------------------------------
# planted toy problem: entities of one hidden topic share topic tokens and neighbours
# --------------------------------------------------------------------------------------------------------
class _PlantedBuilder:
    """``build(entity_type, ids) -> EntityBatch`` over a planted world: N_TOPICS topics of PER_TOPIC pins.
    A pin's text is 2 of its topic's 4 tokens + 3 noise tokens; its pin_board pin block holds 3 random
    topic-mates, its pin_pin block 2 random pins (noise). Pairs are two pins of the same topic."""

    N_TOPICS, PER_TOPIC, L = 40, 5, 6

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        n = self.N_TOPICS * self.PER_TOPIC
        self.n = n
        self.topic = np.repeat(np.arange(self.N_TOPICS), self.PER_TOPIC)
        topic_vocab = rng.integers(1, 1 << 32, size=(self.N_TOPICS, 4))
        self.layout = small_layout()
        f = FeatureArrays.empty((n,), self.L, 0)
        f.present[:] = True
        f.token_lengths[:] = 5
        pick = np.argsort(rng.random((n, 4)), axis=1)[:, :2]
        f.token_ids[:, :2] = np.take_along_axis(topic_vocab[self.topic], pick, axis=1)
        f.token_ids[:, 2:5] = rng.integers(1, 1 << 32, size=(n, 3))
        f.degree[:] = rng.integers(1, 30, n)
        self.feats = f
        k = self.layout.width
        self.nb = np.full((n, k), -1, dtype=np.int64)
        self.score = np.zeros((n, k), dtype=np.float32)
        for u in range(n):
            mates = np.setdiff1d(np.flatnonzero(self.topic == self.topic[u]), [u])
            self.nb[u, 0:3] = rng.choice(mates, 3, replace=False)
            self.nb[u, 6:8] = rng.choice(n, 2, replace=False)
        self.score[:, 0:3] = [0.3, 0.2, 0.1]
        self.score[:, 6:8] = [0.05, 0.02]

    def build(self, entity_type: str, ids: np.ndarray) -> EntityBatch:
        ids = np.asarray(ids, dtype=np.int64)
        nb = self.nb[ids]
        mask = nb >= 0
        nf = self.feats.take(np.where(mask, nb, 0))
        for name in ("token_lengths", "degree"):
            getattr(nf, name)[~mask] = 0
        nf.present[~mask] = False
        nf.token_ids[~mask] = 0
        return EntityBatch(
            entity_type,
            ids,
            self.feats.take(ids),
            nb,
            nf,
            np.where(mask, self.score[ids], 0).astype(np.float32),
            mask,
            self.layout,
        )

    def pairs(self, rng: np.random.Generator, b: int) -> tuple[np.ndarray, np.ndarray]:
        q = rng.integers(0, self.n, b)
        offs = rng.integers(1, self.PER_TOPIC, b)
        base = self.topic[q] * self.PER_TOPIC
        p = base + (q - base + offs) % self.PER_TOPIC
        return q, p


def _recall(model, world: _PlantedBuilder, q: np.ndarray, p: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        all_ids = np.arange(world.n)
        emb = model.embed(world.build("pin", all_ids))
    keys = entity_key(0, torch.as_tensor(all_ids))
    r = recall_at_k(emb[q], emb[p], emb, k=10, query_keys=keys[q], positive_keys=keys[p], negative_keys=keys)
    return r.recall


def test_learning_on_a_planted_problem():
    world = _PlantedBuilder(seed=0)
    sampler = UniformNegativeSampler(np.arange(world.n), seed=0)
    eval_q, eval_p = world.pairs(np.random.default_rng(999), 200)

    def factory(epoch: int):
        rng = np.random.default_rng([1, epoch])
        for _ in range(25):
            q, p = world.pairs(rng, 32)
            neg, log_q = sampler.sample(32, rng)
            yield {
                "entity_entity": PairBatch(
                    world.build("pin", q),
                    world.build("pin", p),
                    world.build("pin", neg),
                    random_negative_log_q=log_q,
                )
            }

    mc, tc = small(image_dim=0)
    mc = mc.replace(tasks=("entity_entity",))
    tc = tc.replace(device="cpu", precision="fp32", lr=3e-3, warmup_steps=10, total_steps=150, log_every=50, seed=0)
    trainer = Trainer(mc, tc, factory, progress=None)
    before = _recall(trainer.model, world, eval_q, eval_p)
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    after = _recall(trainer.model, world, eval_q, eval_p)
    random_level = 10 / (world.n - 2)
    print(f"planted recall@10: before {before:.3f} after {after:.3f} random {random_level:.3f} ({seconds:.1f} s)")
    assert after >= max(5 * random_level, 0.5) and after > before + 0.2
    assert trainer.history[-1]["loss"] < trainer.history[0]["loss"]
