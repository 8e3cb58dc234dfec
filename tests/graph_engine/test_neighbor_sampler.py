"""Heterogeneous neighbour sampling (paper 3.1.1): per-type top-k per relation subset, union over subsets,
and the per-snapshot neighbourhood cache."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graph_engine.batch import NODE_TYPE_CODE, NeighborBlock, NeighborhoodLayout
from graph_engine.neighbor_sampler import (
    NeighborhoodCache,
    Neighborhoods,
    NeighborSampler,
    build_neighborhood_cache,
)
from graph_engine.snapshot import GraphSnapshot, build_snapshot

PIN, BOARD = NODE_TYPE_CODE["pin"], NODE_TYPE_CODE["board"]
RESTART = 0.15

# Hand-made heterogeneous graph: pins 101..107, boards 201..203.
PIN_BOARD = [
    (101, 201, 3.0),
    (102, 201, 1.0),
    (103, 201, 1.0),
    (103, 202, 1.0),
    (104, 202, 2.0),
    (101, 203, 1.0),
    (106, 203, 1.0),
]
PIN_PIN = [(101, 105, 2.0), (105, 106, 1.0), (101, 102, 1.0), (105, 107, 1.0)]

LAYOUT = NeighborhoodLayout(
    (
        NeighborBlock("pin_board", "pin", 3),
        NeighborBlock("pin_board", "board", 2),
        NeighborBlock("pin_pin", "pin", 2),
    )
)


def write_edges(directory, pin_board, pin_pin) -> None:
    rows = []
    for p, b, w in pin_board:
        rows += [("pin", p, "board", b, "pin_board", w), ("board", b, "pin", p, "pin_board", w)]
    for a, c, w in pin_pin:
        rows += [("pin", a, "pin", c, "pin_pin", w), ("pin", c, "pin", a, "pin_pin", w)]
    names = ("src_type", "src_id", "dst_type", "dst_id", "edge_type", "weight")
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: [r[i] for r in rows] for i, k in enumerate(names)}), directory / "part-0.parquet")


@pytest.fixture
def snap(tmp_path) -> GraphSnapshot:
    write_edges(tmp_path / "edges", PIN_BOARD, PIN_PIN)
    build_snapshot(tmp_path / "edges", tmp_path / "graph", None, "2026-01-02")
    return GraphSnapshot.open(tmp_path / "graph")


def exact_ppr(snap: GraphSnapshot, subset: str) -> np.ndarray:
    indptr, indices, weights = snap.csr(subset)
    n = snap.num_nodes
    a = np.zeros((n, n))
    for u in range(n):
        a[u, indices[indptr[u] : indptr[u + 1]]] = weights[indptr[u] : indptr[u + 1]]
    w = a.sum(axis=1)
    p = np.divide(a, w[:, None], out=np.zeros_like(a), where=w[:, None] > 0)
    return RESTART * np.linalg.solve(np.eye(n) - (1 - RESTART) * p.T, np.eye(n))  # column s = PPR of s


def dense(snap, type_name, ids):
    return snap.lookup(NODE_TYPE_CODE[type_name], np.asarray(ids)).tolist()


def test_per_type_topk_and_union_over_subsets(snap):
    sampler = NeighborSampler(snap, LAYOUT, restart_prob=RESTART, budget=10**7)
    (p101, _p102, p103, p104, p105, _p106, p107) = dense(snap, "pin", range(101, 108))
    (b201, _b202, b203) = dense(snap, "board", [201, 202, 203])
    nb = sampler.sample(np.array([p101]))
    assert nb.index.shape == (1, LAYOUT.width) and nb.index.dtype == np.int64
    assert nb.scores.dtype == np.float32 and nb.mask.dtype == bool
    pb_pins, pb_boards, pp_pins = nb.index[0, 0:3], nb.index[0, 3:5], nb.index[0, 5:7]

    # Each block is the exact top-k_t of its type in its subset's graph, score-descending.
    for subset, block, t, k in (
        ("pin_board", pb_pins, PIN, 3),
        ("pin_board", pb_boards, BOARD, 2),
        ("pin_pin", pp_pins, PIN, 2),
    ):
        pi = exact_ppr(snap, subset)[:, p101].copy()
        pi[p101] = -1
        pi[np.asarray(snap.node_type) != t] = -1
        want = [v for v in np.argsort(-pi, kind="stable")[:k] if pi[v] > 0]
        assert block.tolist()[: len(want)] == want, subset
        assert np.all(np.asarray(snap.node_type)[block[block >= 0]] == t)
    # pin_board reaches pins only through boards: the pin_pin-only neighbour 105 is not in it ...
    assert p105 not in pb_pins and p107 not in pb_pins
    assert set(pb_boards.tolist()) == {b201, b203}  # board 202 is 2 hops further than 201/203; k = 2
    assert pb_boards[0] == b201  # the heavier edge (weight 3) pulls more mass
    # ... and pin_pin reaches 105 (direct, weight 2) first, never a board-only pin
    assert pp_pins[0] == p105 and p103 not in pp_pins and p104 not in pp_pins
    # N(u, H) = union of the blocks: pins from both subsets
    union = set(nb.index[0][nb.mask[0]].tolist())
    assert {p105, b201, b203} <= union and p101 not in union
    for lo, hi in ((0, 3), (3, 5), (5, 7)):
        s = nb.scores[0, lo:hi]
        assert np.all(np.diff(s[nb.mask[0, lo:hi]]) <= 0)


def test_padding_absent_nodes_and_nodes_without_a_subset(snap):
    sampler = NeighborSampler(snap, LAYOUT, restart_prob=RESTART, budget=10**6)
    (p103,) = dense(snap, "pin", [103])
    (b202,) = dense(snap, "board", [202])
    nb = sampler.sample(np.array([-1, p103, b202]))
    # absent node (dense -1): all padding
    assert nb.index[0].tolist() == [-1] * 7 and not nb.mask[0].any() and not nb.scores[0].any()
    # pin 103 has no pin_pin edge: its pin_pin block is empty, its pin_board blocks are not
    assert not nb.mask[1, 5:7].any() and nb.mask[1, 0] and nb.mask[1, 3]
    # padding is consistent: -1 <=> mask False <=> score 0, and real entries come first in each block
    assert np.array_equal(nb.mask, nb.index >= 0)
    assert np.all(nb.scores[~nb.mask] == 0) and np.all(nb.scores[nb.mask] > 0)
    for lo, hi in ((0, 3), (3, 5), (5, 7)):
        m = nb.mask[:, lo:hi].astype(int)
        assert np.all(np.diff(m, axis=1) <= 0)
    # board 202 in pin_board: only two pins (103, 104) within reach... and board 201 via 103
    assert set(nb.index[2, 0:3][nb.mask[2, 0:3]].tolist()) <= set(dense(snap, "pin", [101, 102, 103, 104, 106]))
    assert nb.index[2, 0] == dense(snap, "pin", [104])[0]  # the weight-2 edge


def test_bad_layout_is_rejected(snap):
    with pytest.raises(ValueError, match="ppin"):
        NeighborSampler(snap, NeighborhoodLayout((NeighborBlock("ppin", "pin", 2),)))
    with pytest.raises(ValueError, match="user"):
        NeighborSampler(snap, NeighborhoodLayout((NeighborBlock("pin_pin", "user", 2),)))
    with pytest.raises(IndexError):
        NeighborSampler(snap, LAYOUT).sample([snap.num_nodes])


def test_cache_serves_the_sampler_results(snap, tmp_path):
    sampler = NeighborSampler(snap, LAYOUT, restart_prob=RESTART, budget=1000)
    config = build_neighborhood_cache(snap, sampler, tmp_path / "nb", batch_size=4)  # several batches
    assert config["restart_prob"] == RESTART and config["budget"] == 1000 and config["num_nodes"] == snap.num_nodes
    cache = NeighborhoodCache.open(tmp_path / "nb", snapshot=snap)
    assert cache.layout == LAYOUT
    assert isinstance(cache._index, np.memmap) and isinstance(cache._scores, np.memmap)
    every = np.arange(snap.num_nodes)
    want, got = sampler.sample(every), cache.get(every)
    np.testing.assert_array_equal(got.index, want.index)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.mask, want.mask)
    assert got.index.dtype == np.int64
    # arbitrary order, repeats and absent nodes
    rows = np.array([3, -1, 0, 3])
    g = cache.get(rows)
    np.testing.assert_array_equal(g.index[[0, 2, 3]], want.index[[3, 0, 3]])
    assert not g.mask[1].any() and g.index[1].tolist() == [-1] * LAYOUT.width
    assert isinstance(g, Neighborhoods) and len(g) == 4
    with pytest.raises(IndexError):
        cache.get([snap.num_nodes])


def test_cache_rejects_another_snapshot(snap, tmp_path):
    sampler = NeighborSampler(snap, LAYOUT)
    build_neighborhood_cache(snap, sampler, tmp_path / "nb")
    write_edges(tmp_path / "e2", PIN_BOARD[:-1], PIN_PIN)
    build_snapshot(tmp_path / "e2", tmp_path / "g2", None, "2026-01-03")
    with pytest.raises(ValueError, match="different snapshot"):
        NeighborhoodCache.open(tmp_path / "nb", snapshot=GraphSnapshot.open(tmp_path / "g2"))


def test_default_layout_on_a_random_graph(tmp_path):
    rng = np.random.default_rng(0)
    pb = {(int(p), int(b)) for p, b in zip(rng.integers(0, 300, 1500), rng.integers(1000, 1100, 1500))}
    pp = {(int(a), int(c)) for a, c in zip(rng.integers(0, 300, 400), rng.integers(0, 300, 400)) if a < c}
    write_edges(
        tmp_path / "e",
        [(p, b, float(rng.integers(1, 4))) for p, b in sorted(pb)],
        [(a, c, 1.0) for a, c in sorted(pp)],
    )
    build_snapshot(tmp_path / "e", tmp_path / "g", None, "d")
    snap = GraphSnapshot.open(tmp_path / "g")
    sampler = NeighborSampler(snap)  # paper 4.1 defaults: 25 + 75 on pin_board, 50 on pin_pin
    assert sampler.layout.width == 150 and sampler.eps == 1e-4
    nb = sampler.sample(np.arange(snap.num_nodes))
    col_type = sampler.layout.column_node_type()
    real_type = np.asarray(snap.node_type)[np.where(nb.mask, nb.index, 0)]
    assert np.all((real_type == col_type[None, :]) | ~nb.mask)  # every block holds its own type only
    assert not np.any(nb.index == np.arange(snap.num_nodes)[:, None])  # never the node itself
    has_pb = np.diff(snap.csr("pin_board")[0]) > 0
    pins = (np.asarray(snap.node_type) == PIN) & has_pb
    assert pins.sum() > 250
    assert nb.mask[pins, :25].all(axis=1).mean() > 0.9  # pin_board pin block filled for most pins
    assert nb.mask[pins, 25:100].sum(axis=1).min() >= 1  # every pin with a save reaches a board
    assert not nb.mask[~has_pb, :100].any()  # no pin_board edge: empty pin_board blocks
    # blocks hold distinct nodes
    for lo, hi in ((0, 25), (25, 100), (100, 150)):
        blk = nb.index[:, lo:hi]
        for row in blk[:50]:
            real = row[row >= 0]
            assert len(set(real.tolist())) == real.size


def test_count_weighted_hub_board_keeps_its_neighbourhood(tmp_path):
    # board 900 saved by 300 pins with counts of 60 (W = 18,000 > B = 10,000), pins also on small boards:
    # the hub board gets a full pin block and every pin still ranks it among its boards
    rng = np.random.default_rng(1)
    pins = np.arange(1, 301)
    pb = [(int(p), 900, 60.0) for p in pins] + [(int(p), 1000 + int(p) % 30, 1.0) for p in pins]
    pp = [(int(a), int(a) + 1, float(rng.integers(1, 5))) for a in pins[:-1]]
    write_edges(tmp_path / "e", pb, pp)
    build_snapshot(tmp_path / "e", tmp_path / "g", None, "d")
    snap = GraphSnapshot.open(tmp_path / "g")
    sampler = NeighborSampler(snap)
    (hub,) = dense(snap, "board", [900])
    assert snap.weighted_out_degree("pin_board")[hub] == 18_000.0
    nb = sampler.sample(np.arange(snap.num_nodes))
    assert nb.mask[hub, :25].all()  # 25 pins of the hub board
    pin_rows = np.flatnonzero(np.asarray(snap.node_type) == PIN)
    assert np.all(nb.index[pin_rows, 25] == hub)  # the hub board is every pin's first board
    has_out = np.zeros(snap.num_nodes, dtype=bool)
    for subset in ("pin_board", "pin_pin"):
        has_out |= np.diff(snap.csr(subset)[0]) > 0
    assert np.all(nb.mask[has_out].any(axis=1))  # every node with out-entries gets a neighbourhood


def test_sampler_prepares_each_subset_once_and_batches_agree(snap):
    sampler = NeighborSampler(snap, LAYOUT, restart_prob=RESTART, budget=1000)
    every = np.arange(snap.num_nodes)
    whole = sampler.sample(every)
    graphs = {s: sampler.push_graph(s) for s in ("pin_board", "pin_pin")}
    scratch = {s: g._scratch for s, g in graphs.items()}
    for lo in range(snap.num_nodes):
        part = sampler.sample(every[lo : lo + 1])
        np.testing.assert_array_equal(part.index, whole.index[lo : lo + 1])
        np.testing.assert_array_equal(part.scores, whole.scores[lo : lo + 1])
    for s, g in graphs.items():
        assert sampler.push_graph(s) is g and g._scratch is scratch[s]  # no per-call preparation
    fresh = NeighborSampler(snap, LAYOUT, restart_prob=RESTART, budget=1000).sample(every[::-1])
    np.testing.assert_array_equal(fresh.index[::-1], whole.index)
