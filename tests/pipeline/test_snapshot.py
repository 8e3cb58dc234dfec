"""Graph snapshot (graph_engine.snapshot) and the graph_snapshot asset (paper 3.1.1, 3.4.1)."""

from __future__ import annotations

import json
import os

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graph_engine.batch import NODE_TYPE_CODE
from graph_engine.snapshot import GraphSnapshot, SnapshotError, build_snapshot

PIN, BOARD = NODE_TYPE_CODE["pin"], NODE_TYPE_CODE["board"]


def edge_rows(seed: int = 0, pins: int = 40, boards: int = 12) -> dict[str, list]:
    """Pruned-edge entries (contract 'Edges'): both directions of random pin-board and pin-pin edges, with
    large, sparse ids so the dense index is not the identity."""
    rng = np.random.default_rng(seed)
    pin_ids = rng.choice(10**12, size=pins, replace=False)
    board_ids = rng.choice(10**12, size=boards, replace=False)
    cols = {k: [] for k in ("src_type", "src_id", "dst_type", "dst_id", "edge_type", "weight")}

    def add(st, si, dt, di, et, w):
        for a, b, c, d in ((st, si, dt, di), (dt, di, st, si)):
            cols["src_type"].append(a)
            cols["src_id"].append(int(b))
            cols["dst_type"].append(c)
            cols["dst_id"].append(int(d))
            cols["edge_type"].append(et)
            cols["weight"].append(float(w))

    pb = {(int(p), int(b)) for p, b in zip(rng.integers(0, pins, 120), rng.integers(0, boards, 120))}
    for p, b in sorted(pb):
        add("pin", pin_ids[p], "board", board_ids[b], "pin_board", rng.integers(1, 5))
    pp = {(min(a, b), max(a, b)) for a, b in zip(rng.integers(0, pins, 50), rng.integers(0, pins, 50)) if a != b}
    for a, b in sorted(pp):
        add("pin", pin_ids[a], "pin", pin_ids[b], "pin_pin", rng.integers(1, 3))
    return cols


def write_edges(directory, cols: dict[str, list], parts: int = 2, shuffle_seed: int | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "src_type": pa.array(cols["src_type"], pa.string()),
            "src_id": pa.array(cols["src_id"], pa.int64()),
            "dst_type": pa.array(cols["dst_type"], pa.string()),
            "dst_id": pa.array(cols["dst_id"], pa.int64()),
            "edge_type": pa.array(cols["edge_type"], pa.string()),
            "weight": pa.array(cols["weight"], pa.float64()),
        }
    )
    if shuffle_seed is not None:
        table = table.take(np.random.default_rng(shuffle_seed).permutation(table.num_rows))
    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    for i in range(parts):
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), directory / f"part-{i:05d}.parquet")


@pytest.fixture
def built(tmp_path):
    cols = edge_rows()
    write_edges(tmp_path / "edges", cols)
    manifest = build_snapshot(tmp_path / "edges", tmp_path / "snap", None, source_partition="2026-01-05")
    return cols, manifest, GraphSnapshot.open(tmp_path / "snap")


def test_id_round_trip_and_memmap(built):
    cols, manifest, snap = built
    n = snap.num_nodes
    nodes = {(t, i) for t, i in zip(cols["src_type"], cols["src_id"])} | {
        (t, i) for t, i in zip(cols["dst_type"], cols["dst_id"])
    }
    assert n == len(nodes) == manifest["num_nodes"]
    # dense index -> (type, id) -> dense index
    np.testing.assert_array_equal(snap.lookup(snap.node_type, snap.node_id), np.arange(n))
    # (type, id) -> dense index -> (type, id), and order = sorted by (type code, id)
    types = np.array([NODE_TYPE_CODE[t] for t, _ in sorted(nodes)], dtype=np.int8)
    ids = np.array([i for _, i in sorted(nodes)], dtype=np.int64)
    dense = snap.lookup(types, ids)
    assert (dense >= 0).all()
    np.testing.assert_array_equal(snap.node_type[dense], types)
    np.testing.assert_array_equal(snap.node_id[dense], ids)
    order = np.lexsort((snap.node_id, snap.node_type))
    np.testing.assert_array_equal(order, np.arange(n))
    # absent ids, a board id asked as a pin, an unknown type code -> -1
    some_board = int(snap.node_id[snap.type_range("board")[0]])
    assert snap.lookup(np.array([PIN, PIN, 7], np.int8), np.array([-5, some_board, ids[0]])).tolist() == [
        -1,
        -1,
        -1,
    ]
    assert snap.lookup(BOARD, [some_board]).tolist() == [snap.type_range("board")[0]]
    # loading maps the files, it does not read them into memory
    for arr in (snap.node_type, snap.node_id, snap.degree(), *snap.csr("pin_board"), *snap.csr("pin_pin")):
        assert isinstance(arr, np.memmap)
    assert snap.node_type.dtype == np.int8 and snap.node_id.dtype == np.int64
    indptr, indices, weights = snap.csr("pin_board")
    assert (indptr.dtype, indices.dtype, weights.dtype) == (np.int64, np.int32, np.float32)
    assert snap.subsets == {"pin_board": ("pin_board",), "pin_pin": ("pin_pin",)}
    assert manifest["source_partition"] == "2026-01-05"


