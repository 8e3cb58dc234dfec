"""Serving with the contract's whole int64 id range: negative pin, board and user ids, int64 min and max,
through the index build, its blocking recall check, ``nearest`` (padding when the index is smaller than k)
and the HTTP routes. FAISS labels are row positions, so no id value means "padding"."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from test_serving import publish_embeddings, unit

from omnisage_pipeline.serving.build import CheckParams, build_day_index, publish_index, recall_at_k
from omnisage_pipeline.serving.index import IndexParams, LoadedIndex, TypeIndex
from omnisage_pipeline.serving.neighbors import nearest, open_index
from omnisage_pipeline.serving.vectors import Vectors
from omnisage_pipeline.storage.publish import published_path

I64 = np.iinfo(np.int64)
DAY = "2026-01-01"
EXTREMES = np.array([I64.min, I64.min + 1, -5, -1, 0, I64.max], dtype=np.int64)


def ids_with_extremes(n: int, seed: int) -> np.ndarray:
    """``n`` sorted unique ids, most of them negative, int64 min and max among them."""
    rng = np.random.default_rng(seed)
    rest = -(10**15) + 997 * rng.choice(10**12, size=n - EXTREMES.size, replace=False)  # never -6, -5, 0
    ids = np.unique(np.concatenate([EXTREMES, rest]))
    assert ids.size == n and (ids < 0).mean() > 0.5
    return ids


def int64_source(pins: int = 400, boards: int = 120) -> dict[str, Vectors]:
    rng = np.random.default_rng(3)
    return {
        "pin": Vectors(ids_with_extremes(pins, 1), unit(rng, pins)),
        "board": Vectors(ids_with_extremes(boards, 2), unit(rng, boards)),
    }


def int64_users() -> Vectors:
    ids = np.array([I64.min, -7, -1, 0, 5, I64.max], dtype=np.int64)
    return Vectors(ids, unit(np.random.default_rng(4), ids.size))


def exact_neighbours(source: Vectors, query: np.ndarray, k: int, exclude: int | None = None) -> list[int]:
    _, rows = faiss.knn(
        np.ascontiguousarray(query[None]), source.matrix, len(source), metric=faiss.METRIC_INNER_PRODUCT
    )
    return [int(i) for i in source.ids[rows[0]] if exclude is None or i != exclude][:k]


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_negative_and_extreme_ids_pass_the_index_check(tmp_path, index_type):
    source = int64_source()
    params = IndexParams(index_type=index_type, ivf_nlist=8, pq_nbits=6)  # 64 PQ centroids: 120 boards train
    manifest = publish_index(tmp_path, DAY, source, int64_users(), params, CheckParams(), "1")
    recall = manifest["check"]["recall"]
    assert min(recall.values()) >= 0.95, recall
    if index_type == "flat":
        assert recall == {"pin": 1.0, "board": 1.0}
    loaded = LoadedIndex.open(published_path(tmp_path, DAY))
    for t in ("pin", "board"):
        ids, scores, found = loaded.types[t].search(source[t].matrix[:2], 5)
        assert found.all() and ids[0, 0] == source[t].ids[0] == I64.min  # a vector's nearest is itself
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_a_tiny_index_with_negative_ids_passes_the_check(tmp_path):
    # 8 pins, 2 of them negative: every one must count as a hit (each is a normal id, not padding)
    rng = np.random.default_rng(0)
    pins = Vectors(np.array([-9, -1, 1, 2, 3, 4, 5, 6], dtype=np.int64), unit(rng, 8))
    boards = Vectors(np.array([I64.min, I64.max], dtype=np.int64), unit(rng, 2))
    manifest = publish_index(tmp_path, DAY, {"pin": pins, "board": boards}, None, IndexParams(), CheckParams(), "1")
    assert manifest["check"]["recall"] == {"pin": 1.0, "board": 1.0}


def test_recall_counts_a_repeated_negative_id_once():
    rng = np.random.default_rng(0)
    source = Vectors(np.arange(-9, -1, dtype=np.int64), unit(rng, 8))
    index = faiss.IndexFlatIP(source.dim)
    index.add(source.matrix)
    rows = np.arange(8)
    assert recall_at_k(TypeIndex("pin", "flat", index, source.ids, source.matrix), source, rows, 8) == 1.0
    repeated = source.ids.copy()
    repeated[1] = repeated[0]  # a corrupted id array: one id returned twice, another never
    broken = TypeIndex("pin", "flat", index, repeated, source.matrix)
    assert recall_at_k(broken, source, rows, 8) == pytest.approx(7 / 8)


def test_search_marks_padding_with_the_mask_not_an_id():
    ids = np.array([-1, 0, I64.max], dtype=np.int64)
    matrix = unit(np.random.default_rng(1), 3)
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)
    found_ids, scores, found = TypeIndex("pin", "flat", index, ids, matrix).search(matrix[:1], 5)
    assert found.tolist() == [[True, True, True, False, False]]
    assert sorted(found_ids[found].tolist()) == sorted(ids.tolist()) and np.isneginf(scores[~found]).all()


@pytest.fixture(scope="module")
def int64_home(tmp_path_factory) -> Path:
    """A home whose indexes/dt=DAY (flat) was built from published embeddings with int64-range ids."""
    home = tmp_path_factory.mktemp("int64") / "home"
    publish_embeddings(home, DAY, int64_source(), int64_users(), "2")
    manifest = build_day_index(
        home / "embeddings", home / "user_embeddings", home / "indexes", DAY, IndexParams(), CheckParams()
    )
    assert manifest["check"]["recall"] == {"pin": 1.0, "board": 1.0}
    return home


def test_nearest_returns_negative_ids_and_pads_nothing(int64_home):
    source = int64_source()
    loaded = open_index(int64_home / "indexes")
    boards = source["board"]
    # k above the number of boards: every other board comes back, the negative ones and the extremes too
    got = nearest(loaded, "board", -1, "board", 1000)
    assert sorted(n.id for n in got) == sorted(set(boards.ids.tolist()) - {-1})
    row = int(np.searchsorted(boards.ids, -1))
    assert [n.id for n in got] == exact_neighbours(boards, boards.matrix[row], 1000, exclude=-1)


@pytest.mark.parametrize(
    ("path", "source_type", "query_id", "target"),
    [
        ("/v1/related/pin/-5", "pin", -5, "pin"),
        (f"/v1/related/pin/{I64.min}", "pin", int(I64.min), "pin"),
        (f"/v1/related/board/{I64.max}", "board", int(I64.max), "board"),
        ("/v1/boards/pin/-1", "pin", -1, "board"),
        ("/v1/homefeed/user/-7", "user", -7, "pin"),
        (f"/v1/homefeed/user/{I64.min}", "user", int(I64.min), "pin"),
    ],
)
def test_http_routes_serve_negative_and_extreme_ids(int64_home, path, source_type, query_id, target):
    from fastapi.testclient import TestClient

    from omnisage_pipeline.serving.service import IndexHolder, create_app

    source, users = int64_source(), int64_users()
    queries = users if source_type == "user" else source[source_type]
    query = queries.matrix[int(np.searchsorted(queries.ids, query_id))]
    want = exact_neighbours(source[target], query, 20, exclude=query_id if source_type == target else None)
    holder = IndexHolder(int64_home / "indexes")
    with TestClient(create_app(holder, start_polling=False)) as client:
        assert holder.refresh()
        response = client.get(path, params={"k": 20})
        assert response.status_code == 200, response.text
        items = response.json()["items"]
        assert [i["id"] for i in items] == want and {i["type"] for i in items} == {target}
        assert any(i < 0 for i in want)  # the answer itself holds negative ids
        missing = client.get("/v1/related/pin/-6")
        assert missing.status_code == 404 and "unknown pin id -6" in missing.json()["detail"]


def test_cli_neighbors_takes_negative_and_out_of_range_ids(int64_home):
    import json

    from test_serving import _neighbors

    source = int64_source()
    result = _neighbors(int64_home, "--type", "pin", "--id", "-5", "--k", "5", "--json")
    assert result.exit_code == 0, result.output
    pins = source["pin"]
    want = exact_neighbours(pins, pins.matrix[int(np.searchsorted(pins.ids, -5))], 5, exclude=-5)
    assert [i["id"] for i in json.loads(result.output.strip().splitlines()[-1])] == want
    beyond = _neighbors(int64_home, "--type", "pin", "--id", str(2**63))
    assert beyond.exit_code == 1 and "outside the contract's int64 range" in beyond.output
