"""Feature store + Featurizer: record round trip, missing and corrupt keys, entities outside the graph,
D = 0, deterministic rebuilds, read-only readers, and the asset's atomic publish."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rocksdict import Rdict

from graph_engine.feature_store import (
    FLAG_IMAGE,
    FLAG_IN_GRAPH,
    FLAG_METADATA,
    HEADER_DTYPE,
    MANIFEST_KEY,
    FeatureStoreError,
    build_feature_store,
    encode_keys,
    key_list,
    open_store,
    store_options,
)
from graph_engine.featurizer import CorruptRecordError, Featurizer
from graph_engine.snapshot import GraphSnapshot, build_snapshot
from graph_engine.tokenizer import tokenize_batch

PIN, BOARD = 0, 1
DAY = "2026-01-05"

PINS = {
    "pin_id": [10, 11, 12, -5, 13],
    "title": ["Red running shoes", "Chocolate cake", None, "Négatif ÉTÉ", "lonely pin"],
    "description": ["lightweight", "easy recipe with cocoa", "no title here", "", None],
    "image_embedding": [
        [0.5, -1.25, 3.0, 0.1],
        None,
        [1e-3, 2.0, -7.5, 100.0],
        [0.0, 0.0, 1.0, 0.0],
        [9.0, 8.0, 7.0, 6.0],
    ],
    "segment": ["organic", "promoted", None, "organic", "video"],
}
BOARDS = {"board_id": [100, 101], "name": ["Shoes", "Desserts"], "description": ["all shoes", None]}
# Graph: pins 10, 11, 99 (99 has no metadata), boards 100, 102 (102 has no metadata); pins 12, -5, 13 and
# board 101 are outside the graph.
EDGES = [
    ("pin", 10, "board", 100, "pin_board"),
    ("pin", 11, "board", 100, "pin_board"),
    ("pin", 99, "board", 102, "pin_board"),
    ("pin", 10, "pin", 11, "pin_pin"),
]


def write_metadata(
    root: Path, pins: dict | None = PINS, boards: dict | None = BOARDS, with_images: bool = True
) -> Path:
    (root / "pins").mkdir(parents=True, exist_ok=True)
    (root / "boards").mkdir(parents=True, exist_ok=True)
    if pins is not None:
        cols = {
            "pin_id": pa.array(pins["pin_id"], pa.int64()),
            "title": pa.array(pins["title"], pa.string()),
            "description": pa.array(pins["description"], pa.string()),
            "image_embedding": pa.array(
                pins["image_embedding"] if with_images else [None] * len(pins["pin_id"]),
                pa.list_(pa.float32()),
            ),
            "segment": pa.array(pins["segment"], pa.string()),
        }
        pq.write_table(pa.table(cols), root / "pins" / "part-0.parquet")
    if boards is not None:
        pq.write_table(
            pa.table({k: pa.array(v, pa.int64() if k == "board_id" else pa.string()) for k, v in boards.items()}),
            root / "boards" / "part-0.parquet",
        )
    return root


def write_edges(root: Path, edges=EDGES) -> Path:
    """Pruned edges in the contract's layout: one directed row per kept entry (both directions here)."""
    rows = []
    for st, s, dt, d, et in edges:
        rows.append((st, s, dt, d, et))
        rows.append((dt, d, st, s, et))
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "src_type": [r[0] for r in rows],
                "src_id": pa.array([r[1] for r in rows], pa.int64()),
                "dst_type": [r[2] for r in rows],
                "dst_id": pa.array([r[3] for r in rows], pa.int64()),
                "edge_type": [r[4] for r in rows],
                "weight": pa.array([1.0] * len(rows), pa.float64()),
            }
        ),
        root / "part-0.parquet",
    )
    return root