def test_csr_holds_exactly_the_entries_of_each_subset(built):
    cols, manifest, snap = built
    src = snap.lookup(np.array([NODE_TYPE_CODE[t] for t in cols["src_type"]], np.int8), np.array(cols["src_id"]))
    dst = snap.lookup(np.array([NODE_TYPE_CODE[t] for t in cols["dst_type"]], np.int8), np.array(cols["dst_id"]))
    et = np.array(cols["edge_type"])
    w = np.array(cols["weight"])
    for subset in ("pin_board", "pin_pin"):
        indptr, indices, weights = snap.csr(subset)
        got = sorted(
            (u, int(indices[e]), float(weights[e]))
            for u in range(snap.num_nodes)
            for e in range(indptr[u], indptr[u + 1])
        )
        sel = et == subset
        want = sorted(zip(src[sel].tolist(), dst[sel].tolist(), w[sel].tolist()))
        assert got == want
        assert manifest["subsets"][subset]["num_entries"] == int(sel.sum())
        # rows sorted by neighbour index
        for u in range(snap.num_nodes):
            assert np.all(np.diff(indices[indptr[u] : indptr[u + 1]]) > 0)
    # degree = entries in the node's adjacency list over all edge types
    np.testing.assert_array_equal(snap.degree(), np.bincount(src, minlength=snap.num_nodes))
    # pin_board only links pins and boards; pin_pin only pins
    pb_ptr, pb_idx, _ = snap.csr("pin_board")
    rows = np.repeat(np.arange(snap.num_nodes), np.diff(pb_ptr))
    assert np.all(snap.node_type[rows] != snap.node_type[pb_idx])
    _pp_ptr, pp_idx, _ = snap.csr("pin_pin")
    assert np.all(snap.node_type[pp_idx] == PIN)


def test_same_input_gives_same_arrays_whatever_the_file_and_row_order(tmp_path):
    cols = edge_rows(seed=3)
    write_edges(tmp_path / "a", cols, parts=1)
    write_edges(tmp_path / "b", cols, parts=3, shuffle_seed=9)
    ma = build_snapshot(tmp_path / "a", tmp_path / "sa", None, "2026-01-01")
    mb = build_snapshot(tmp_path / "b", tmp_path / "sb", None, "2026-01-01")
    assert {k: v["sha256"] for k, v in ma["arrays"].items()} == {k: v["sha256"] for k, v in mb["arrays"].items()}
    for rel in ma["arrays"]:
        np.testing.assert_array_equal(np.load(tmp_path / "sa" / rel), np.load(tmp_path / "sb" / rel))
    # checksums in the manifest are real: verify passes, then fails after corruption
    GraphSnapshot.open(tmp_path / "sa", verify=True)
    path = tmp_path / "sa" / "csr" / "pin_pin" / "weights.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="sha256"):
        GraphSnapshot.open(tmp_path / "sa", verify=True)


def test_custom_subsets_and_duplicate_entries(tmp_path):
    cols = edge_rows(seed=4)
    # repeat the first entry: merged by summing weights
    for k in cols:
        cols[k].append(cols[k][0])
    write_edges(tmp_path / "e", cols)
    m = build_snapshot(tmp_path / "e", tmp_path / "s", {"all": ("pin_board", "pin_pin")}, "d")
    snap = GraphSnapshot.open(tmp_path / "s")
    assert snap.subsets == {"all": ("pin_board", "pin_pin")}
    assert m["subsets"]["all"]["duplicate_entries_merged"] == 1
    assert m["subsets"]["all"]["num_entries"] == len(cols["weight"]) - 1
    u = snap.lookup(NODE_TYPE_CODE[cols["src_type"][0]], [cols["src_id"][0]])[0]
    v = snap.lookup(NODE_TYPE_CODE[cols["dst_type"][0]], [cols["dst_id"][0]])[0]
    indptr, indices, weights = snap.csr("all")
    row = slice(indptr[u], indptr[u + 1])
    assert weights[row][indices[row] == v].tolist() == [2 * cols["weight"][0]]
    with pytest.raises(KeyError, match="pin_pin"):
        snap.csr("pin_pin")


