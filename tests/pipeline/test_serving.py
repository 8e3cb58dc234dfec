"""Serving the embeddings: the per-type FAISS indexes (flat / HNSW / IVF-PQ with exact re-ranking) against
exact search, the index type chosen by size and memory budget, the blocking recall check refusing a corrupted
staged index, ``omnisage neighbors``, the HTTP service (shape, 404, 422, a day switch under load without a
failed request) and the ``ann_index`` asset on a home with published embeddings. Small random vectors, no
Spark, no model."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import dagster as dg
import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from omnisage_pipeline.serving import build as build_mod
from omnisage_pipeline.serving.build import (
    CHECK_NAME,
    CheckParams,
    IndexCheckError,
    build_day_index,
    publish_index,
)
from omnisage_pipeline.serving.index import IndexParams, LoadedIndex, plan_index_types
from omnisage_pipeline.serving.neighbors import nearest, open_index
from omnisage_pipeline.serving.vectors import EmbeddingsError, Vectors, read_entity_vectors
from omnisage_pipeline.storage.publish import publish_partition, published_path

DIM = 32
PIN_BASE, BOARD_BASE = 10**12, 2 * 10**12
DAY, NEXT_DAY = "2026-01-01", "2026-01-02"


def unit(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    m = rng.standard_normal((n, d)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def random_source(seed: int = 0, pins: int = 3000, boards: int = 600) -> dict[str, Vectors]:
    rng = np.random.default_rng(seed)
    return {
        "pin": Vectors(PIN_BASE + np.arange(pins, dtype=np.int64) * 7, unit(rng, pins)),
        "board": Vectors(BOARD_BASE + np.arange(boards, dtype=np.int64) * 3, unit(rng, boards)),
    }


def random_users(seed: int = 0, n: int = 50) -> Vectors:
    return Vectors(np.arange(n, dtype=np.int64) + 100, unit(np.random.default_rng(seed + 99), n))


def exact_ids(source: Vectors, queries: np.ndarray, k: int) -> np.ndarray:
    _, rows = faiss.knn(np.ascontiguousarray(queries), source.matrix, k, metric=faiss.METRIC_INNER_PRODUCT)
    return source.ids[rows]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b)]))


# --------------------------------------------------------------------------------------------- the index
def test_index_type_is_chosen_by_size_and_memory_budget():
    params = IndexParams(flat_max_vectors=1000)
    assert plan_index_types({"pin": 3000, "board": 600}, DIM, params) == {"pin": "hnsw", "board": "flat"}
    # A budget that holds the HNSW graph of neither type: the largest type switches to IVF-PQ first.
    budget = IndexParams(flat_max_vectors=1000, memory_budget_mb=0.4)
    assert plan_index_types({"pin": 3000, "board": 600}, DIM, budget) == {"pin": "ivfpq", "board": "flat"}
    tiny = IndexParams(flat_max_vectors=1000, memory_budget_mb=0.001)
    with pytest.raises(ValueError, match="memory_budget_mb"):
        plan_index_types({"pin": 3000, "board": 600}, DIM, tiny)
    assert plan_index_types({"pin": 10}, DIM, IndexParams(index_type="hnsw")) == {"pin": "hnsw"}


@pytest.mark.parametrize("flat_max", [10**6, 1000], ids=["flat", "hnsw"])
def test_index_search_matches_exact_search(tmp_path, flat_max):
    source = random_source()
    manifest = publish_index(tmp_path, DAY, source, None, IndexParams(flat_max_vectors=flat_max), CheckParams(), "7")
    assert manifest["types"]["pin"]["index_type"] == ("flat" if flat_max > 3000 else "hnsw")
    loaded = LoadedIndex.open(published_path(tmp_path, DAY))
    queries = unit(np.random.default_rng(5), 200)
    for t in ("pin", "board"):
        ids, scores, found = loaded.types[t].search(queries, 10)
        assert found.all()
        want = exact_ids(source[t], queries, 10)
        if manifest["types"][t]["index_type"] == "flat":
            np.testing.assert_array_equal(ids, want)
        else:
            assert overlap(ids, want) >= 0.95
        rows = np.searchsorted(source[t].ids, ids)  # scores are the inner products of the unit vectors
        np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", source[t].matrix[rows], queries), atol=1e-5)


def test_search_parameters_are_tuned_up_to_the_check(tmp_path):
    source = random_source(pins=3000, boards=0)
    low = IndexParams(flat_max_vectors=1000, hnsw_ef_search=1)  # efSearch 1: far below 0.95 on random vectors
    with pytest.raises(IndexCheckError, match="pin 0"):
        publish_index(tmp_path, DAY, source, None, low, CheckParams(tune=False), "7")
    manifest = publish_index(tmp_path, DAY, source, None, low, CheckParams(), "7")
    tuned = manifest["types"]["pin"]["params"]
    assert tuned["ef_search"] > 1 and tuned["tuning_recall"] >= 0.95 and manifest["check"]["recall"]["pin"] >= 0.95
    assert LoadedIndex.open(published_path(tmp_path, DAY)).types["pin"].index.hnsw.efSearch == tuned["ef_search"]


def test_ivfpq_reranks_candidates_exactly(tmp_path):
    source = random_source(pins=4000)
    params = IndexParams(index_type="ivfpq", ivf_nlist=32, rerank_factor=4)
    manifest = publish_index(tmp_path, DAY, source, None, params, CheckParams(), "7")
    assert {e["index_type"] for e in manifest["types"].values()} == {"ivfpq"}
    assert min(manifest["check"]["recall"].values()) >= 0.95
    pins = LoadedIndex.open(published_path(tmp_path, DAY)).types["pin"]
    queries = unit(np.random.default_rng(6), 100)
    ids, scores, _ = pins.search(queries, 10)
    assert overlap(ids, exact_ids(source["pin"], queries, 10)) >= 0.95
    rows = np.searchsorted(source["pin"].ids, ids)
    exact = np.einsum("qkd,qd->qk", source["pin"].matrix[rows], queries)
    np.testing.assert_allclose(scores, exact, atol=1e-5)  # re-ranked: exact, not PQ-approximated scores
    approx, _ = pins.index.search(queries, 10)  # the PQ scores the re-ranking replaced
    assert np.abs(np.sort(approx, axis=1) - np.sort(exact, axis=1)).max() > 1e-3


def _corrupt_ids(folder: Path, entity_type: str) -> None:
    ids = np.load(folder / f"{entity_type}.ids.npy")
    np.save(folder / f"{entity_type}.ids.npy", np.random.default_rng(1).permutation(ids))


def _corrupt_vectors(folder: Path, entity_type: str) -> None:
    index = faiss.read_index(str(folder / f"{entity_type}.faiss"))
    other = faiss.IndexFlatIP(index.d)
    other.add(unit(np.random.default_rng(2), index.ntotal, index.d))
    faiss.write_index(other, str(folder / f"{entity_type}.faiss"))


@pytest.mark.parametrize("corrupt", [_corrupt_ids, _corrupt_vectors], ids=["ids_permuted", "vectors_replaced"])
def test_check_refuses_to_publish_a_corrupted_index(tmp_path, monkeypatch, corrupt):
    source = random_source()
    good = publish_index(tmp_path, DAY, source, None, IndexParams(), CheckParams(), "7")
    before = published_path(tmp_path, DAY)
    stage = build_mod.stage_type

    def corrupted_stage(folder, entity_type, *args, **kwargs):
        entry = stage(folder, entity_type, *args, **kwargs)
        if entity_type == "pin":
            corrupt(folder, entity_type)
        return entry

    monkeypatch.setattr(build_mod, "stage_type", corrupted_stage)
    with pytest.raises(IndexCheckError, match=rf"{CHECK_NAME}.*dt={NEXT_DAY}.*pin 0\.\d+ < 0\.95"):
        publish_index(tmp_path, NEXT_DAY, source, None, IndexParams(), CheckParams(), "8")
    assert published_path(tmp_path, NEXT_DAY) is None
    with pytest.raises(IndexCheckError, match=rf"dt={DAY}"):  # a re-run of a published day keeps the old one
        publish_index(tmp_path, DAY, source, None, IndexParams(), CheckParams(), "8")
    assert published_path(tmp_path, DAY) == before
    assert json.loads((before / "manifest.json").read_text())["model_version"] == good["model_version"] == "7"


def test_bad_embeddings_name_the_file_and_field(tmp_path):
    from omnisage_pipeline.embedding.day import entity_table

    matrix = unit(np.random.default_rng(0), 4)
    matrix[2, 3] = np.nan
    path = tmp_path / "part-0.parquet"
    pq.write_table(entity_table("pin", np.arange(4), matrix, "1"), path)
    with pytest.raises(EmbeddingsError, match=r"part-0\.parquet: field 'embedding' has 1 non-finite"):
        read_entity_vectors(tmp_path)
    pq.write_table(entity_table("pin", np.array([1, 2, 2, 3]), unit(np.random.default_rng(0), 4), "1"), path)
    with pytest.raises(EmbeddingsError, match="field 'entity_id' repeats id 2"):
        read_entity_vectors(tmp_path)


# --------------------------------------------------------------------------- a home with embeddings
def publish_embeddings(home: Path, day: str, source: dict[str, Vectors], users: Vectors | None, version: str):
    """embeddings/dt=D and user_embeddings/dt=D as entity_embeddings writes them (its table helpers)."""
    from omnisage_pipeline.embedding.day import entity_table, user_table

    with publish_partition(home / "embeddings", day) as staging:
        for t, v in source.items():
            pq.write_table(entity_table(t, v.ids, v.matrix, version), staging / f"part-{t}.parquet")
        (staging / "_manifest.json").write_text(json.dumps({"model_version": version}))
    if users is not None:
        with publish_partition(home / "user_embeddings", day) as staging:
            pq.write_table(user_table(users.ids, users.matrix, version), staging / "part-00000-of-00001.parquet")


def test_user_embeddings_of_another_model_are_left_out(tmp_path):
    from omnisage_pipeline.embedding.day import user_table

    publish_embeddings(tmp_path, DAY, random_source(pins=500, boards=100), None, "5")
    users = random_users()
    with publish_partition(tmp_path / "user_embeddings", DAY) as staging:  # an older model's users
        pq.write_table(user_table(users.ids, users.matrix, "4"), staging / "part-00000-of-00001.parquet")
    logs: list[str] = []
    manifest = build_day_index(
        tmp_path / "embeddings",
        tmp_path / "user_embeddings",
        tmp_path / "indexes",
        DAY,
        IndexParams(),
        CheckParams(),
        log=logs.append,
    )
    assert manifest["counts"]["user"] == 0 and "user_embeddings" not in manifest["inputs"]
    assert any("model 4" in line for line in logs)
    with pytest.raises(LookupError, match="no user embeddings"):
        nearest(open_index(tmp_path / "indexes"), "user", int(users.ids[0]), "pin", 10)


@pytest.fixture(scope="module")
def served_home(tmp_path_factory) -> Path:
    """A home whose indexes/dt=DAY was built (HNSW pins, flat boards) from published embeddings."""
    home = tmp_path_factory.mktemp("served") / "home"
    publish_embeddings(home, DAY, random_source(), random_users(), "3")
    build_day_index(
        home / "embeddings",
        home / "user_embeddings",
        home / "indexes",
        DAY,
        IndexParams(flat_max_vectors=1000),
        CheckParams(),
    )
    return home


def _neighbors(home: Path, *args: str):
    from omnisage_pipeline.cli import main

    return CliRunner().invoke(main, ["neighbors", *args], env={"OMNISAGE_HOME": str(home)})


def test_cli_neighbors_json_excludes_the_query_and_matches_exact_search(served_home):
    source = random_source()
    pins = source["pin"]
    rng = np.random.default_rng(11)
    overlaps = []
    for row in rng.choice(len(pins), 20, replace=False):
        result = _neighbors(served_home, "--type", "pin", "--id", str(pins.ids[row]), "--json")
        assert result.exit_code == 0, result.output
        items = json.loads(result.output.strip().splitlines()[-1])
        assert len(items) == 10 and {i["type"] for i in items} == {"pin"}
        got = [i["id"] for i in items]
        assert int(pins.ids[row]) not in got
        want = [i for i in exact_ids(pins, pins.matrix[row : row + 1], 11)[0] if i != pins.ids[row]][:10]
        overlaps.append(len(set(got) & set(want)) / 10)
        assert all(isinstance(i["id"], int) and isinstance(i["score"], float) for i in items)
    assert np.mean(overlaps) >= 0.95

    boards = _neighbors(
        served_home, "--type", "pin", "--id", str(pins.ids[0]), "--target-type", "board", "--k", "5", "--json"
    )
    items = json.loads(boards.output.strip().splitlines()[-1])
    assert [i["id"] for i in items] == exact_ids(source["board"], pins.matrix[:1], 5)[0].tolist()
    user = _neighbors(served_home, "--user", "100", "--partition", DAY, "--json")
    assert user.exit_code == 0 and len(json.loads(user.output.strip().splitlines()[-1])) == 10


def test_cli_neighbors_unknown_id_fails(served_home):
    result = _neighbors(served_home, "--type", "board", "--id", "5", "--json")
    assert result.exit_code != 0 and "unknown board id 5" in result.output
    assert _neighbors(served_home, "--user", "1").exit_code != 0
    missing = _neighbors(served_home, "--type", "pin", "--id", "5", "--partition", "2025-01-01")
    assert missing.exit_code != 0 and "has not been published" in missing.output


# ------------------------------------------------------------------------------------------ the service
def test_service_answers_404_422_and_healthz(served_home):
    from fastapi.testclient import TestClient

    from omnisage_pipeline.serving.service import IndexHolder, create_app

    holder = IndexHolder(served_home / "indexes")
    with TestClient(create_app(holder, start_polling=False)) as client:
        assert client.get("/healthz").status_code == 503  # nothing loaded yet
        assert client.get(f"/v1/related/pin/{PIN_BASE}").status_code == 503
        assert holder.refresh()
        assert client.get("/healthz").json()["partition"] == DAY
        for path, want in [
            (f"/v1/related/pin/{PIN_BASE}", "pin"),
            (f"/v1/related/board/{BOARD_BASE}", "board"),
            (f"/v1/boards/pin/{PIN_BASE}", "board"),
            ("/v1/homefeed/user/100", "pin"),
        ]:
            body = client.get(path, params={"k": 7}).json()
            assert body["partition"] == DAY and body["model_version"] == "3"
            assert len(body["items"]) == 7 and {i["type"] for i in body["items"]} == {want}
            assert set(body["items"][0]) == {"id", "type", "score"}
        assert PIN_BASE not in [i["id"] for i in client.get(f"/v1/related/pin/{PIN_BASE}").json()["items"]]
        missing = client.get("/v1/related/pin/5")
        assert missing.status_code == 404 and "unknown pin id 5" in missing.json()["detail"]
        assert client.get("/v1/homefeed/user/5").status_code == 404
        assert client.get(f"/v1/related/pin/{PIN_BASE}", params={"k": 0}).status_code == 422
        assert client.get(f"/v1/related/pin/{PIN_BASE}", params={"k": 1001}).status_code == 422
        assert client.get(f"/v1/related/pin/{PIN_BASE}", params={"k": 1000}).status_code == 200
        assert client.get("/docs").status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_day_switch_under_load_loses_no_request(tmp_path):
    import httpx
    import uvicorn

    from omnisage_pipeline.serving.service import IndexHolder, create_app

    home = tmp_path / "home"
    for day, seed in ((DAY, 0), (NEXT_DAY, 1)):
        publish_embeddings(home, day, random_source(seed, pins=1500, boards=300), random_users(seed), day[-1])
    build_day_index(home / "embeddings", home / "user_embeddings", home / "indexes", DAY, IndexParams(), CheckParams())
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(IndexHolder(home / "indexes", poll_seconds=0.05)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    stop, errors, seen = threading.Event(), [], []

    def hammer(worker: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            i = 0
            while not stop.is_set():
                pin = PIN_BASE + 7 * ((worker * 97 + i) % 1500)
                try:
                    r = client.get(f"/v1/related/pin/{pin}", params={"k": 10})
                    if r.status_code != 200 or len(r.json()["items"]) != 10:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        seen.append(r.json()["partition"])
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                i += 1

    workers = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
    try:
        for w in workers:
            w.start()
        time.sleep(0.5)
        build_day_index(
            home / "embeddings", home / "user_embeddings", home / "indexes", NEXT_DAY, IndexParams(), CheckParams()
        )
        deadline = time.monotonic() + 60
        while NEXT_DAY not in seen[-20:] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        for w in workers:
            w.join()
        server.should_exit = True
        thread.join(timeout=10)
    assert errors == []
    # answered from the old day, then from the new one (a request in flight at the swap ends on the old)
    assert seen[0] == DAY and seen[-20:] == [NEXT_DAY] * 20


# ------------------------------------------------------------------------------------------- the asset
def _materialize(day: str, run_config: dict | None = None, raise_on_error: bool = True):
    from assets.serving import ann_index
    from omnisage_pipeline.resources import StorageResource
    from omnisage_pipeline.settings import Settings

    return dg.materialize(
        [ann_index],
        partition_key=day,
        resources={"storage": StorageResource.from_settings(Settings.from_env())},
        run_config=run_config,
        raise_on_error=raise_on_error,
    )


def test_ann_index_asset_publishes_the_day_with_its_manifest_and_retention(omnisage_env):
    from omnisage_pipeline.partitions import daily_partitions

    home = Path(omnisage_env["OMNISAGE_HOME"])
    day = daily_partitions.get_first_partition_key()
    publish_embeddings(home, day, random_source(), random_users(), "5")
    with publish_partition(home / "indexes", "1999-01-01") as staging:  # an expired day: retention removes it
        (staging / "manifest.json").write_text("{}")
    result = _materialize(day, {"ops": {"ann_index": {"config": {"flat_max_vectors": 1000}}}})
    mat = result.asset_materializations_for_node("ann_index")[0]
    meta = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    manifest = json.loads((published_path(home / "indexes", day) / "manifest.json").read_text())
    assert manifest["partition"] == day and manifest["model_version"] == "5" and manifest["dimension"] == DIM
    assert manifest["metric"] == "inner_product" and manifest["counts"] == {
        "pin": 3000,
        "board": 600,
        "user": 50,
    }
    assert {t: e["index_type"] for t, e in manifest["types"].items()} == {"pin": "hnsw", "board": "flat"}
    assert meta["dagster/row_count"] == 3600 and meta["vectors_user"] == 50 and meta["size_bytes"] > 0
    assert meta["recall_at_10.pin"] >= 0.95 and meta["retention_removed"]["indexes"] == ["1999-01-01"]
    assert published_path(home / "indexes", "1999-01-01") is None
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == CHECK_NAME and check.passed
    assert len(nearest(open_index(home / "indexes"), "pin", PIN_BASE, "pin", 10)) == 10


def test_ann_index_asset_fails_the_step_when_the_check_fails(omnisage_env):
    from omnisage_pipeline.partitions import daily_partitions

    home = Path(omnisage_env["OMNISAGE_HOME"])
    day = daily_partitions.get_first_partition_key()
    publish_embeddings(home, day, random_source(), None, "5")
    # One list probed, no re-ranking margin, no tuning: far below the recall the check asks for.
    weak = {"index_type": "ivfpq", "ivf_nlist": 64, "ivf_nprobe": 1, "rerank_factor": 1, "tune_search": False}
    result = _materialize(day, {"ops": {"ann_index": {"config": weak}}}, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.cause.message if failure.step_failure_data.error.cause else ""
    message += failure.step_failure_data.error.message
    assert CHECK_NAME in message and f"dt={day}" in message
    assert published_path(home / "indexes", day) is None
    evaluations = result.get_asset_check_evaluations()  # the failed check is recorded for the UI
    assert [(e.check_name, e.passed) for e in evaluations] == [(CHECK_NAME, False)]