@pytest.fixture
def store(tmp_path) -> tuple[Path, GraphSnapshot, dict]:
    meta = write_metadata(tmp_path / "meta")
    build_snapshot(write_edges(tmp_path / "edges"), tmp_path / "graph", None, DAY)
    snapshot = GraphSnapshot.open(tmp_path / "graph")
    manifest = build_feature_store(meta, snapshot, tmp_path / "features", max_tokens=32, source_partition=DAY)
    return tmp_path / "features", snapshot, manifest


def test_record_round_trip(store):
    path, snapshot, manifest = store
    assert manifest["image_dim"] == 4
    with Featurizer(path, max_tokens=32) as feat:
        assert feat.image_dim == 4
        got = feat.fetch(np.zeros(5, np.int8), np.array(PINS["pin_id"]))
    off, tok = tokenize_batch(PINS["title"], PINS["description"], max_tokens=32)
    for i in range(5):
        n = off[i + 1] - off[i]
        assert got.token_lengths[i] == n
        np.testing.assert_array_equal(got.token_ids[i, :n], tok[off[i] : off[i + 1]].astype(np.int64))
        assert (got.token_ids[i, n:] == 0).all()
    img = np.array([v if v is not None else [0.0] * 4 for v in PINS["image_embedding"]], np.float32)
    np.testing.assert_allclose(got.image, img, rtol=1e-3, atol=1e-4)  # float16 storage
    assert got.image_mask.tolist() == [True, False, True, True, True]
    assert got.present.all()
    deg = snapshot.degree()[snapshot.lookup(PIN, np.array(PINS["pin_id"]))]
    assert got.degree.tolist() == [2.0, 2.0, 0.0, 0.0, 0.0] and deg[0] == 2
    assert got.token_ids.dtype == np.int64 and got.token_lengths.dtype == np.int32
    assert got.image.dtype == np.float32 and got.degree.dtype == np.float32


def test_header_fields_and_segments(store):
    path, _, manifest = store
    assert manifest["segments"] == ["organic", "promoted", "video"]
    db = open_store(path)
    try:
        raw = db[encode_keys(np.array([PIN]), np.array([11])).tobytes()]
        h = np.frombuffer(raw[:12], HEADER_DTYPE)[0]
        assert h["version"] == 1 and h["segment"] == 2  # 1 + index of "promoted"
        assert h["flags"] == FLAG_METADATA | FLAG_IN_GRAPH  # no image
        raw = db[encode_keys(np.array([PIN]), np.array([12])).tobytes()]
        h = np.frombuffer(raw[:12], HEADER_DTYPE)[0]
        assert h["flags"] == FLAG_METADATA | FLAG_IMAGE and h["segment"] == 0 and h["degree"] == 0
    finally:
        db.close()


def test_entities_outside_graph_and_without_metadata(store):
    path, _, manifest = store
    # 5 pins + 2 boards with metadata, + pin 99 and board 102 only in the graph
    assert manifest["entities"] == 9
    assert manifest["entities_without_metadata"] == 2
    assert manifest["entities_outside_graph"] == 4  # pins 12, -5, 13 and board 101
    with Featurizer(path) as feat:
        got = feat.fetch(np.array([PIN, PIN, BOARD, BOARD, PIN]), np.array([13, 99, 101, 102, 12]))
    assert got.present.all()
    assert got.degree.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert got.token_lengths[1] == 0 and got.token_lengths[3] == 0  # graph-only nodes: empty features
    assert got.token_lengths[0] > 0 and got.token_lengths[2] > 0


def test_missing_keys_are_zeros(store):
    path, _, _ = store
    with Featurizer(path, max_tokens=6) as feat:
        got = feat.fetch(
            np.array([PIN, BOARD, PIN, BOARD]),
            np.array([10, 10, 123456, 100]),
            valid=np.array([1, 1, 1, 0], bool),
        )
    assert got.present.tolist() == [True, False, False, False]
    assert got.token_ids.shape == (4, 6) and got.image.shape == (4, 4)
    for name in ("token_ids", "token_lengths", "image", "degree"):
        assert not getattr(got, name)[1:].any(), name
    assert not got.image_mask[1:].any()
    assert got.token_lengths[0] == 6  # truncated to the Featurizer's L


