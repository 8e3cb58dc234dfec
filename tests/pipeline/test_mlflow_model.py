"""The registered model is an MLflow model: ``mlflow.pyfunc.load_model("models:/omnisage@champion")`` in a fresh
process embeds (entity_type, entity_id) rows of a published day exactly as that day's ``entity_embeddings``;
unknown ids are refused by name; the LoggedModel is linked to its training run and metrics; the run and the
version carry the Dagster run id, code version and training partition, and the materialization links to
them; a version in the older format (no MLmodel) still loads with the project's loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import TINY_TRAIN
from test_training_assets import _resources, publish_library_day

import tests.pipeline_fixtures as pf
from ml.mlflow_model import PYFUNC_LOADER_MODULE
from omnisage_pipeline.settings import Settings, SettingsError
from omnisage_pipeline.storage.publish import published_path

pytestmark = pytest.mark.slow

TRAIN = {
    **TINY_TRAIN,
    "steps": 4,
    "log_every": 2,
    "checkpoint_every": 0,
    "pinsage_baseline": False,
    "num_workers": 0,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A published tiny day, ``omnisage_model`` materialized through Dagster (a trained champion logged as an
    MLflow model) and the day's ``entity_embeddings`` published with it."""
    from assets.training import omnisage_model, training_examples
    from omnisage_pipeline.embedding.champion import load_champion
    from omnisage_pipeline.embedding.day import EmbedOptions
    from omnisage_pipeline.embedding.run import embed_and_publish
    from omnisage_pipeline.partitions import daily_partitions

    root = tmp_path_factory.mktemp("mlflow-model")
    home = root / "home"
    env = {
        "OMNISAGE_HOME": str(home),
        "OMNISAGE_ENGINE": "duckdb",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }
    mp = pytest.MonkeyPatch()
    try:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("OMNISAGE_DATA_ROOT", raising=False)
        mp.setattr(pf, "START_DATE", daily_partitions.start.strftime("%Y-%m-%d"))
        art = pf.build_library_pipeline(root / "lib", scale="tiny", days=3, seed=0)
        settings = Settings.from_env()
        publish_library_day(settings, art)
        resources = _resources(settings)
        assert dg.materialize([training_examples], partition_key=art.day, resources=resources).success
        result = dg.materialize(
            [omnisage_model], resources=resources, run_config={"ops": {"omnisage_model": {"config": TRAIN}}}
        )
        assert result.success
        meta = result.asset_materializations_for_node("omnisage_model")[0].metadata
        loaded = load_champion(settings.mlflow_tracking_uri)
        embed_and_publish(settings, loaded, art.day, EmbedOptions(with_users=False))
        yield {
            "art": art,
            "settings": settings,
            "env": env,
            "meta": {k: getattr(v, "value", v) for k, v in meta.items()},
            "dagster_run_id": result.run_id,
        }
    finally:
        mp.undo()


def _client(settings: Settings):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)


