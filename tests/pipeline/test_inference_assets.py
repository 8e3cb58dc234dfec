"""entity_embeddings: with a tiny model registered in MLflow as ``champion``, the asset embeds
exactly the day's pins and boards (metadata UNION graph), unit-norm and finite, tagged with the model version;
the registered model loaded back reproduces them; entities outside the graph get embeddings (zero-imputed
neighbours, paper 3.5); active users get embeddings; no champion -> a clear error; a 2-shard run publishes
the partition once, with the unsharded content; two finishing workers cannot both publish."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import tests.pipeline_fixtures as pf
from assets.inference import entity_embeddings, run_day
from graph_engine.batch import NODE_TYPE_CODE
from graph_engine.batch_builder import BatchBuilder
from graph_engine.featurizer import Featurizer
from graph_engine.neighbor_sampler import NeighborhoodCache
from graph_engine.snapshot import GraphSnapshot
from ml.config import small
from ml.layout import SHARDS_DIR
from ml.model import OmniSageModel
from ml.model_io import save_model_dir
from ml.registry import CHAMPION, ChampionMissingError, ModelRegistry
from omnisage_pipeline.embedding.day import DayEmbeddings, entity_table, shard_of, user_table
from omnisage_pipeline.embedding.shards import publish_if_complete, shard_stage_dir, stage_shard
from omnisage_pipeline.partitions import daily_partitions
from omnisage_pipeline.resources import MlflowResource, StorageResource
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import published_path

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny library-built day (tests/pipeline_fixtures) + a random tiny model registered as champion."""
    root = tmp_path_factory.mktemp("world")
    # The generated days must be valid partitions of daily_partitions (start date read at import).
    mp = pytest.MonkeyPatch()
    mp.setattr(pf, "START_DATE", daily_partitions.start.strftime("%Y-%m-%d"))
    try:
        art = pf.build_library_pipeline(root, scale="tiny", days=3, seed=0)
    finally:
        mp.undo()

    torch.manual_seed(0)
    model = OmniSageModel(small(image_dim=art.image_dim)[0]).eval()
    model_dir = save_model_dir(
        model,
        root / "model",
        layout=art.layout,
        max_tokens=art.featurizer.max_tokens,
        training_partition=art.day,
    )
    uri = f"sqlite:///{root / 'mlflow.db'}"
    res = MlflowResource(tracking_uri=uri, artifact_root=str(root / "mlflow-artifacts"))
    client = res.client()
    run = client.create_run(res.experiment_id())
    client.log_artifacts(run.info.run_id, str(model_dir), artifact_path="model")
    client.set_terminated(run.info.run_id)
    registry = ModelRegistry(uri)
    version = registry.register(run.info.run_id, "model")
    registry.set_alias(CHAMPION, version)
    return {"art": art, "root": root, "uri": uri, "version": version}


