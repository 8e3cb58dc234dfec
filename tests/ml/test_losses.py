"""Sampled softmax of eq. 1 (ml/losses.py): logQ correction, accidental hits, weights, lambda, entity keys."""

import math

import numpy as np
import pytest
import torch

from ml.losses import entity_key, sampled_softmax_loss


def reference_loss(q, p, n, scale, plq=None, nlq=None, pk=None, nk=None, w=None):
    """Plain-Python eq. 1, one query and one candidate at a time (independent of the implementation)."""
    b, m = len(q), len(n)
    cands = [(p[j], plq[j] if plq is not None else 0.0, pk[j] if pk is not None else None) for j in range(b)]
    cands += [(n[j], nlq[j] if nlq is not None else 0.0, nk[j] if nk is not None else None) for j in range(m)]
    keyed = [key for _, _, key in cands] if pk is not None else [None] * len(cands)
    last = {key: j for j, key in enumerate(keyed) if key is not None}  # one column per entity: its last
    total = 0.0
    for i in range(b):
        logits = []
        for j, (c, lq, key) in enumerate(cands):
            if j != i and pk is not None and key is not None and key == pk[i]:
                continue  # accidental hit: not a negative
            if j != i and keyed[j] is not None and last[keyed[j]] != j:
                continue  # a duplicate column of another candidate entity
            logits.append((j, scale * sum(a * bb for a, bb in zip(q[i], c)) - lq))
        mx = max(v for _, v in logits)
        lse = mx + math.log(sum(math.exp(v - mx) for _, v in logits))
        l_i = lse - dict(logits)[i]
        total += (w[i] if w is not None else 1.0) * l_i
    return total / b


def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_logq_correction_hand_computed():
    # Two queries, one random negative, d = 2. lambda = 2.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    n = torch.tensor([[0.6, 0.8]])
    plq = torch.log(torch.tensor([0.5, 0.25]))  # sketch: in-batch inclusion probabilities of P_0, P_1
    nlq = math.log(0.1)  # random sampler's probability of N_0
    loss = sampled_softmax_loss(q, p, n, scale=2.0, positive_log_q=plq, negative_log_q=nlq)
    # Query 0: s(P0) = 2*1 - log .5, s(P1) = 2*0 - log .25, s(N0) = 2*.6 - log .1 ; target P0.
    s00, s01, s0n = 2 - math.log(0.5), 0 - math.log(0.25), 1.2 - math.log(0.1)
    l0 = -s00 + math.log(math.exp(s00) + math.exp(s01) + math.exp(s0n))
    # Query 1: s(P0) = 0 - log .5, s(P1) = 2 - log .25, s(N0) = 1.6 - log .1 ; target P1.
    s10, s11, s1n = 0 - math.log(0.5), 2 - math.log(0.25), 1.6 - math.log(0.1)
    l1 = -s11 + math.log(math.exp(s10) + math.exp(s11) + math.exp(s1n))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # Each sampler's log Q goes to its own candidates only: swapping them changes the value.
    swapped = sampled_softmax_loss(
        q,
        p,
        n,
        scale=2.0,
        positive_log_q=torch.full((2,), math.log(0.1)),
        negative_log_q=torch.tensor([math.log(0.5)]),
    )
    assert abs(swapped.item() - loss.item()) > 0.1
    # Without a correction the plain softmax of lambda * q.c.
    plain = sampled_softmax_loss(q, p, n, scale=2.0)
    l0p = -2 + math.log(math.exp(2) + 1 + math.exp(1.2))
    l1p = -2 + math.log(1 + math.exp(2) + math.exp(1.6))
    assert plain.item() == pytest.approx((l0p + l1p) / 2, rel=1e-6)


def test_logq_float_equals_constant_tensor():
    q, p, n = unit(5, 4, seed=1), unit(5, 4, seed=2), unit(7, 4, seed=3)
    a = sampled_softmax_loss(q, p, n, scale=10.0, negative_log_q=-3.0)
    b = sampled_softmax_loss(q, p, n, scale=10.0, negative_log_q=torch.full((7,), -3.0))
    assert torch.equal(a, b)