def test_large_request_in_any_order(store):
    """More keys than one multi_get chunk, shuffled, with duplicates and misses: every row matches the
    single-key answer (the Featurizer sorts keys and decodes back into request order)."""
    path, _, _ = store
    codes = np.array([PIN] * 6 + [BOARD] * 4)
    ids = np.array([10, 11, 12, 13, 99, 424242, 100, 101, 102, 10])
    rng = np.random.default_rng(0)
    pick = rng.integers(0, ids.size, size=5000)
    with Featurizer(path) as feat:
        big = feat.fetch(codes[pick], ids[pick])
        single = [feat.fetch(codes[i : i + 1], ids[i : i + 1]) for i in range(ids.size)]
    for name in ("token_ids", "token_lengths", "image", "image_mask", "degree", "present"):
        want = np.concatenate([getattr(single[i], name) for i in pick])
        np.testing.assert_array_equal(getattr(big, name), want, err_msg=name)
    assert big.present.sum() == np.isin(pick, [5, 9], invert=True).sum()  # pin 424242 and board 10 missing


def test_corrupt_record_names_the_key(store):
    path, _, _ = store
    db = Rdict(str(path), options=store_options())
    key = encode_keys(np.array([PIN]), np.array([-5])).tobytes()
    good = db[key]
    db[key] = good[:-3]  # truncated value
    db.close()
    with Featurizer(path) as feat:
        ok = feat.fetch(np.array([PIN]), np.array([10]))
        assert ok.present[0]
        with pytest.raises(CorruptRecordError, match=r"pin id=-5"):
            feat.fetch(np.array([PIN, PIN]), np.array([10, -5]))
    db = Rdict(str(path), options=store_options())
    db[key] = bytes([9]) + good[1:]  # unknown format version
    db.close()
    with Featurizer(path) as feat, pytest.raises(CorruptRecordError, match=r"pin id=-5.*version"):
        feat.fetch(np.array([PIN]), np.array([-5]))


def test_readers_are_read_only(store):
    path, _, _ = store
    feat = Featurizer(path)
    with pytest.raises(Exception, match="(?i)read.?only|not supported|readonly"):
        feat._store()[b"\x00" * 9] = b"x"
    feat.close()


def test_no_image_vectors_gives_dim_zero(tmp_path):
    meta = write_metadata(tmp_path / "meta", with_images=False)
    manifest = build_feature_store(meta, None, tmp_path / "features")
    assert manifest["image_dim"] == 0 and manifest["entities_in_graph"] == 0
    with Featurizer(tmp_path / "features") as feat:
        got = feat.fetch(np.zeros(3, np.int8), np.array([10, 11, 999]))
    assert feat.image_dim == 0
    assert got.image.shape == (3, 0) and got.image.dtype == np.float32
    assert got.present.tolist() == [True, True, False]


def test_rebuild_gives_same_keys_and_values(tmp_path, store):
    path, snapshot, _ = store
    meta = tmp_path / "meta"
    build_feature_store(meta, snapshot, tmp_path / "again", max_tokens=32, source_partition=DAY)
    a, b = open_store(path), open_store(tmp_path / "again")
    try:
        items_a, items_b = list(a.items()), list(b.items())
    finally:
        a.close()
        b.close()
    assert items_a == items_b and len(items_a) == 10  # 9 records + the manifest
    keys = [k for k, _ in items_a if k != MANIFEST_KEY]
    # keys sort as (type code, id as unsigned big-endian): pins first, then boards
    assert keys == key_list(encode_keys(np.array([0] * 6 + [1] * 3), np.array([10, 11, 12, 13, 99, -5, 100, 101, 102])))


def _all_items(path: Path) -> list[tuple[bytes, bytes]]:
    db = open_store(path)
    try:
        return list(db.items())
    finally:
        db.close()


