"""recall@k (ml/metrics.py) against a brute-force reference of paper 4.2.1, ties and pool exclusion included."""

import pytest
import torch

from ml import metrics
from ml.metrics import recall_at_k


def brute_force(q, p, n, k, qk=None, pk=None, nk=None):
    hits = []
    for i in range(len(q)):
        pos = sum(a * b for a, b in zip(q[i], p[i]))
        beat = 0
        for j in range(len(n)):
            if nk is not None and ((qk is not None and nk[j] == qk[i]) or (pk is not None and nk[j] == pk[i])):
                continue  # the pool excludes the query and the positive
            if sum(a * b for a, b in zip(q[i], n[j])) >= pos:  # ties count against the positive
                beat += 1
        hits.append(beat < k)
    return sum(hits) / len(hits), hits


def int_vectors(rows, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (rows, d), generator=g).float()  # exact dot products: many exact ties


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_brute_force_with_ties_and_exclusion(k, chunk_size):
    nq, nn, d = 23, 60, 3
    q, p, n = int_vectors(nq, d, 1), int_vectors(nq, d, 2), int_vectors(nn, d, 3)
    g = torch.Generator().manual_seed(4)
    qk = torch.randint(0, 40, (nq,), generator=g)
    pk = torch.randint(0, 40, (nq,), generator=g)
    nk = torch.randint(0, 40, (nn,), generator=g)
    res = recall_at_k(q, p, n, k=k, query_keys=qk, positive_keys=pk, negative_keys=nk, chunk_size=chunk_size)
    ref, ref_hits = brute_force(q.tolist(), p.tolist(), n.tolist(), k, qk.tolist(), pk.tolist(), nk.tolist())
    assert res.n == nq
    assert res.recall == pytest.approx(ref)
    assert res.hits.tolist() == ref_hits
    # without keys nothing is excluded
    res2 = recall_at_k(q, p, n, k=k, chunk_size=chunk_size)
    assert res2.recall == pytest.approx(brute_force(q.tolist(), p.tolist(), n.tolist(), k)[0])


def test_ties_count_against_the_positive():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.5, 0.5]])
    n = torch.tensor([[0.5, -3.0], [0.5, 9.0], [0.4, 0.0]])  # scores 0.5 (tie), 0.5 (tie), 0.4
    assert recall_at_k(q, p, n, k=2).recall == 0.0  # 2 negatives score >= positive: not fewer than 2
    assert recall_at_k(q, p, n, k=3).recall == 1.0
    assert recall_at_k(q, p, n, k=3).outscored.tolist() == [2]


def test_pool_excludes_query_and_positive_by_key():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(30, 16, generator=g), dim=-1)
    p = torch.nn.functional.normalize(q + 0.1 * torch.randn(30, 16, generator=g), dim=-1)
    rand = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=-1)
    # the pool holds every query and every positive (as in an "all entities" pool)
    n = torch.cat([q, p, rand])
    qk, pk = torch.arange(30), torch.arange(30, 60)
    nk = torch.cat([qk, pk, torch.arange(100, 300)])
    with_keys = recall_at_k(q, p, n, k=1, query_keys=qk, positive_keys=pk, negative_keys=nk)
    without = recall_at_k(q, p, n, k=1)
    # without exclusion the query itself (score 1) and the positive (a tie) always outscore the positive
    assert without.recall == 0.0
    assert with_keys.recall == pytest.approx(brute_force(q.tolist(), p.tolist(), rand.tolist(), 1)[0])
    assert with_keys.recall > 0.5


def test_float_ties_detected_regardless_of_summation_order():
    # A negative carrying the positive's exact embedding (another entity with identical features) ties.
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(200, 256, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(200, 256, generator=g), dim=-1)
    n = torch.cat([p.flip(0), torch.nn.functional.normalize(torch.randn(50, 256, generator=g), dim=-1)])
    res = recall_at_k(q, p, n, k=10, chunk_size=64)
    own = recall_at_k(
        q, p, p, k=10, chunk_size=64, positive_keys=torch.arange(200), negative_keys=torch.arange(200) + 1000
    )
    assert own.outscored.min() >= 1  # each positive's twin in the pool counted as >=
    naive = (q.double() @ n.double().T) > (q.double() * p.double()).sum(1, keepdim=True) + 1e-9
    assert torch.all(res.outscored >= naive.sum(1) + 1)


def test_negatives_are_chunked_too(monkeypatch):
    q, p, n = int_vectors(40, 4, 5), int_vectors(40, 4, 6), int_vectors(333, 4, 7)
    full = recall_at_k(q, p, n, k=5)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMS", 50)  # 8 queries x 6 negatives per block
    small = recall_at_k(q, p, n, k=5, chunk_size=8)
    assert torch.equal(full.outscored, small.outscored)
    assert small.recall == pytest.approx(brute_force(q.tolist(), p.tolist(), n.tolist(), 5)[0])


def test_no_queries_and_bad_input():
    res = recall_at_k(torch.zeros(0, 4), torch.zeros(0, 4), torch.randn(10, 4))
    assert res.recall is None and res.n == 0 and res.hits.numel() == 0
    assert res.as_dict() == {"recall@10": None, "n": 0}
    with pytest.raises(ValueError, match="positive"):
        recall_at_k(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="negative_keys"):
        recall_at_k(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, 4), negative_keys=torch.arange(2))
    with pytest.raises(ValueError, match="k must"):
        recall_at_k(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, 4), k=0)