def test_empty_partition_gives_an_empty_snapshot(tmp_path):
    (tmp_path / "e").mkdir()
    m = build_snapshot(tmp_path / "e", tmp_path / "s", None, "d")
    snap = GraphSnapshot.open(tmp_path / "s")
    assert m["num_nodes"] == snap.num_nodes == 0
    assert snap.csr("pin_board")[0].tolist() == [0]
    assert snap.lookup(PIN, [1, 2]).tolist() == [-1, -1]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t: t.drop_columns(["weight"]), r"bad\.parquet.*weight"),
        (
            lambda t: t.set_column(0, "src_type", pa.array(["user"] * t.num_rows)),
            r"bad\.parquet.*src_type.*user",
        ),
        (lambda t: t.set_column(5, "weight", pa.array([-1.0] * t.num_rows)), r"bad\.parquet.*weight"),
        (lambda t: t.set_column(1, "src_id", pa.array(["x"] * t.num_rows)), r"bad\.parquet.*src_id"),
    ],
)
def test_bad_input_names_file_and_field(tmp_path, mutate, match):
    write_edges(tmp_path / "e", edge_rows(), parts=1)
    good = pq.read_table(tmp_path / "e" / "part-00000.parquet")
    pq.write_table(mutate(good), tmp_path / "e" / "bad.parquet")
    with pytest.raises(SnapshotError, match=match):
        build_snapshot(tmp_path / "e", tmp_path / "s", None, "d")


# ----------------------------------------------------------------------------------------- asset


def _materialize(day: str, config: dict | None = None, raise_on_error: bool = True):
    from assets.snapshot import graph_snapshot
    from omnisage_pipeline.resources import StorageResource
    from omnisage_pipeline.settings import Settings

    return dg.materialize(
        [graph_snapshot],
        partition_key=day,
        resources={"storage": StorageResource.from_settings(Settings.from_env())},
        run_config={"ops": {"graph_snapshot": {"config": config or {}}}},
        raise_on_error=raise_on_error,
    )


def test_asset_publishes_snapshot_and_cache_atomically(omnisage_env, tmp_path):
    from graph_engine.neighbor_sampler import NeighborhoodCache
    from omnisage_pipeline.settings import Settings
    from omnisage_pipeline.storage.publish import publish_partition

    settings = Settings.from_env()
    day = "2026-01-03"
    cols = edge_rows(seed=5)
    with publish_partition(settings.warehouse_dataset("pruned_edges"), day) as staging:
        write_edges(staging, cols)

    result = _materialize(day, {"budget": 100000, "blocks": ["pin_board:pin:3", "pin_board:board:2", "pin_pin:pin:4"]})
    assert result.success
    link = settings.graph_dir / f"dt={day}"
    assert link.is_symlink()
    snap = GraphSnapshot.open(link, verify=True)
    assert snap.source_partition == day
    cache = NeighborhoodCache.open(link / "neighborhoods", snapshot=snap)
    assert cache.budget == 100000 and cache.layout.width == 9
    mat = result.asset_materializations_for_node("graph_snapshot")[0]
    assert mat.metadata["num_nodes"].value == snap.num_nodes
    assert mat.metadata["sampling_seconds"].value >= 0
    first_version = os.path.realpath(link)
    first_ids = np.array(snap.node_id)
    del snap, cache

    # a failing rebuild (unreadable input) leaves the published version untouched and no staging behind
    bad_day_dir = settings.warehouse_dataset("pruned_edges") / f"dt={day}"
    (bad_day_dir / "zz-corrupt.parquet").write_bytes(b"not parquet")
    failed = _materialize(day, raise_on_error=False)
    assert not failed.success
    assert os.path.realpath(link) == first_version
    np.testing.assert_array_equal(GraphSnapshot.open(link).node_id, first_ids)
    assert not any((settings.graph_dir / ".staging").glob(f"dt={day}.*"))
    (bad_day_dir / "zz-corrupt.parquet").unlink()

    # a successful rebuild swaps the link to a new, complete version with the same content
    assert _materialize(day).success
    assert os.path.realpath(link) != first_version
    snap2 = GraphSnapshot.open(link, verify=True)
    np.testing.assert_array_equal(snap2.node_id, first_ids)
    cfg = json.loads((link / "neighborhoods" / "config.json").read_text())
    assert cfg["budget"] == 10_000 and [b["k"] for b in cfg["layout"]] == [25, 75, 50]


def test_asset_requires_published_pruned_edges(omnisage_env):
    with pytest.raises(Exception, match="pruned_edges"):
        _materialize("2026-01-04")