@pytest.fixture
def home(world, omnisage_env, monkeypatch) -> Path:
    """A fresh OMNISAGE_HOME whose upstream datasets (warehouse, graph, features) are the world's; the
    MLflow registry is the world's (with a champion)."""
    home = Path(omnisage_env["OMNISAGE_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    for name in ("warehouse", "graph", "features"):
        (home / name).symlink_to(world["root"] / name, target_is_directory=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    return home


def _materialize(day: str, run_config: dict | None = None, raise_on_error: bool = True, model_name: str = "omnisage"):
    settings = Settings.from_env()
    base = MlflowResource.from_settings(settings)
    mlflow = MlflowResource(
        tracking_uri=base.tracking_uri, artifact_root=base.artifact_root, registered_model_name=model_name
    )
    return dg.materialize(
        [entity_embeddings],
        partition_key=day,
        resources={"storage": StorageResource.from_settings(settings), "mlflow": mlflow},
        run_config=run_config,
        raise_on_error=raise_on_error,
    )


def _shard_config(num_shards: int, shard_index: int) -> dict:
    return {"ops": {"entity_embeddings": {"config": {"num_shards": num_shards, "shard_index": shard_index}}}}


def _metadata(result) -> dict:
    mats = result.asset_materializations_for_node("entity_embeddings")
    assert len(mats) == 1
    return {k: getattr(v, "value", v) for k, v in mats[0].metadata.items()}


def _read_sorted(dataset_dir: Path, day: str, key: list[str]) -> pa.Table:
    path = published_path(dataset_dir, day)
    assert path is not None, f"{dataset_dir}/dt={day} not published"
    return pq.read_table(path).sort_by([(k, "ascending") for k in key])


def _matrix(table: pa.Table) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    n = len(col)
    return col.values.to_numpy().reshape(n, -1) if n else np.zeros((0, 0), np.float32)


def _fresh_builder(art) -> BatchBuilder:
    snapshot = GraphSnapshot.open(art.graph_dir)
    return BatchBuilder(
        snapshot, NeighborhoodCache.open(art.cache_dir, snapshot), Featurizer(art.features_dir), art.layout
    )


# ------------------------------------------------------------------------------------------------ tests
def test_embeds_exactly_the_days_entities_and_the_champion_reproduces_them(world, home):
    from ml.inference import embed_entities

    art = world["art"]
    day = art.day
    meta = _metadata(_materialize(day))
    settings = Settings.from_env()

    table = _read_sorted(settings.embeddings_dir, day, ["entity_type", "entity_id"])
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    assert table.schema.field("entity_id").type == pa.int64()
    # Exactly the expected entities: metadata UNION graph nodes (computed independently by the fixture).
    got = {(t, i) for t, i in zip(table["entity_type"].to_pylist(), table["entity_id"].to_pylist())}
    expected = {(t, int(i)) for t in ("pin", "board") for i in art.universe[t]}
    assert got == expected and table.num_rows == len(expected)
    emb = _matrix(table)
    assert emb.shape == (len(expected), 32)
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert set(table["model_version"].to_pylist()) == {world["version"]}
    assert len(np.unique(emb.round(5), axis=0)) > 0.9 * len(emb)  # not a constant output

    assert meta["model_version"] == world["version"]
    assert meta["entities"] == len(expected)
    assert meta["entities_pin"] == len(art.universe["pin"]) and meta["entities_board"] == len(art.universe["board"])
    assert meta["entities_per_second"] > 0
    assert meta["before_training_cutoff"] is False and meta["training_partition"] == day
    assert meta["publish"] == "published" and meta["partition_complete"] is True
    manifest = json.loads((published_path(settings.embeddings_dir, day) / "_manifest.json").read_text())
    assert manifest["model_version"] == world["version"] and manifest["entities"] == len(expected)

    # Entities outside the graph (metadata only) are embedded, from an all-padding neighbourhood (3.5).
    snapshot = art.snapshot
    outside = {
        t: art.universe[t][np.asarray(snapshot.lookup(np.int8(NODE_TYPE_CODE[t]), art.universe[t])) < 0]
        for t in ("pin", "board")
    }
    n_outside = sum(len(v) for v in outside.values())
    assert n_outside > 0 and meta["entities_outside_graph"] == n_outside
    assert not art.builder.build("pin", outside["pin"][:5]).neighbor_mask.any()

    # The registered model, loaded back from the registry, reproduces the published embeddings
    # (in-graph and outside-graph entities, recomputed in a different batch composition).
    loaded = ModelRegistry(world["uri"]).load_champion()
    assert loaded.version == world["version"]
    builder = _fresh_builder(art)
    rows = {(t, i): r for r, (t, i) in enumerate(zip(table["entity_type"].to_pylist(), table["entity_id"].to_pylist()))}
    for t in ("pin", "board"):
        inside = np.setdiff1d(art.universe[t], outside[t])
        ids = np.concatenate([inside[:6], outside[t][:3]])
        again = embed_entities(loaded.model, builder, t, ids, batch_size=4)
        stored = emb[[rows[(t, int(i))] for i in ids]]
        np.testing.assert_allclose(again, stored, atol=2e-5)

    # Users active in the window: every user with a training or evaluation sequence (non-empty history).
    users = _read_sorted(settings.user_embeddings_dir, day, ["user_id"])
    seq_users = set()
    for name in ("sequences", "eval_sequences"):
        t = pq.read_table(art.examples_dir / f"{name}.parquet", columns=["user_id", "history"])
        seq_users |= {u for u, h in zip(t["user_id"].to_pylist(), t["history"].to_pylist()) if h}
    assert len(seq_users) > 0 and set(users["user_id"].to_pylist()) == seq_users
    uemb = _matrix(users)
    assert np.isfinite(uemb).all()
    np.testing.assert_allclose(np.linalg.norm(uemb, axis=1), 1.0, atol=1e-5)
    assert set(users["model_version"].to_pylist()) == {world["version"]}
    assert meta["users"] == len(seq_users)


def test_no_champion_fails_with_a_clear_message(world, home):
    # A registered-model name nothing was ever registered under (what a fresh registry looks like).
    with pytest.raises(ChampionMissingError, match="materialize omnisage_model first"):
        _materialize(world["art"].day, model_name="omnisage-never-trained")
    assert published_path(Settings.from_env().embeddings_dir, world["art"].day) is None


def test_two_shards_publish_once_with_the_unsharded_content(world, home):
    day = world["art"].day
    settings = Settings.from_env()
    _materialize(day)
    whole = _read_sorted(settings.embeddings_dir, day, ["entity_type", "entity_id"])
    whole_users = _read_sorted(settings.user_embeddings_dir, day, ["user_id"])
    first_version = published_path(settings.embeddings_dir, day)

    waiting = _materialize(day, _shard_config(2, 0))
    # A waiting shard published nothing: an observation of the day, no materialization, check not evaluated.
    assert not waiting.asset_materializations_for_node("entity_embeddings")
    (observation,) = waiting.asset_observations_for_node("entity_embeddings")
    m0 = {k: getattr(v, "value", v) for k, v in observation.metadata.items()}
    assert m0["publish"] == "waiting" and m0["partition_complete"] is False
    (check,) = waiting.get_asset_check_evaluations()
    assert check.metadata["evaluated"].value is False and check.severity == dg.AssetCheckSeverity.WARN
    assert published_path(settings.embeddings_dir, day) == first_version  # nothing published by shard 0 alone
    completing = _materialize(day, _shard_config(2, 1))
    m1 = _metadata(completing)
    assert m1["publish"] == "published" and m1["dagster/row_count"] == whole.num_rows
    (check,) = completing.get_asset_check_evaluations()
    assert check.passed and check.metadata["rows"].value == whole.num_rows
    # Each shard embedded a disjoint, non-trivial part of the day.
    assert 0 < m0["entities"] < whole.num_rows and m0["entities"] + m1["entities"] == whole.num_rows
    assert m0["users"] + m1["users"] == whole_users.num_rows

    published = published_path(settings.embeddings_dir, day)
    assert published != first_version
    assert sorted(p.name for p in published.glob("*.parquet")) == [
        "part-00000-of-00002.parquet",
        "part-00001-of-00002.parquet",
    ]
    sharded = _read_sorted(settings.embeddings_dir, day, ["entity_type", "entity_id"])
    assert sharded["entity_type"].to_pylist() == whole["entity_type"].to_pylist()
    assert sharded["entity_id"].to_pylist() == whole["entity_id"].to_pylist()
    np.testing.assert_allclose(_matrix(sharded), _matrix(whole), atol=2e-5)
    # Shard membership is the stable hash, not an accident of the run.
    part0 = pq.read_table(published / "part-00000-of-00002.parquet")
    for t in ("pin", "board"):
        ids = np.array(
            [i for tt, i in zip(part0["entity_type"].to_pylist(), part0["entity_id"].to_pylist()) if tt == t]
        )
        assert (shard_of(t, ids, 2) == 0).all()
    sharded_users = _read_sorted(settings.user_embeddings_dir, day, ["user_id"])
    assert sharded_users["user_id"].to_pylist() == whole_users["user_id"].to_pylist()
    np.testing.assert_allclose(_matrix(sharded_users), _matrix(whole_users), atol=2e-5)
    # The staging area is cleaned up after the publish.
    stage_root = settings.embeddings_dir / SHARDS_DIR / f"dt={day}"
    assert not list(stage_root.glob("*/entities/*.parquet"))


def _race(args):
    home, day, stage, shard_index, manifest = args
    settings = Settings.from_env({"OMNISAGE_HOME": home})
    return publish_if_complete(settings, day, Path(stage), 2, shard_index, True, manifest)


def test_two_finishing_workers_cannot_both_publish(tmp_path):
    """The publish protocol alone (no model): both shards staged, two processes race to publish."""
    settings = Settings.from_env({"OMNISAGE_HOME": str(tmp_path / "home")})
    day = "2026-01-02"
    stage = shard_stage_dir(settings, day, "v1-test")
    rng = np.random.default_rng(0)
    for i in range(2):
        ids = np.arange(i * 10, i * 10 + 10, dtype=np.int64)
        result = DayEmbeddings(
            entity_table("pin", ids, rng.random((10, 4), dtype=np.float32), "1"),
            user_table(ids + 1000, rng.random((10, 4), dtype=np.float32), "1"),
        )
        stage_shard(stage, result, i, 2)
    manifest = {"partition": day, "model_version": "1", "stage_key": "v1-test"}
    with multiprocessing.get_context("fork").Pool(2) as pool:
        outcomes = pool.map(_race, [(str(settings.home), day, str(stage), i, manifest) for i in range(2)])
    assert sorted(outcomes) == ["already_published", "published"]
    versions = list((settings.embeddings_dir / ".versions").iterdir())
    assert len(versions) == 1  # published exactly once
    assert len(list((settings.user_embeddings_dir / ".versions").iterdir())) == 1
    table = pq.read_table(published_path(settings.embeddings_dir, day))
    assert sorted(table["entity_id"].to_pylist()) == list(range(20))
    assert json.loads((published_path(settings.embeddings_dir, day) / "_manifest.json").read_text())["entities"] == 20
    # A late re-run of one shard restages it; alone it only waits (the published partition stays).
    stage_shard(stage, result, 1, 2)
    assert publish_if_complete(settings, day, stage, 2, 1, True, manifest) == "waiting"
    assert len(list((settings.embeddings_dir / ".versions").iterdir())) == 1
    # Shard 0 alone (before shard 1 exists) only waits.
    stage2 = shard_stage_dir(settings, "2026-01-03", "v1-test")
    stage_shard(stage2, result, 0, 2)
    outcome = publish_if_complete(settings, "2026-01-03", stage2, 2, 0, True, {**manifest, "partition": "2026-01-03"})
    assert outcome == "waiting"
    assert published_path(settings.embeddings_dir, "2026-01-03") is None


def test_backfill_before_training_cutoff_is_flagged_and_bad_shard_config_fails(world, home):
    art = world["art"]
    loaded = ModelRegistry(world["uri"]).load_champion()
    later = dataclasses.replace(loaded, training_partition="2999-01-01")
    figures = run_day(Settings.from_env(), later, art.day, with_users=False, batch_size=256)
    assert figures["before_training_cutoff"] is True and figures["training_partition"] == "2999-01-01"
    manifest = json.loads((published_path(Settings.from_env().embeddings_dir, art.day) / "_manifest.json").read_text())
    assert manifest["before_training_cutoff"] is True
    assert published_path(Settings.from_env().user_embeddings_dir, art.day) is None  # users switched off

    with pytest.raises(ValueError, match="shard_index"):
        run_day(Settings.from_env(), loaded, art.day, num_shards=2, shard_index=2)
    with pytest.raises(Exception, match="shard_index"):
        _materialize(art.day, _shard_config(2, 5))


def test_a_champion_without_the_user_task_embeds_entities_only(world, home, tmp_path):
    """A model trained without user_entity (e.g. an entity-feature or PinSage-like variant) can be champion:
    the day's entities are still embedded, and no user embeddings are written instead of failing."""
    art = world["art"]
    config = small(image_dim=art.image_dim)[0].replace(tasks=("entity_entity",))
    model = OmniSageModel(config).eval()
    model_dir = save_model_dir(model, tmp_path / "m", layout=art.layout, max_tokens=art.featurizer.max_tokens)
    res = MlflowResource(tracking_uri=world["uri"], artifact_root=str(world["root"] / "mlflow-artifacts"))
    client = res.client()
    run = client.create_run(res.experiment_id())
    client.log_artifacts(run.info.run_id, str(model_dir), artifact_path="model")
    registry = ModelRegistry(world["uri"], model_name="omnisage-no-user-task")
    registry.set_alias(CHAMPION, registry.register(run.info.run_id, "model"))

    result = _materialize(art.day, model_name="omnisage-no-user-task")
    assert result.success
    settings = Settings.from_env()
    assert _read_sorted(settings.embeddings_dir, art.day, ["entity_type", "entity_id"]).num_rows > 0
    assert published_path(settings.home / "user_embeddings", art.day) is None


_SHARD_RUN = """
import sys, dagster as dg
from assets.inference import entity_embeddings
from omnisage_pipeline.resources import MlflowResource, StorageResource
from omnisage_pipeline.settings import Settings
settings = Settings.from_env()
with dg.DagsterInstance.from_config(sys.argv[1]) as instance:
    result = dg.materialize(
        [entity_embeddings], partition_key=sys.argv[2], instance=instance,
        resources={"storage": StorageResource.from_settings(settings), "mlflow": MlflowResource.from_settings(settings)},
        run_config={"ops": {"entity_embeddings": {"config": {"num_shards": 2, "shard_index": int(sys.argv[3])}}}},
    )
    print("ok" if result.success else "failed")
"""


def test_two_shard_runs_at_once_record_only_the_complete_partition(world, home, tmp_path):
    """Two shard workers of one day running at the same time, recorded in one instance: the day is published
    once with both shards, and no run records a materialization of an incomplete partition."""
    import os
    import subprocess
    import sys

    day = world["art"].day
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    dg.DagsterInstance.from_config(str(dagster_home)).dispose()  # create the storage before two processes share it
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SHARD_RUN, str(dagster_home), day, str(i)],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0 and out.strip().endswith("ok"), err[-3000:]

    settings = Settings.from_env()
    published = published_path(settings.embeddings_dir, day)
    assert sorted(p.name for p in published.glob("*.parquet")) == [
        "part-00000-of-00002.parquet",
        "part-00001-of-00002.parquet",
    ]
    table = pq.read_table(published)
    keys = set(zip(table["entity_type"].to_pylist(), table["entity_id"].to_pylist()))
    assert len(keys) == table.num_rows > 0
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("entity_embeddings"), asset_partitions=[day]),
            limit=10,
        ).records
        assert 1 <= len(records) <= 2
        for record in records:
            meta = record.asset_materialization.metadata
            assert meta["partition_complete"].value is True
            assert meta["dagster/row_count"].value == table.num_rows
        runs = instance.get_runs()
        assert len(runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)


def test_user_embeddings_from_the_days_pin_vectors_equal_embedding_the_items_again(world):
    """Daily inference embeds every pin once and reads users' history items from that table (items it lacks,
    e.g. pins of another shard, are embedded on the spot): the same U_t as embedding each item per user."""
    from ml.inference import embed_entities, embed_users

    art = world["art"]
    torch.manual_seed(1)
    model = OmniSageModel(small(image_dim=art.image_dim)[0]).eval()
    builder = _fresh_builder(art)
    seqs = pq.read_table(art.examples_dir / "sequences.parquet", columns=["history"])
    histories = [np.asarray(h, np.int64) for h in seqs["history"].to_pylist()][:40]
    pins = np.unique(np.concatenate([h for h in histories if h.size]))
    partial = pins[: pins.size // 2]  # half the items known: the rest goes through the fallback
    table = (partial[::-1].copy(), embed_entities(model, builder, "pin", partial[::-1].copy()))
    direct = embed_users(model, builder, histories, batch_size=16)
    from_table = embed_users(model, builder, histories, batch_size=16, item_table=table)
    assert np.abs(direct).sum() > 0
    np.testing.assert_allclose(from_table, direct, atol=2e-5)
