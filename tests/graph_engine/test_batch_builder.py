"""BatchBuilder: the EntityBatch of a hand-made case (shapes, dtypes, block order, scores, masks, padding),
zero-imputed neighbourhoods for nodes outside the graph (3.5), one de-duplicated store read per batch, and
agreement with the real NeighborSampler / NeighborhoodCache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graph_engine.batch import EntityBatch, FeatureArrays, NeighborBlock, NeighborhoodLayout
from graph_engine.batch_builder import BatchBuilder
from graph_engine.feature_store import build_feature_store
from graph_engine.featurizer import Featurizer
from graph_engine.neighbor_sampler import (
    NeighborhoodCache,
    NeighborSampler,
    build_neighborhood_cache,
    layout_to_json,
)
from graph_engine.snapshot import GraphSnapshot, build_snapshot

PIN, BOARD = 0, 1
LAYOUT = NeighborhoodLayout(
    (
        NeighborBlock("pin_board", "board", 2),
        NeighborBlock("pin_board", "pin", 1),
        NeighborBlock("pin_pin", "pin", 2),
    )
)
# pins 1, 2, 3 and boards 50, 51 in the graph; pin 4 has metadata only (outside the graph).
EDGES = [
    ("pin", 1, "board", 50, "pin_board", 3.0),
    ("pin", 1, "board", 51, "pin_board", 1.0),
    ("pin", 2, "board", 50, "pin_board", 1.0),
    ("pin", 1, "pin", 2, "pin_pin", 2.0),
    ("pin", 1, "pin", 3, "pin_pin", 1.0),
]


def _write(tmp: Path) -> tuple[GraphSnapshot, Featurizer]:
    rows = []
    for st, s, dt, d, et, w in EDGES:
        rows += [(st, s, dt, d, et, w), (dt, d, st, s, et, w)]
    (tmp / "edges").mkdir()
    cols = list(zip(*rows))
    pq.write_table(
        pa.table(
            {
                "src_type": list(cols[0]),
                "src_id": pa.array(cols[1], pa.int64()),
                "dst_type": list(cols[2]),
                "dst_id": pa.array(cols[3], pa.int64()),
                "edge_type": list(cols[4]),
                "weight": pa.array(cols[5], pa.float64()),
            }
        ),
        tmp / "edges" / "e.parquet",
    )
    build_snapshot(tmp / "edges", tmp / "graph", None, "2026-01-05")
    snapshot = GraphSnapshot.open(tmp / "graph")
    for kind in ("pins", "boards"):
        (tmp / "meta" / kind).mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "pin_id": pa.array([1, 2, 3, 4], pa.int64()),
                "title": ["one", "two two", "three", "four outside"],
                "description": ["pin", "pin", "pin", "pin"],
                "image_embedding": pa.array([[1.0, 0.0], [0.0, 2.0], None, [4.0, 4.0]], pa.list_(pa.float32())),
                "segment": ["organic"] * 4,
            }
        ),
        tmp / "meta" / "pins" / "p.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "board_id": pa.array([50, 51], pa.int64()),
                "name": ["fifty", "fifty one"],
                "description": ["b", None],
            }
        ),
        tmp / "meta" / "boards" / "b.parquet",
    )
    build_feature_store(tmp / "meta", snapshot, tmp / "features")
    return snapshot, Featurizer(tmp / "features", max_tokens=5)


class HandCache:
    """A neighbourhood source with hand-set rows (dense index -> row); same interface as NeighborhoodCache."""

    def __init__(self, snapshot: GraphSnapshot, rows: dict[tuple[int, int], list[tuple[int, int, float]]]):
        n = snapshot.num_nodes
        self.layout = LAYOUT
        self.index = np.full((n, LAYOUT.width), -1, np.int64)
        self.scores = np.zeros((n, LAYOUT.width), np.float32)
        for (code, ident), cols in rows.items():
            r = snapshot.lookup(code, np.array([ident]))[0]
            for c, (ncode, nid, s) in enumerate(cols):
                if nid is None:
                    continue
                self.index[r, c] = snapshot.lookup(ncode, np.array([nid]))[0]
                self.scores[r, c] = s
        self._cache = NeighborhoodCache(
            Path("."),
            {"layout": layout_to_json(LAYOUT), "restart_prob": 0.15, "budget": 100, "num_nodes": n},
            self.index,
            self.scores,
        )

    def get(self, dense):
        return self._cache.get(dense)


class SpyFeaturizer:
    def __init__(self, inner: Featurizer):
        self.inner = inner
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def fetch(self, codes, ids, valid=None):
        self.calls.append((np.asarray(codes).copy(), np.asarray(ids).copy(), np.asarray(valid).copy()))
        return self.inner.fetch(codes, ids, valid=valid)


@pytest.fixture
def world(tmp_path):
    snapshot, feat = _write(tmp_path)
    yield snapshot, feat
    feat.close()


def test_hand_made_batch(world):
    snapshot, feat = world
    cache = HandCache(
        snapshot,
        {
            # pin 1: boards 50 (0.5), 51 (0.25); pin block: pin 2; pin_pin block: pins 2, 3
            (PIN, 1): [(BOARD, 50, 0.5), (BOARD, 51, 0.25), (PIN, 2, 0.2), (PIN, 2, 0.4), (PIN, 3, 0.1)],
            # pin 2: board 50 only, pin_pin: pin 1
            (PIN, 2): [(BOARD, 50, 0.9), (None, None, 0), (None, None, 0), (PIN, 1, 0.3), (None, None, 0)],
        },
    )
    spy = SpyFeaturizer(feat)
    batch = BatchBuilder(snapshot, cache, spy, LAYOUT).build("pin", [1, 4, 2, 1, 777])
    assert isinstance(batch, EntityBatch) and len(batch) == 5
    B, K, L, D = 5, LAYOUT.width, 5, 2
    assert batch.neighbor_ids.shape == (B, K) and batch.neighbor_ids.dtype == np.int64
    assert batch.neighbor_scores.dtype == np.float32 and batch.neighbor_mask.dtype == bool
    assert batch.features.token_ids.shape == (B, L) and batch.features.image.shape == (B, D)
    assert batch.neighbor_features.token_ids.shape == (B, K, L) and batch.neighbor_features.image.shape == (
        B,
        K,
        D,
    )
    assert batch.neighbor_features.degree.shape == (B, K) and batch.neighbor_features.present.shape == (B, K)
    assert batch.neighbor_block.tolist() == [0, 0, 1, 2, 2]
    assert batch.neighbor_node_type.tolist() == [BOARD, BOARD, PIN, PIN, PIN]

    assert batch.neighbor_ids.tolist() == [
        [50, 51, 2, 2, 3],
        [-1, -1, -1, -1, -1],  # pin 4: outside the graph -> all padding (3.5)
        [50, -1, -1, 1, -1],
        [50, 51, 2, 2, 3],
        [-1, -1, -1, -1, -1],  # unknown pin
    ]
    np.testing.assert_allclose(batch.neighbor_scores[0], [0.5, 0.25, 0.2, 0.4, 0.1])
    np.testing.assert_allclose(batch.neighbor_scores[2], [0.9, 0, 0, 0.3, 0])
    assert batch.neighbor_mask.tolist()[2] == [True, False, False, True, False]

    # neighbour features are the store's features of those entities
    want = feat.fetch(np.array([BOARD, BOARD, PIN, PIN, PIN]), np.array([50, 51, 2, 2, 3]))
    for name in ("token_ids", "token_lengths", "image", "image_mask", "degree", "present"):
        np.testing.assert_array_equal(getattr(batch.neighbor_features, name)[0], getattr(want, name), err_msg=name)
    # own features: pin 4 is outside the graph but present in the store; pin 777 is nowhere
    own = feat.fetch(np.zeros(5, np.int8), np.array([1, 4, 2, 1, 777]))
    for name in ("token_ids", "image", "degree", "present"):
        np.testing.assert_array_equal(getattr(batch.features, name), getattr(own, name), err_msg=name)
    assert batch.features.present.tolist() == [True, True, True, True, False]
    np.testing.assert_allclose(batch.features.image[1], [4.0, 4.0])
    # zero-imputed neighbours: padding slots have zero features, present False
    pad = ~batch.neighbor_mask
    for name in ("token_ids", "token_lengths", "image", "image_mask", "degree", "present"):
        assert not getattr(batch.neighbor_features, name)[pad].any(), name

    # one store read, every key once: pins 1, 2, 3, boards 50, 51, pin 4, pin 777 (+ the padding row)
    assert len(spy.calls) == 1
    codes, ids, valid = spy.calls[0]
    keys = {(int(c), int(i)) for c, i, v in zip(codes, ids, valid) if v}
    assert len(keys) == int(valid.sum()) == 7
    assert keys == {(PIN, 1), (PIN, 2), (PIN, 3), (BOARD, 50), (BOARD, 51), (PIN, 4), (PIN, 777)}


def test_board_batch_and_empty_batch(world):
    snapshot, feat = world
    cache = HandCache(
        snapshot,
        {(BOARD, 50): [(None, None, 0), (None, None, 0), (PIN, 1, 0.7), (None, None, 0), (None, None, 0)]},
    )
    # a board's layout here only fills the pin_board pin block
    batch = BatchBuilder(snapshot, cache, feat, LAYOUT).build("board", np.array([50, 51]))
    assert batch.entity_type == "board"
    assert batch.neighbor_ids.tolist() == [[-1, -1, 1, -1, -1], [-1] * 5]
    empty = BatchBuilder(snapshot, cache, feat, LAYOUT).build("pin", np.zeros(0, np.int64))
    assert empty.neighbor_ids.shape == (0, LAYOUT.width) and empty.features.token_ids.shape == (0, 5)


def test_real_sampler_and_cache_agree(world, tmp_path):
    snapshot, feat = world
    sampler = NeighborSampler(snapshot, LAYOUT, restart_prob=0.15, budget=1000)
    build_neighborhood_cache(snapshot, sampler, tmp_path / "nbh")
    cache = NeighborhoodCache.open(tmp_path / "nbh", snapshot)
    ids = np.array([1, 2, 3, 4])
    a = BatchBuilder(snapshot, sampler, feat, LAYOUT).build("pin", ids)
    b = BatchBuilder(snapshot, cache, feat, LAYOUT).build("pin", ids)
    np.testing.assert_array_equal(a.neighbor_ids, b.neighbor_ids)
    np.testing.assert_array_equal(a.neighbor_features.token_ids, b.neighbor_features.token_ids)
    nb = sampler.sample(snapshot.lookup(PIN, ids))
    expect = np.where(nb.mask, snapshot.node_id[np.maximum(nb.index, 0)], -1)
    np.testing.assert_array_equal(a.neighbor_ids, expect)
    assert (a.neighbor_ids[3] == -1).all()  # pin 4 outside the graph
    # pin 1 reaches both boards; blocks are score-descending
    assert set(a.neighbor_ids[0, :2].tolist()) == {50, 51}
    for blk_start, k in zip(LAYOUT.offsets, [b.k for b in LAYOUT.blocks]):
        s = a.neighbor_scores[:, blk_start : blk_start + k]
        assert (np.diff(s, axis=1) <= 1e-7).all()


def test_layout_mismatch_and_bad_type(world):
    snapshot, feat = world
    cache = HandCache(snapshot, {})
    with pytest.raises(ValueError, match="layout"):
        BatchBuilder(snapshot, cache, feat, LAYOUT.halved())
    with pytest.raises(ValueError, match="entity_type"):
        BatchBuilder(snapshot, cache, feat, LAYOUT).build("user", [1])
    # a neighbour of the wrong type in a block is an error, not silently mixed features
    wrong = HandCache(
        snapshot,
        {(PIN, 1): [(PIN, 2, 0.5), (None, None, 0), (None, None, 0), (None, None, 0), (None, None, 0)]},
    )
    with pytest.raises(ValueError, match="type code"):
        BatchBuilder(snapshot, wrong, feat, LAYOUT).build("pin", [1])


def test_feature_arrays_dataclass_roundtrip(world):
    _, feat = world
    f = feat.fetch(np.array([PIN]), np.array([1]))
    assert isinstance(f, FeatureArrays) and len(f) == 1
