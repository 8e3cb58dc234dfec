"""forward_push against exact personalised PageRank (paper 3.1.1; ACL forward push, ref. [2])."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import scipy.sparse as sp

from graph_engine.ppr import PushGraph, _mapped, forward_push, forward_push_typed, weighted_out_degree

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
    d = np.diff(m.indptr).astype(np.float64)
    # Termination r(u) < eps * d(u) and pi_s = p + sum_u r(u) pi_u give, for p_hat = p + restart * r,
    # 0 <= pi_s(v) - p_hat(v) <= eps * D(v), D(v) = sum_u d(u) pi_u(v) (the degree d, not the weight W).
    bound = eps * (pi @ d)
    if undirected:
        # pi_u(v) W(u) = pi_v(u) W(v): D(v) = W(v) sum_u pi_v(u) d(u) / W(u) <= W(v) max_u d(u) / W(u)
        w = np.asarray(m.sum(axis=1)).ravel()
        assert np.all(pi @ d <= w * np.max(d / np.maximum(w, 1e-30)) * (1 + 1e-6))
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
    bound = pi @ np.diff(m.indptr).astype(np.float64)  # D(v) = sum_u d(u) pi_u(v)
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
        # scores within the push error bound eps * D(v)
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


def hub_graph(leaves: int = 400, hub_weight: float = 80.0) -> sp.csr_matrix:
    """Count-weighted hub: node 0 linked to every leaf by ``hub_weight`` (W(hub) = leaves * hub_weight), and
    each leaf linked to two other leaves (a ring) by weight 1; undirected, both entries stored."""
    n = leaves + 1
    leaf = np.arange(1, n)
    nxt = 1 + leaf % leaves
    rows = np.concatenate([np.zeros(leaves, np.int64), leaf, leaf, nxt])
    cols = np.concatenate([leaf, np.zeros(leaves, np.int64), nxt, leaf])
    data = np.concatenate([np.full(2 * leaves, hub_weight), np.ones(2 * leaves)]).astype(np.float32)
    m = sp.csr_matrix((data, (rows, cols)), shape=(n, n))
    m.sort_indices()
    return m


def power_iteration_ppr(m: sp.csr_matrix, s: int, restart: float = RESTART, tol: float = 1e-13) -> np.ndarray:
    """Exact PPR of source s by power iteration on the row-normalised matrix P = D_W^-1 A:
    pi = sum_k restart (1 - restart)^k (P^T)^k e_s, summed until the remaining mass is below ``tol``."""
    w = np.asarray(m.sum(axis=1)).ravel()
    pt = (sp.diags(np.divide(1.0, w, out=np.zeros_like(w), where=w > 0)) @ m).T.tocsr()
    x = np.zeros(m.shape[0])
    x[s] = 1.0
    pi = np.zeros_like(x)
    while x.sum() > tol:
        pi += restart * x
        x = (1.0 - restart) * (pt @ x)
    return pi


def test_count_weighted_hub_keeps_its_neighbourhood_and_leaves_rank_it_first():
    m = hub_graph()
    n = m.shape[0]
    assert float(m[0].sum()) == 32_000.0  # W(hub) > B = 1 / eps: a threshold on W would never push it
    ids, scores = push(m, np.arange(n), 1e-4, topk=10)
    assert (ids[0] >= 0).sum() >= 9
    pi_hub = power_iteration_ppr(m, 0)
    np.testing.assert_allclose(scores[0], pi_hub[ids[0]], rtol=0.15)  # every leaf ties in the exact vector
    for s in (5, 100, 250, 400):
        pi = power_iteration_ppr(m, s)
        pi[s] = -1.0
        truth = np.argsort(-pi, kind="stable")[:10]
        assert ids[s, 0] == 0 == truth[0], "the hub is the leaf's top neighbour"
        assert len(set(truth.tolist()) & set(ids[s].tolist())) / 10 >= 0.8, (s, truth, ids[s])
        assert set(ids[s, :3].tolist()) == {0, 1 + s % 400, 1 + (s - 2) % 400}  # hub, ring neighbours
        # lower bound within eps * D(v) of the truth
        bound = 1e-4 * exact_ppr(m)[ids[s]] @ np.diff(m.indptr)
        err = pi[ids[s]] - scores[s]
        assert np.all(err >= -1e-9) and np.all(err <= bound + 1e-9)


def test_scaling_the_counts_changes_nothing():
    # P is row-normalised and the threshold is eps * d(u): counts x 1000 leave the push as it was
    m = random_graph(150, 0.04, seed=8, undirected=False)
    ids1, sc1 = push(m, np.arange(150), 1e-4, 20)
    m2 = m.copy()
    m2.data *= 1000.0
    ids2, sc2 = push(m2, np.arange(150), 1e-4, 20)
    np.testing.assert_array_equal(ids1, ids2)
    np.testing.assert_allclose(sc1, sc2, rtol=1e-5)


def test_every_node_with_out_entries_gets_a_neighbourhood():
    # hub of 300 leaves with B = 100 < d(hub): still pushed as the source; its leaves (d = 1, counts 1..50)
    # are ranked by the mass that reached them even when it is below their threshold
    leaves = 300
    rng = np.random.default_rng(9)
    w = rng.integers(1, 51, leaves).astype(np.float32)
    rows = np.concatenate([np.zeros(leaves, np.int64), np.arange(1, leaves + 1)])
    cols = np.concatenate([np.arange(1, leaves + 1), np.zeros(leaves, np.int64)])
    star = sp.csr_matrix((np.concatenate([w, w]), (rows, cols)), shape=(leaves + 1, leaves + 1))
    star.sort_indices()
    ids, _ = push(star, np.arange(leaves + 1), 1e-2, topk=5)
    assert np.all(ids[:, 0] >= 0)
    assert ids[1:, 0].tolist() == [0] * leaves  # every leaf's neighbour is the hub
    heaviest = np.argsort(-w, kind="stable")[:5] + 1
    assert ids[0].tolist() == heaviest.tolist()  # the hub's top leaves follow the counts
    # ACL's / PyG's estimate p (pushed nodes only) would lose the hub: r(hub) = 0.85 < eps * d(hub) = 3
    acl, _ = forward_push(star.indptr, star.indices, star.data, [1], RESTART, 1e-2, 5, credit_residual=False)
    assert acl[0].tolist() == [-1] * 5
    for m in (hub_graph(), random_graph(200, 0.02, seed=10, undirected=False)):
        ids, _ = push(m, np.arange(m.shape[0]), 1e-4, topk=10)
        has_out = np.diff(m.indptr) > 0
        assert np.all(ids[has_out, 0] >= 0) and np.all(ids[~has_out] == -1)


@pytest.mark.parametrize("undirected", [True, False])
def test_acl_estimate_is_the_pushed_mass_and_p_hat_is_closer_to_exact(undirected):
    m = random_graph(150, 0.04, seed=13 if undirected else 14, undirected=undirected)
    n = m.shape[0]
    pi = exact_ppr(m)
    bound = 1e-3 * (pi @ np.diff(m.indptr).astype(np.float64))
    hat_ids, hat = push(m, np.arange(n), 1e-3, topk=n)
    acl_ids, acl = forward_push(m.indptr, m.indices, m.data, np.arange(n), RESTART, 1e-3, n, credit_residual=False)
    for s in range(n):
        got = acl_ids[s][acl_ids[s] >= 0]
        assert set(got.tolist()) <= set(hat_ids[s].tolist())  # pushed nodes are a subset of the touched ones
        err = pi[got, s] - acl[s][: got.size]
        assert np.all(err >= -1e-9) and np.all(err <= bound[got] + 1e-9)
        # node by node p <= p_hat <= pi_s
        pos = {v: i for i, v in enumerate(hat_ids[s].tolist())}
        p_hat = hat[s][[pos[v] for v in got.tolist()]]
        assert np.all(acl[s][: got.size] <= p_hat + 1e-15) and np.all(p_hat <= pi[got, s] + 1e-9)


def test_push_graph_reuses_clean_scratch_across_calls():
    m = random_graph(300, 0.02, seed=11, undirected=True)
    graph = PushGraph(m.indptr, m.indices, m.data)
    everything = graph.push(np.arange(300), RESTART, 1e-4, 15)
    scratch = graph._scratch
    assert scratch is not None
    # many small calls (as build_neighborhood_cache makes) on one PushGraph: same rows, no reallocation
    for lo in range(0, 300, 7):
        ids, scores = graph.push(np.arange(lo, min(300, lo + 7)), RESTART, 1e-4, 15)
        np.testing.assert_array_equal(ids, everything[0][lo : lo + 7])
        np.testing.assert_array_equal(scores, everything[1][lo : lo + 7])
        assert graph._scratch is scratch
    rt = scratch[0]  # per worker and node: the record (r, d, p, 0)
    assert not rt[:, :, [0, 2]].any()  # only touched entries were used, all reset
    np.testing.assert_array_equal(rt[:, :, 1], np.broadcast_to(np.diff(m.indptr), rt.shape[:2]))
    w_out = np.asarray(m.sum(axis=1)).ravel()
    inv_w = np.divide(1.0, w_out, out=np.zeros_like(w_out), where=w_out > 0)  # 1 / W(v), 0 without out-entries
    np.testing.assert_allclose(rt[:, :, 3], np.broadcast_to(inv_w, rt.shape[:2]), rtol=1e-6)
    ids_fn, _ = forward_push(m.indptr, m.indices, m.data, np.arange(300), RESTART, 1e-4, 15)
    np.testing.assert_array_equal(ids_fn, everything[0])


def test_bad_csr_is_rejected_once():
    m = random_graph(20, 0.3, seed=12, undirected=False)
    bad = m.indices.copy()
    bad[0] = 20
    with pytest.raises(ValueError, match="dense node indices"):
        PushGraph(m.indptr, bad, m.data)
    with pytest.raises(ValueError, match="out_weight"):
        PushGraph(m.indptr, m.indices, m.data, out_weight=np.ones(3))


def test_mapped_csr_is_copied_once_and_gives_the_same_result(tmp_path):
    m = random_graph(120, 0.05, seed=15, undirected=False)
    for name, arr in (("indptr", m.indptr.astype(np.int64)), ("indices", m.indices), ("weights", m.data)):
        np.save(tmp_path / f"{name}.npy", arr)
    mapped = [np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in ("indptr", "indices", "weights")]
    graph = PushGraph(*mapped)
    assert _mapped(mapped[1]) and not any(_mapped(a) for a in (graph.indptr, graph.indices, graph.weights))
    want = push(m, np.arange(120), 1e-4, 10)
    got = graph.push(np.arange(120), RESTART, 1e-4, 10)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