def test_accidental_hits_masked():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]])
    n = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    pk = torch.tensor([5, 5, 7])  # queries 0 and 1 share a positive entity
    nk = torch.tensor([5, 9])  # negative 0 is that entity too
    loss = sampled_softmax_loss(q, p, n, scale=3.0, positive_keys=pk, negative_keys=nk)
    ref = reference_loss(q.tolist(), p.tolist(), n.tolist(), 3.0, pk=pk.tolist(), nk=nk.tolist())
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    # Query 0 keeps only {P0 (target), P2, N1}: check its term by hand. Query 2 sees entity 5 once, in its
    # last column N0 (one column per distinct entity).
    s = lambda a, b: 3.0 * float(torch.dot(a, b))
    l0 = -s(q[0], p[0]) + math.log(sum(math.exp(s(q[0], c)) for c in (p[0], p[2], n[1])))
    l1 = -s(q[1], p[1]) + math.log(sum(math.exp(s(q[1], c)) for c in (p[1], p[2], n[1])))
    l2 = -s(q[2], p[2]) + math.log(sum(math.exp(s(q[2], c)) for c in (p[2], n[0], n[1])))
    assert loss.item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-6)
    unmasked = sampled_softmax_loss(q, p, n, scale=3.0)
    assert unmasked.item() > loss.item() + 0.1  # masking removed hard "negatives" that were positives
    # Without negative_keys only the in-batch duplicates are masked (query 2 keeps P1, entity 5's last copy).
    partial = sampled_softmax_loss(q, p, n, scale=3.0, positive_keys=pk)
    ref_partial = reference_loss(q.tolist(), p.tolist(), n.tolist(), 3.0, pk=pk.tolist())
    assert partial.item() == pytest.approx(ref_partial, rel=1e-6)
    # (and N0, unrecognised, stays in every softmax)
    l0p = -s(q[0], p[0]) + math.log(sum(math.exp(s(q[0], c)) for c in (p[0], p[2], n[0], n[1])))
    l1p = -s(q[1], p[1]) + math.log(sum(math.exp(s(q[1], c)) for c in (p[1], p[2], n[0], n[1])))
    l2p = -s(q[2], p[2]) + math.log(sum(math.exp(s(q[2], c)) for c in (p[1], p[2], n[0], n[1])))
    assert partial.item() == pytest.approx((l0p + l1p + l2p) / 3, rel=1e-6)