def _many_entities(root: Path, n_pins: int, n_boards: int) -> Path:
    """Metadata with enough rows that several writer ranges hold pins, boards or both."""
    rng = np.random.default_rng(3)
    pins = {
        "pin_id": rng.choice(10**9, n_pins, replace=False).tolist(),
        "title": [f"Pin {i} title" if i % 5 else None for i in range(n_pins)],
        "description": [f"deskription Ü{i % 7}" for i in range(n_pins)],
        "image_embedding": [[float(i), 1.0, -2.0, 0.5] if i % 3 else None for i in range(n_pins)],
        "segment": [("organic", "video", None)[i % 3] for i in range(n_pins)],
    }
    boards = {
        "board_id": rng.choice(10**9, n_boards, replace=False).tolist(),
        "name": [f"Board {i}" for i in range(n_boards)],
        "description": [None] * n_boards,
    }
    return write_metadata(root, pins, boards)


@pytest.mark.parametrize("processes", [2, 3])
def test_parallel_sst_writers_give_the_single_process_store(tmp_path, processes):
    meta = _many_entities(tmp_path / "meta", n_pins=250, n_boards=40)
    build_snapshot(write_edges(tmp_path / "edges"), tmp_path / "graph", None, DAY)
    snapshot = GraphSnapshot.open(tmp_path / "graph")
    one = build_feature_store(meta, snapshot, tmp_path / "one", source_partition=DAY, writer_processes=1)
    many = build_feature_store(
        meta,
        snapshot,
        tmp_path / "many",
        source_partition=DAY,
        writer_processes=processes,
        min_records_per_process=1,
    )
    assert one["sst_files"] == 1 and many["sst_files"] == processes
    # Several files were really ingested side by side (disjoint ranges: no compaction merged them).
    assert len(list((tmp_path / "many").glob("*.sst"))) == processes
    items_one, items_many = _all_items(tmp_path / "one"), _all_items(tmp_path / "many")
    assert len(items_one) == one["entities"] + 1 == 250 + 40 + 5 + 1  # + the 5 graph nodes, + the manifest
    assert items_many == items_one


def test_writer_ranges_are_contiguous_and_keys_must_increase(tmp_path):
    from graph_engine.sst_writer import keys_strictly_increasing, record_ranges

    assert record_ranges(10, 3, 1) == [(0, 3), (3, 6), (6, 10)]
    assert record_ranges(10, 3, 4) == [(0, 5), (5, 10)]  # each range holds at least 4 records
    assert record_ranges(0, 2, 100) == [(0, 0)]
    keys = encode_keys(np.array([0, 0, 1, 1]), np.array([5, -1, 3, 7]))  # -1 sorts after 5 (unsigned)
    assert keys_strictly_increasing(keys)
    assert not keys_strictly_increasing(keys[[0, 2, 1, 3]])
    assert not keys_strictly_increasing(keys[[0, 1, 1, 2]])  # a repeated key
    from graph_engine.feature_store import write_store

    with pytest.raises(FeatureStoreError, match="not strictly increasing"):
        write_store(tmp_path / "bad", keys[[1, 0]], np.zeros(0, np.uint8), np.zeros(3, np.int64), {})


def test_bad_input_names_file_and_field(tmp_path):
    meta = write_metadata(tmp_path / "meta")
    pq.write_table(pa.table({"board_id": pa.array([1], pa.int64()), "name": ["x"]}), meta / "boards" / "part-1.parquet")
    with pytest.raises(FeatureStoreError, match=r"part-1\.parquet.*'description'"):
        build_feature_store(meta, None, tmp_path / "f1")
    meta2 = write_metadata(tmp_path / "meta2")
    pq.write_table(
        pa.table(
            {
                "pin_id": pa.array([77], pa.int64()),
                "title": ["t"],
                "description": ["d"],
                "image_embedding": pa.array([[1.0, 2.0]], pa.list_(pa.float32())),
                "segment": ["organic"],
            }
        ),
        meta2 / "pins" / "part-1.parquet",
    )
    with pytest.raises(FeatureStoreError, match=r"image_embedding.*different lengths"):
        build_feature_store(meta2, None, tmp_path / "f2")


