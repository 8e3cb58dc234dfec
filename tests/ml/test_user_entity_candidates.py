"""User-entity future-action loss (eq. 5): each user's future positive is ONE candidate, the target of all of
that user's queries U_t (not T copies, which every other user would see as T negatives)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ml.batches import SequenceBatch
from ml.config import small
from ml.model import OmniSageModel
from ml.tasks.user_entity import loss_positions
from ml.testing import random_entity_batch

IMG = 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_future_candidates_once_per_user_with_targets():
    seq = torch.tensor([[0, 1, 2], [3, 4, -1], [5, -1, -1], [6, 7, 8]])
    fut = torch.tensor([9, 10, -1, 11])  # user 2 has no future action
    where, cand, tgt = loss_positions(seq, fut, next_action=False, future_action=True)["future"]
    assert cand.tolist() == [9, 10, 11]  # each future positive once
    assert where.tolist() == [0, 1, 2, 3, 4, 9, 10, 11]  # every valid (u, t) of a user with a future
    assert tgt.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # ... aimed at its user's candidate
    where, cand, tgt = loss_positions(seq, fut, next_action=True, future_action=False)["next"]
    assert cand.tolist() == [1, 2, 4, 7, 8] and tgt is None  # next action: one positive per query


def test_future_action_loss_equals_hand_computed():
    """3 users x 2 steps, distinct future entities, 2 random negatives; training mode, so the sketch counts
    each user's future once: p = 1/3 per entity, B = 3 draws, log Q = log(1 - (2/3)^3)."""
    mc, _ = small(image_dim=IMG)
    mc = mc.replace(tasks=("user_entity",), next_action=False, future_action=True)
    torch.manual_seed(0)
    model = OmniSageModel(mc).train()
    rng = np.random.default_rng(0)
    ents = random_entity_batch(rng, "pin", 9, entity_ids=np.arange(100, 109, dtype=np.int64), image_dim=IMG)
    negs = random_entity_batch(rng, "pin", 2, entity_ids=np.array([500, 501], np.int64), image_dim=IMG)
    seq = np.array([[0, 1], [2, 3], [4, 5]])
    fut = np.array([6, 7, 8])
    rnd_lq = math.log(2 / 1000)
    batch = SequenceBatch(ents, seq, fut, negs, random_negative_log_q=rnd_lq)
    seen = []
    real = model.softmax_loss

    def spy(query, c, *args, **kwargs):
        seen.append(c)
        return real(query, c, *args, **kwargs)

    model.softmax_loss = spy
    with torch.no_grad():
        got = model({"s": batch}).losses["s/future"]
        p = model.embed(ents)
        n = model.embed(negs)
        states = model.tasks["user_entity"].user_states(p[torch.as_tensor(seq)], torch.ones(3, 2, dtype=torch.bool))
    (c,) = seen
    assert c.positive.shape[0] == 3 and c.num_candidates == 3 + 2  # one future positive per user
    assert model.sketch("user_entity/future/pin").total == 3
    lam = mc.loss.scale
    in_batch_lq = math.log(1 - (2 / 3) ** 3)
    cands = [(p[6 + u], in_batch_lq) for u in range(3)] + [(n[j], rnd_lq) for j in range(2)]
    total = 0.0
    for u in range(3):
        for t in range(2):
            logits = [lam * float(states[u, t] @ v) - lq for v, lq in cands]
            total += math.log(sum(math.exp(x) for x in logits)) - logits[u]
    assert got.item() == pytest.approx(total / 6, rel=1e-5)