def test_masked_candidates_get_no_gradient():
    q, p, n = unit(3, 4, seed=4), unit(3, 4, seed=5), unit(2, 4, seed=6)
    p.requires_grad_(True)
    n.requires_grad_(True)
    pk = torch.tensor([1, 1, 1])  # every query has the same positive entity ...
    nk = torch.tensor([1, 1])  # ... and both random negatives are that entity too
    loss = sampled_softmax_loss(q, p, n, scale=10.0, positive_keys=pk, negative_keys=nk)
    loss.backward()
    assert loss.item() == 0.0  # only the target is left in each softmax
    assert torch.all(n.grad == 0) and torch.all(p.grad == 0)
    # one real negative for query 0 only: only query 0's gradient reaches it
    n.grad = None
    sampled_softmax_loss(q, p, n, scale=10.0, positive_keys=pk, negative_keys=torch.tensor([1, 2])).backward()
    assert torch.all(n.grad[0] == 0) and torch.any(n.grad[1] != 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_with_everything(seed):
    b, m, d = 6, 5, 3
    q, p, n = unit(b, d, seed=seed), unit(b, d, seed=seed + 10), unit(m, d, seed=seed + 20)
    g = torch.Generator().manual_seed(seed)
    plq = -torch.rand(b, generator=g, dtype=torch.float64) * 3
    nlq = -torch.rand(m, generator=g, dtype=torch.float64) * 3
    pk = torch.randint(0, 3, (b,), generator=g)
    nk = torch.randint(0, 4, (m,), generator=g)
    w = torch.rand(b, generator=g, dtype=torch.float64) * 2
    for cs in (None, 4):
        loss = sampled_softmax_loss(
            q,
            p,
            n,
            scale=7.0,
            positive_log_q=plq,
            negative_log_q=nlq,
            positive_keys=pk,
            negative_keys=nk,
            weights=w,
            chunk_size=cs,
        )
        ref = reference_loss(
            q.tolist(),
            p.tolist(),
            n.tolist(),
            7.0,
            plq.tolist(),
            nlq.tolist(),
            pk.tolist(),
            nk.tolist(),
            w.tolist(),
        )
        assert loss.item() == pytest.approx(ref, rel=1e-10)


def test_weights_are_mean_of_weighted_terms():
    q, p, n = unit(4, 3, seed=7), unit(4, 3, seed=8), unit(3, 3, seed=9)
    per = []
    for i in range(4):
        onehot = torch.zeros(4, dtype=torch.float64)
        onehot[i] = 4.0  # mean over B = 4 of 4 * l_i * 1{i} = l_i
        per.append(sampled_softmax_loss(q, p, n, scale=5.0, weights=onehot).item())
    w = torch.tensor([2.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    loss = sampled_softmax_loss(q, p, n, scale=5.0, weights=w)
    assert loss.item() == pytest.approx(sum(wi * li for wi, li in zip(w.tolist(), per)) / 4, rel=1e-10)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradcheck_including_scale_logq_and_weights(chunk_size):
    b, m, d = 5, 4, 3
    q = unit(b, d, seed=11).requires_grad_()
    p = unit(b, d, seed=12).requires_grad_()
    n = unit(m, d, seed=13).requires_grad_()
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    plq = (-torch.rand(b, dtype=torch.float64)).requires_grad_()
    nlq = (-torch.rand(m, dtype=torch.float64)).requires_grad_()
    w = torch.rand(b, dtype=torch.float64).requires_grad_()
    pk = torch.tensor([1, 2, 1, 3, 4])
    nk = torch.tensor([2, 9, 9, 3])

    def f(q, p, n, scale, plq, nlq, w):
        return sampled_softmax_loss(
            q,
            p,
            n,
            scale=scale,
            positive_log_q=plq,
            negative_log_q=nlq,
            positive_keys=pk,
            negative_keys=nk,
            weights=w,
            chunk_size=chunk_size,
        )

    assert torch.autograd.gradcheck(f, (q, p, n, scale, plq, nlq, w))


def test_scale_gets_gradient_and_larger_scale_sharpens():
    q, p, n = unit(8, 4, seed=14), unit(8, 4, seed=15), unit(16, 4, seed=16)
    p = q + 0.1 * p  # positives close to their queries
    p = torch.nn.functional.normalize(p, dim=-1)
    scale = torch.nn.Parameter(torch.tensor([10.0], dtype=torch.float64))  # shape [1] is accepted
    loss = sampled_softmax_loss(q, p, n, scale=scale)
    loss.backward()
    assert scale.grad is not None and scale.grad.shape == (1,)
    assert scale.grad.item() < 0  # aligned positives: a sharper softmax lowers the loss
    assert sampled_softmax_loss(q, p, n, scale=30.0) < sampled_softmax_loss(q, p, n, scale=0.07)


def test_no_negatives_and_empty_batch():
    q, p = unit(4, 3, seed=17), unit(4, 3, seed=18)
    a = sampled_softmax_loss(q, p, None, scale=5.0)
    ref = reference_loss(q.tolist(), p.tolist(), [], 5.0)
    assert a.item() == pytest.approx(ref, rel=1e-10)
    qe = torch.zeros(0, 3, requires_grad=True)
    e = sampled_softmax_loss(qe, torch.zeros(0, 3), torch.zeros(2, 3), scale=5.0, chunk_size=4)
    e.backward()
    assert e.item() == 0.0 and qe.grad is not None


def test_bad_inputs_name_the_argument():
    q = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="positive"):
        sampled_softmax_loss(q, torch.zeros(2, 4), None, scale=1.0)
    with pytest.raises(ValueError, match="negatives"):
        sampled_softmax_loss(q, q, torch.zeros(2, 5), scale=1.0)
    with pytest.raises(ValueError, match="positive_log_q"):
        sampled_softmax_loss(q, q, None, scale=1.0, positive_log_q=torch.zeros(2))
    with pytest.raises(TypeError, match="positive_keys"):
        sampled_softmax_loss(q, q, None, scale=1.0, positive_keys=torch.zeros(3))
    with pytest.raises(ValueError, match="weights"):
        sampled_softmax_loss(q, q, None, scale=1.0, weights=torch.ones(4))
    with pytest.raises(ValueError, match="scale"):
        sampled_softmax_loss(q, q, None, scale=torch.ones(2))
    with pytest.raises(ValueError, match="chunk_size"):
        sampled_softmax_loss(q, q, None, scale=1.0, chunk_size=0)


def test_entity_key():
    ids = np.array([0, 5, 5, 2**40], dtype=np.int64)
    pins = entity_key(0, ids)
    boards = entity_key(1, ids)
    assert pins.dtype == torch.int64 and pins.tolist() == [0, 20, 20, 2**42]
    assert boards.tolist() == [1, 21, 21, 2**42 + 1]
    assert not set(pins.tolist()) & set(boards.tolist())  # a pin and a board with the same id differ
    mixed = entity_key(torch.tensor([0, 1]), torch.tensor([7, 7]))
    assert mixed.tolist() == [28, 29]
    # decodable: id = key >> 2 (floor), type = key & 3, also for negative ids
    k = entity_key(1, torch.tensor([-3]))
    assert int(k >> 2) == -3 and int(k & 3) == 1
    with pytest.raises(ValueError, match="type_code"):
        entity_key(4, ids)
    with pytest.raises(TypeError, match="ids"):
        entity_key(0, np.array([1.5]))
    # every int64 id gets a key (the contract allows any): ids inside [-2**61, 2**61) keep theirs exactly
    extreme = np.array([-(2**63), 2**63 - 1, -(2**61), 2**61 - 1, 2**62], dtype=np.int64)
    keys = entity_key(0, extreme)
    assert (keys[2:4] >> 2).tolist() == [-(2**61), 2**61 - 1] and len(set(keys.tolist())) == 4
    assert set(entity_key(1, extreme).tolist()).isdisjoint(keys.tolist())


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_query_entity_is_masked_as_a_candidate(chunk_size):
    # Pin 5 queries for pin 7; pin 5 is also pair 1's positive and random negative 0: both are the query
    # itself (logit lambda * 1) and must leave query 0's softmax, while query 1 keeps P0 (its negative).
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    n = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    pk, nk, qk = torch.tensor([7, 5]), torch.tensor([5, 11]), torch.tensor([5, 9])
    loss = sampled_softmax_loss(
        q, p, n, scale=3.0, positive_keys=pk, negative_keys=nk, query_keys=qk, chunk_size=chunk_size
    )
    s = lambda a, b: 3.0 * float(torch.dot(a, b))
    l0 = -s(q[0], p[0]) + math.log(sum(math.exp(s(q[0], c)) for c in (p[0], n[1])))
    # query 1's positive is pin 5, so negative 0 (pin 5) is an accidental hit for it already
    l1 = -s(q[1], p[1]) + math.log(sum(math.exp(s(q[1], c)) for c in (p[0], p[1], n[1])))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    unmasked = sampled_softmax_loss(q, p, n, scale=3.0, positive_keys=pk, negative_keys=nk, chunk_size=chunk_size)
    assert unmasked.item() > loss.item() + 0.1


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_targets_let_several_queries_share_one_positive(chunk_size):
    # n = 5 queries onto B = 2 positives: query i's softmax runs over the B + M candidates with target
    # tg[i]; candidates with the key of its positive or of the query entity (other than the target) leave it.
    q, p, n = unit(5, 4, seed=7), unit(2, 4, seed=8), unit(3, 4, seed=9)
    tg = torch.tensor([0, 0, 1, 1, 1])
    pk, nk, qk = torch.tensor([1, 2]), torch.tensor([3, 4, 5]), torch.tensor([10, 11, 12, 13, 4])
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0])
    got = sampled_softmax_loss(
        q,
        p,
        n,
        scale=4.0,
        positive_keys=pk,
        negative_keys=nk,
        query_keys=qk,
        weights=w,
        targets=tg,
        chunk_size=chunk_size,
    )
    cands, keys = torch.cat([p, n]), torch.cat([pk, nk]).tolist()
    total = 0.0
    for i in range(5):
        t = int(tg[i])
        kept = [j for j in range(5) if j == t or keys[j] not in (keys[t], int(qk[i]))]
        logits = [4.0 * float(q[i] @ cands[j]) for j in kept]
        total += float(w[i]) * (math.log(sum(math.exp(x) for x in logits)) - 4.0 * float(q[i] @ cands[t]))
    assert got.item() == pytest.approx(total / 5, rel=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("copies", [1, 2, 5])
def test_duplicates_of_a_non_target_candidate_do_not_change_the_loss(chunk_size, copies):
    """A popular item X is the positive of ``copies`` other queries: query 0 (positive P0) must see X once,
    with X's in-batch log Q - as if X had been drawn once - whatever the number of copies."""
    d = 4
    q0, p0, x, others = (
        unit(1, d, seed=30),
        unit(1, d, seed=31),
        unit(1, d, seed=32),
        unit(copies, d, seed=33),
    )
    n = unit(2, d, seed=34)
    lq_p0, lq_x = -2.5, -0.1  # X: popular, inclusion probability ~0.9
    q = torch.cat([q0, others])
    p = torch.cat([p0, x.expand(copies, d)])
    pk = torch.tensor([100] + [7] * copies)
    plq = torch.tensor([lq_p0] + [lq_x] * copies, dtype=torch.float64)
    w = torch.zeros(1 + copies, dtype=torch.float64)
    w[0] = 1 + copies  # the loss divides by the number of queries: this is query 0's term alone
    kw = {"negative_log_q": -4.0, "negative_keys": torch.tensor([50, 51]), "chunk_size": chunk_size}
    loss = sampled_softmax_loss(q, p, n, scale=5.0, positive_log_q=plq, positive_keys=pk, weights=w, **kw)
    s = lambda c, lq: 5.0 * float(q0[0] @ c) - lq
    cols = [s(p0[0], lq_p0), s(x[0], lq_x), s(n[0], -4.0), s(n[1], -4.0)]  # X's mass counted once
    expected = math.log(sum(math.exp(v) for v in cols)) - cols[0]
    assert loss.item() == pytest.approx(expected, rel=1e-9)
