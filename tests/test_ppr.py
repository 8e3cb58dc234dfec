"""forward_push against exact personalised PageRank (paper 3.1.1; ACL forward push, ref. [2])."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import scipy.sparse as sp

from graph_engine.ppr import forward_push, forward_push_typed, weighted_out_degree

RESTART = 0.15


def random_graph(n: int, p: float, seed: int, undirected: bool) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    a = (rng.random((n, n)) < p) * rng.uniform(0.5, 4.0, (n, n))
    np.fill_diagonal(a, 0.0)
    if undirected:
        a = np.triu(a, 1)
        a = a + a.T
    # float32 is the snapshot's weight dtype: the exact solution uses the same rounded weights
    m = sp.csr_matrix(a.astype(np.float32))
    m.sort_indices()
    return m


def exact_ppr(m: sp.csr_matrix, restart: float = RESTART) -> np.ndarray:
    """Pi[:, s] = restart * (I - (1 - restart) P^T)^-1 e_s, P = D^-1 A (a zero row for a node without out-edges)."""
    a = m.toarray().astype(np.float64)
    w = a.sum(axis=1)
    p = np.divide(a, w[:, None], out=np.zeros_like(a), where=w[:, None] > 0)
    n = a.shape[0]
    return restart * np.linalg.solve(np.eye(n) - (1 - restart) * p.T, np.eye(n))


def push(m, sources, eps, topk, restart=RESTART):
    return forward_push(m.indptr, m.indices.astype(np.int32), m.data, sources, restart, eps, topk)


@pytest.mark.parametrize("undirected", [True, False])
@pytest.mark.parametrize("eps", [1e-3, 1e-4])
def test_scores_within_forward_push_error_bound(undirected, eps):
    m = random_graph(120, 0.04, seed=1 if undirected else 2, undirected=undirected)
    n = m.shape[0]
    pi = exact_ppr(m)
    w = np.asarray(m.sum(axis=1)).ravel()
    # Termination r(u) < eps * W(u) and p_s = p + sum_u r(u) p_u give 0 <= pi - p <= eps * sum_u W(u) pi_u(v);
    # on an undirected graph that sum is W(v) (pi_u(v) W(u) = pi_v(u) W(v)): the classic eps * d(v).
    bound = eps * (pi @ w) if not undirected else eps * w
    if undirected:
        np.testing.assert_allclose(pi @ w, w, rtol=1e-6)
    ids, scores = push(m, np.arange(n), eps, topk=n)
    checked = 0
    for s in range(n):
        real = ids[s] >= 0
        got, got_scores = ids[s][real], scores[s][real]
        assert s not in got, "the source itself is never returned"
        assert np.all(np.diff(got_scores) <= 0), "rows are score-descending"
        err = pi[got, s] - got_scores
        assert np.all(err >= -1e-7), f"source {s}: push overestimates {err.min()}"
        assert np.all(err <= bound[got] + 1e-7), f"source {s}: error {err.max()} above the bound"
        # a node the push never reached is within the bound of zero
        missed = np.setdiff1d(np.arange(n), np.append(got, s))
        assert np.all(pi[missed, s] <= bound[missed] + 1e-7)
        checked += got.size
    assert checked > n  # the graphs are connected enough that rows are not empty


@pytest.mark.parametrize("undirected", [True, False])
def test_topk_agreement_with_exact_at_small_eps(undirected):
    m = random_graph(200, 0.03, seed=3 if undirected else 4, undirected=undirected)
    n, k = m.shape[0], 10
    pi = exact_ppr(m)
    bound = pi @ np.asarray(m.sum(axis=1)).ravel()
    ids, scores = push(m, np.arange(n), 1e-6, topk=k)
    overlaps = []
    for s in range(n):
        exact = pi[:, s].copy()
        exact[s] = -1.0
        reachable = int((exact > 1e-12).sum())
        if reachable < k:
            continue
        truth = set(np.argsort(-exact, kind="stable")[:k].tolist())
        overlaps.append(len(truth & set(ids[s].tolist())) / k)
        # scores within the push error bound eps * sum_u W(u) pi_u(v) (= eps * W(v) when undirected)
        assert np.all(np.abs(pi[ids[s], s] - scores[s]) <= 1e-6 * bound[ids[s]] + 1e-9)
    assert len(overlaps) > n // 2
    assert np.mean(overlaps) >= 0.95, np.mean(overlaps)


def test_heavier_edge_pulls_more_mass():
    # star s - a (weight 5), s - b (weight 1), undirected: by symmetry p(a) / p(b) = 5 exactly.
    rows = np.array([0, 1, 0, 2])
    cols = np.array([1, 0, 2, 0])
    data = np.array([5.0, 5.0, 1.0, 1.0], dtype=np.float32)
    m = sp.csr_matrix((data, (rows, cols)), shape=(3, 3))
    m.sort_indices()
    ids, scores = push(m, [0], 1e-7, topk=2)
    assert ids[0].tolist() == [1, 2]
    assert scores[0, 0] / scores[0, 1] == pytest.approx(5.0, rel=1e-3)
    # with equal weights the two leaves tie
    m2 = m.copy()
    m2.data[:] = 1.0
    _, s2 = push(m2, [0], 1e-7, topk=2)
    assert s2[0, 0] == pytest.approx(s2[0, 1], rel=1e-6)


def test_isolated_and_absent_sources_give_empty_rows_and_padding():
    # nodes 0-1-2 path, node 3 isolated
    rows, cols = [0, 1, 1, 2], [1, 0, 2, 1]
    m = sp.csr_matrix((np.ones(4, np.float32), (rows, cols)), shape=(4, 4))
    ids, scores = push(m, [3, -1, 0], 1e-6, topk=5)
    assert ids.shape == (3, 5) and scores.shape == (3, 5)
    assert ids[0].tolist() == [-1] * 5 and scores[0].tolist() == [0.0] * 5  # isolated source
    assert ids[1].tolist() == [-1] * 5  # -1 = node absent from the graph
    assert ids[2].tolist() == [1, 2, -1, -1, -1]  # 2 reachable nodes, then padding
    assert scores[2, 2:].tolist() == [0.0, 0.0, 0.0]
    assert scores[2, 0] > scores[2, 1] > 0


def test_dangling_node_matches_exact_on_directed_graph():
    # 0 -> 1 -> 2 and 0 -> 2; node 2 has no out-entries: its mass leaves the walk as in the exact formula
    m = sp.csr_matrix((np.array([1.0, 3.0, 1.0], np.float32), ([0, 0, 1], [1, 2, 2])), shape=(3, 3))
    pi = exact_ppr(m)
    ids, scores = push(m, [0], 1e-9, topk=2)
    np.testing.assert_allclose(scores[0], pi[ids[0], 0], atol=1e-8)
    assert ids[0].tolist() == [2, 1]


def test_unit_weights_default_and_thread_count_do_not_change_results():
    m = random_graph(150, 0.04, seed=5, undirected=True)
    m.data[:] = 1.0
    src = np.arange(150)
    ids1, sc1 = forward_push(m.indptr, m.indices, None, src, RESTART, 1e-4, 20)
    ids2, sc2 = push(m, src, 1e-4, 20)
    np.testing.assert_array_equal(ids1, ids2)
    np.testing.assert_array_equal(sc1, sc2)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        ids3, sc3 = push(m, src[::-1], 1e-4, 20)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(ids3[::-1], ids1)
    np.testing.assert_array_equal(sc3[::-1], sc1)


def test_per_type_topk_matches_exact_ranking_within_each_type():
    m = random_graph(100, 0.05, seed=6, undirected=True)
    n = m.shape[0]
    node_type = (np.arange(n) % 3 == 0).astype(np.int8)  # every third node is type 1
    pi = exact_ppr(m)
    ids, scores = forward_push_typed(
        m.indptr, m.indices, m.data, np.arange(20), RESTART, 1e-7, node_type, [0, 1, -1], [4, 3, 5]
    )
    assert ids.shape == (20, 12)
    for s in range(20):
        for t, lo, k in ((0, 0, 4), (1, 4, 3), (-1, 7, 5)):
            exact = pi[:, s].copy()
            exact[s] = -1
            if t >= 0:
                exact[node_type != t] = -1
            want = np.argsort(-exact, kind="stable")[:k]
            got = ids[s, lo : lo + k]
            assert got.tolist() == want.tolist(), (s, t)
            if t >= 0:
                assert np.all(node_type[got] == t)
            np.testing.assert_allclose(scores[s, lo : lo + k], pi[got, s], atol=1e-5)


def test_weighted_out_degree_and_bad_input():
    m = random_graph(30, 0.2, seed=7, undirected=False)
    np.testing.assert_allclose(weighted_out_degree(m.indptr, m.data), np.asarray(m.sum(axis=1)).ravel(), rtol=1e-6)
    with pytest.raises(ValueError, match="eps"):
        push(m, [0], 0.0, 5)
    with pytest.raises(ValueError, match="restart_prob"):
        push(m, [0], 1e-4, 5, restart=0.0)
    with pytest.raises(ValueError, match="out of range"):
        push(m, [30], 1e-4, 5)
    with pytest.raises(ValueError, match="> 0"):
        forward_push(m.indptr, m.indices, np.zeros_like(m.data), [0], RESTART, 1e-4, 5)
    with pytest.raises(ValueError, match="weights shape"):
        forward_push(m.indptr, m.indices, m.data[:-1], [0], RESTART, 1e-4, 5)