# ------------------------------------------------------------------------------------------- asset level


def _materialize(day: str = DAY):
    from assets.features import feature_store
    from omnisage_pipeline.resources import StorageResource
    from omnisage_pipeline.settings import Settings

    storage = StorageResource.from_settings(Settings.from_env())
    return dg.materialize([feature_store], partition_key=day, resources={"storage": storage})


def _write_inputs(settings, pins=PINS, edges=EDGES):
    from omnisage_pipeline.storage.publish import publish_partition

    with publish_partition(settings.warehouse_dataset("entity_metadata"), DAY) as staging:
        write_metadata(staging, pins=pins)
    with publish_partition(settings.warehouse_dataset("pruned_edges"), DAY) as staging:
        write_edges(staging, edges)
    pruned = settings.warehouse_dataset("pruned_edges") / f"dt={DAY}"
    with publish_partition(settings.graph_dir, DAY) as staging:
        build_snapshot(pruned.resolve(), staging, None, DAY)


def test_asset_publishes_atomically(omnisage_env):
    from omnisage_pipeline.settings import Settings
    from omnisage_pipeline.storage.publish import published_path

    settings = Settings.from_env()
    _write_inputs(settings)
    result = _materialize()
    assert result.success
    link = settings.features_dir / f"dt={DAY}"
    assert link.is_symlink() and ".versions" in os.readlink(link)
    mats = result.asset_materializations_for_node("feature_store")
    md = mats[0].metadata
    assert md["entities"].value == 9 and md["entities_outside_graph"].value == 4 and md["image_dim"].value == 4
    first = published_path(settings.features_dir, DAY)
    with Featurizer(link) as feat:
        before = feat.fetch(np.zeros(2, np.int8), np.array([10, 12]))
    assert before.present.all()

    # A re-run killed after the build finished but before the swap leaves the old partition intact.
    pins2 = dict(PINS, title=["changed"] * 5)
    from omnisage_pipeline.storage.publish import publish_partition

    with publish_partition(settings.warehouse_dataset("entity_metadata"), DAY) as staging:
        write_metadata(staging, pins=pins2)
    script = textwrap.dedent(
        f"""
        import dagster as dg
        from assets.features import feature_store
        from omnisage_pipeline.resources import StorageResource
        from omnisage_pipeline.settings import Settings
        dg.materialize([feature_store], partition_key={DAY!r},
                       resources={{"storage": StorageResource.from_settings(Settings.from_env())}})
        """
    )
    env = dict(os.environ, OMNISAGE_FAULT_PHASE="staged", OMNISAGE_FAULT_DATASET="features")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert published_path(settings.features_dir, DAY) == first
    with Featurizer(link) as feat:
        after = feat.fetch(np.zeros(2, np.int8), np.array([10, 12]))
    np.testing.assert_array_equal(after.token_ids, before.token_ids)

    # A failing build (unreadable metadata) also keeps the published version and cleans its staging.
    bad = settings.warehouse_dataset("entity_metadata") / f"dt={DAY}" / "pins" / "part-9.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(Exception) as info:
        _materialize()
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__
    assert any("part-9.parquet" in m for m in chain), chain
    assert published_path(settings.features_dir, DAY) == first
    # the failed run removed its own staging and the killed run's (dead pid) staging
    assert list((settings.features_dir / ".staging").iterdir()) == []
    bad.unlink()

    # A successful re-run publishes the new content.
    assert _materialize().success
    assert published_path(settings.features_dir, DAY) != first
    with Featurizer(link) as feat:
        new = feat.fetch(np.zeros(1, np.int8), np.array([10]))
    np.testing.assert_array_equal(
        new.token_ids[0, : new.token_lengths[0]],
        tokenize_batch(["changed"], ["lightweight"], max_tokens=32)[1],
    )