def _published(settings: Settings, day: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    table = pq.read_table(published_path(settings.embeddings_dir, day))
    col = table.column("embedding").combine_chunks()
    emb = col.values.to_numpy().reshape(len(col), -1)
    return table["entity_type"].to_pylist(), np.asarray(table["entity_id"].to_pylist(), np.int64), emb


_PREDICT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, pandas as pd, mlflow

    req = json.load(open(sys.argv[1]))
    model = mlflow.pyfunc.load_model("models:/omnisage@champion")

    def frame(types, ids):
        return pd.DataFrame({"entity_type": types, "entity_id": np.asarray(ids, dtype=np.int64)})

    emb = model.predict(frame(req["types"], req["ids"]), params={"partition": req["day"]})
    np.save(req["out"], np.asarray(emb))
    errors = {}
    cases = {
        "unknown_ids": (frame(["pin", "board", "pin"], [req["ids"][0]] + req["unknown"]), {"partition": req["day"]}),
        "no_partition": (frame(req["types"][:1], req["ids"][:1]), None),
        "unpublished_day": (frame(req["types"][:1], req["ids"][:1]), {"partition": "1999-01-01"}),
    }
    for name, (df, params) in cases.items():
        try:
            model.predict(df, params=params)
            errors[name] = None
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    errors["dagster_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "dagster")
    json.dump(errors, open(req["errors"], "w"))
    """
)


def test_pyfunc_champion_in_a_fresh_process_reproduces_the_published_day(world, tmp_path):
    settings, day = world["settings"], world["art"].day
    types, ids, published = _published(settings, day)
    rows = np.random.default_rng(0).choice(len(ids), size=50, replace=False)
    assert {types[r] for r in rows} == {"pin", "board"}
    unknown = [int(ids.max()) + 1, int(ids.max()) + 2]
    req = {
        "day": day,
        "types": [types[r] for r in rows],
        "ids": [int(ids[r]) for r in rows],
        "unknown": unknown,
        "out": str(tmp_path / "emb.npy"),
        "errors": str(tmp_path / "errors.json"),
    }
    (tmp_path / "req.json").write_text(json.dumps(req))
    env = {**os.environ, **world["env"], "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _PREDICT, str(tmp_path / "req.json")],
        env=env,
        cwd=tmp_path,  # nothing of this checkout's working directory is needed: the package is installed
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    emb = np.load(tmp_path / "emb.npy")
    assert emb.shape == (50, published.shape[1]) and emb.dtype == np.float32
    expected = published[rows]
    cosine = (emb * expected).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.999, cosine.min()
    assert not np.allclose(emb[0], emb[1])  # rows are not one constant vector

    errors = json.loads((tmp_path / "errors.json").read_text())
    assert errors["dagster_imported"] == []  # the loader and predict are Dagster-free
    assert errors["unknown_ids"] is not None
    assert f"('board', {unknown[0]})" in errors["unknown_ids"] and f"('pin', {unknown[1]})" in errors["unknown_ids"]
    assert "not entities of dt=" + day in errors["unknown_ids"]
    assert errors["no_partition"] is not None and "partition" in errors["no_partition"]
    assert errors["unpublished_day"] is not None and "dt=1999-01-01" in errors["unpublished_day"]


def test_logged_model_is_linked_to_its_run_and_the_version_to_dagster(world):
    import mlflow

    from ml.registry import ModelRegistry

    settings, meta, day = world["settings"], world["meta"], world["art"].day
    client = _client(settings)
    run = client.get_run(meta["mlflow_run_id"])
    model_id = meta["mlflow_model_id"]
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run.info.run_id and logged.experiment_id == run.info.experiment_id
    assert model_id in [o.model_id for o in run.outputs.model_outputs]
    linked = {m.key for m in logged.metrics or []}
    assert "eval/mean_recall_at_10" in linked and all(m.model_id == model_id for m in logged.metrics)
    assert logged.params["training_partition"] == day

    version = ModelRegistry(settings.mlflow_tracking_uri).model_version(meta["model_version"])
    assert version.source == f"models:/{model_id}" and version.run_id == run.info.run_id
    lineage = {
        "dagster_run_id": world["dagster_run_id"],
        "dagster_code_version": "omnisage-model-2",
        "training_partition": day,
    }
    for tags in (version.tags, run.data.tags, logged.tags):
        assert {k: tags.get(k) for k in lineage} == lineage
    assert run.data.tags["model_id"] == model_id and run.data.tags["model_version"] == meta["model_version"]

    # The MLflow model: loader module in the package, a signature with the partition param, pinned
    # requirements, the weights as safetensors, nothing pickled.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", tracking_uri=settings.mlflow_tracking_uri))
    info = mlflow.models.Model.load(str(local))
    assert info.flavors["python_function"]["loader_module"] == PYFUNC_LOADER_MODULE
    assert [s.name for s in info.signature.inputs.inputs] == ["entity_type", "entity_id"]
    assert [p.name for p in info.signature.params.params] == ["partition"]
    requirements = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("omnisage-pipeline==") for r in requirements)
    assert any(r.startswith("torch==") for r in requirements)
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"data/model/config.json", "data/model/weights.safetensors"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".cloudpickle"))]

    # The materialization links to the MLflow UI (default base address).
    exp = run.info.experiment_id
    assert meta["mlflow_run_url"] == f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run.info.run_id}"
    assert meta["mlflow_model_version_url"] == (
        f"http://127.0.0.1:5000/#/models/omnisage/versions/{meta['model_version']}"
    )
    assert meta["mlflow_logged_model_url"].endswith(f"/#/experiments/{exp}/models/{model_id}")


def test_predict_refuses_bad_input_by_name(world):
    from ml.registry import ModelRegistry
    from omnisage_pipeline.embedding.pyfunc_model import OmniSageEmbeddings

    settings, day = world["settings"], world["art"].day
    model = OmniSageEmbeddings(ModelRegistry(settings.mlflow_tracking_uri).load_champion())
    types, ids, _ = _published(settings, day)
    good = pd.DataFrame({"entity_type": types[:2], "entity_id": ids[:2]})
    with pytest.raises(ValueError, match="'partition' = '2026-1-3'"):
        model.predict(good, params={"partition": "2026-1-3"})
    with pytest.raises(ValueError, match=r"entity_type.*unknown \['user'\]"):
        model.predict(pd.DataFrame({"entity_type": ["user"], "entity_id": [1]}), params={"partition": day})
    with pytest.raises(ValueError, match=r"columns \['entity_id'\] required"):
        model.predict(pd.DataFrame({"entity_type": ["pin"]}), params={"partition": day})
    with pytest.raises(ValueError, match="'entity_id' is float64"):
        model.predict(pd.DataFrame({"entity_type": ["pin"], "entity_id": [1.5]}), params={"partition": day})
    assert model.predict(good, params={"partition": day}).shape == (2, 32)


def test_a_version_in_the_older_format_still_loads_with_the_project_loader(world, tmp_path):
    """A version registered before the MLflow model format (a bare model directory among the run's artifacts,
    no MLmodel) loads through ml.registry and the embedding service's load_champion."""
    import torch

    from ml.model_io import save_model_dir
    from ml.registry import CHAMPION, ModelRegistry
    from omnisage_pipeline.embedding.champion import load_champion

    settings = world["settings"]
    current = ModelRegistry(settings.mlflow_tracking_uri).load_champion()
    legacy = ModelRegistry(settings.mlflow_tracking_uri, model_name="omnisage-legacy")
    client = _client(settings)
    run = client.create_run(client.get_run(current.run_id).info.experiment_id)
    local = save_model_dir(current.model, tmp_path / "model", layout=current.layout, max_tokens=current.max_tokens)
    client.log_artifacts(run.info.run_id, str(local), artifact_path="model")
    client.set_terminated(run.info.run_id)
    version = legacy.register(run.info.run_id, "model")
    legacy.set_alias(CHAMPION, version)
    assert legacy.model_version(version).source.endswith("/model")  # the old layout: no LoggedModel

    old = load_champion(settings.mlflow_tracking_uri, "omnisage-legacy")
    assert (old.version, old.run_id) == (version, run.info.run_id)
    for name, tensor in current.model.state_dict().items():
        assert torch.equal(tensor, old.model.state_dict()[name]), name


def test_mlflow_ui_url_setting():
    base = {"OMNISAGE_HOME": "/tmp/x"}
    assert Settings.from_env(base).mlflow_ui_url == "http://127.0.0.1:5000"
    assert Settings.from_env({**base, "OMNISAGE_MLFLOW_UI_URL": "https://mlflow.example"}).mlflow_ui_url == (
        "https://mlflow.example"
    )
    with pytest.raises(SettingsError, match="OMNISAGE_MLFLOW_UI_URL='mlflow.example'"):
        Settings.from_env({**base, "OMNISAGE_MLFLOW_UI_URL": "mlflow.example"})


def test_tracking_uri_credentials_never_reach_metadata():
    from ml.mlflow_links import redacted_uri

    assert redacted_uri("https://alice:s3cret@mlflow.example:443/x") == "https://***@mlflow.example:443/x"
    assert "s3cret" not in redacted_uri("postgresql://u:s3cret@db/mlflow")
    assert redacted_uri("sqlite:////home/o/mlflow.db") == "sqlite:////home/o/mlflow.db"
