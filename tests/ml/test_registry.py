"""ml.model_io (pickle-free model directory) and ml.registry (MLflow registry, aliases)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ml.config import small
from ml.model import OmniSageModel
from ml.model_io import CONFIG_FILE, WEIGHTS_FILE, ModelFormatError, load_model_dir, save_model_dir
from ml.registry import CHALLENGER, CHAMPION, ChampionMissingError, ModelRegistry
from ml.testing import random_entity_batch, small_layout, synthetic_task_batches

pytestmark = pytest.mark.slow

IMAGE_DIM = 4
MAX_TOKENS = 8


def _model(seed: int) -> OmniSageModel:
    torch.manual_seed(seed)
    cfg, _ = small(image_dim=IMAGE_DIM)
    return OmniSageModel(cfg).eval()


def _inputs():
    rng = np.random.default_rng(0)
    kw = {"layout": small_layout(), "max_tokens": MAX_TOKENS, "image_dim": IMAGE_DIM}
    pins = random_entity_batch(rng, "pin", 16, **kw)
    boards = random_entity_batch(rng, "board", 16, **kw)
    seq = synthetic_task_batches(rng, image_dim=IMAGE_DIM, max_tokens=MAX_TOKENS, layout=small_layout())["user_entity"]
    return pins, boards, seq


@torch.no_grad()
def _embeddings(model: OmniSageModel, inputs) -> list[torch.Tensor]:
    pins, boards, seq = inputs
    return [model.embed(pins), model.embed(boards), model.user_embeddings(seq)]


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory) -> Path:
    """An initialised empty MLflow sqlite database: creating the schema costs ~10 s, copying it nothing."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}", registry_uri=f"sqlite:///{path}").search_experiments()
    return path


def _trap_pickle(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model loader must not unpickle")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)


def test_model_dir_round_trip_is_exact_and_pickle_free(tmp_path, monkeypatch):
    model = _model(1)
    inputs = _inputs()
    before = _embeddings(model, inputs)
    out = save_model_dir(
        model,
        tmp_path / "m",
        {"note": "x"},
        layout=small_layout(),
        max_tokens=MAX_TOKENS,
        training_partition="2024-01-03",
    )
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    head = (out / WEIGHTS_FILE).read_bytes()[:9]
    assert head[:2] != b"PK" and head[0] != 0x80  # not torch.save's zip nor a raw pickle
    header_len = int.from_bytes(head[:8], "little")
    header = json.loads((out / WEIGHTS_FILE).read_bytes()[8 : 8 + header_len])  # safetensors: JSON header
    assert any(k.startswith("embedders.pin.") for k in header) and header["__metadata__"]["format"] == "omnisage-model"

    _trap_pickle(monkeypatch)
    loaded = load_model_dir(out)
    after = _embeddings(loaded.model, inputs)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    assert loaded.layout == small_layout()
    assert loaded.max_tokens == MAX_TOKENS
    assert loaded.image_dim == IMAGE_DIM
    assert loaded.training_partition == "2024-01-03"
    assert loaded.extra == {"note": "x"}
    assert loaded.config == model.config
    assert not loaded.model.training

    # A different model gives different embeddings (the comparison above can fail).
    other = _embeddings(_model(2), inputs)
    assert not torch.equal(other[0], before[0])


def test_model_dir_rejects_bad_directories(tmp_path):
    with pytest.raises(ModelFormatError, match="config.json"):
        load_model_dir(tmp_path)
    out = save_model_dir(_model(0), tmp_path / "m", {}, layout=small_layout(), max_tokens=MAX_TOKENS)
    with pytest.raises(FileExistsError):
        save_model_dir(_model(0), out, {})
    # Weights of another architecture: named tensor and shapes in the error.
    raw = json.loads((out / CONFIG_FILE).read_text())
    raw["model_config"]["out_dim"] = 16
    (out / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(ModelFormatError, match="shape"):
        load_model_dir(out)
    (out / WEIGHTS_FILE).write_bytes(b"\x00" * 5)
    with pytest.raises(ModelFormatError, match="weights.safetensors"):
        load_model_dir(out)


def test_registry_register_alias_load(tmp_path, omnisage_env, mlflow_template, monkeypatch):
    from omnisage_pipeline.resources import MlflowResource
    from omnisage_pipeline.settings import Settings

    settings = Settings.from_env()
    settings.home.mkdir(parents=True, exist_ok=True)
    shutil.copy(mlflow_template, settings.home / "mlflow.db")
    resource = MlflowResource.from_settings(settings)
    client = resource.client()
    exp = resource.experiment_id()
    registry = ModelRegistry(settings.mlflow_tracking_uri)
    inputs = _inputs()

    assert registry.version_for_alias(CHAMPION) is None  # no registered model at all yet
    with pytest.raises(ChampionMissingError, match="materialize omnisage_model first"):
        registry.load_champion()

    versions, runs, expected = [], [], []
    for seed in (1, 2):
        model = _model(seed)
        expected.append(_embeddings(model, inputs))
        run = client.create_run(exp)
        local = save_model_dir(
            model,
            tmp_path / f"m{seed}",
            {},
            layout=small_layout(),
            max_tokens=MAX_TOKENS,
            training_partition=f"2024-01-0{seed}",
        )
        client.log_artifacts(run.info.run_id, str(local), artifact_path="model")
        client.set_terminated(run.info.run_id)
        versions.append(registry.register(run.info.run_id, "model"))
        runs.append(run.info.run_id)
    assert versions == ["1", "2"]
    mv = registry.model_version("2")
    assert mv.run_id == runs[1]
    assert mv.source.endswith("/model") and runs[1] in mv.source
    assert registry.version_for_alias(CHAMPION) is None  # registered, but nothing promoted yet

    registry.set_alias(CHAMPION, versions[0])
    registry.set_alias(CHALLENGER, versions[1])
    assert registry.version_for_alias(CHAMPION) == "1"
    assert registry.version_for_alias(CHALLENGER) == "2"
    assert registry.model_version("1").current_stage in (None, "None")  # aliases, never stages

    _trap_pickle(monkeypatch)
    champ = registry.load_champion()
    assert (champ.version, champ.run_id, champ.training_partition) == ("1", runs[0], "2024-01-01")
    for a, b in zip(expected[0], _embeddings(champ.model, inputs)):
        assert torch.equal(a, b)
    second = registry.load_version("2")
    assert torch.equal(expected[1][0], _embeddings(second.model, inputs)[0])
    assert not torch.equal(expected[0][0], expected[1][0])

    registry.set_alias(CHAMPION, "2")  # moving an alias is one update; the old holder loses it
    assert registry.version_for_alias(CHAMPION) == "2"
    assert registry.load_champion().version == "2"


def test_registry_registers_and_loads_the_mlflow_model_format(tmp_path, mlflow_template, monkeypatch):
    """A model logged as an MLflow pyfunc model (ml.mlflow_model) registers from its LoggedModel (by the run's
    artifact name, no model id needed) and loads back exactly, pickle-free, beside an old-format version."""
    import mlflow

    from ml.mlflow_model import log_pyfunc_model, pyfunc_data_dir
    from ml.tracking import MlflowTarget

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    target = MlflowTarget(uri, str(tmp_path / "artifacts"))
    client = target.client()
    run = client.create_run(target.experiment_id())
    model, inputs = _model(3), _inputs()
    local = save_model_dir(model, tmp_path / "model", {}, layout=small_layout(), max_tokens=MAX_TOKENS)
    info = log_pyfunc_model(uri, run.info.run_id, local, name="model", step=0, tags={"k": "v"})
    client.set_terminated(run.info.run_id)

    registry = ModelRegistry(uri)
    version = registry.register(run.info.run_id, "model", tags={"t": "1"})
    mv = registry.model_version(version)
    assert mv.source == f"models:/{info.model_id}" and mv.run_id == run.info.run_id and mv.tags["t"] == "1"
    linked = json.loads(client.get_logged_model(info.model_id).tags["mlflow.modelVersions"])
    assert linked == [{"name": "omnisage", "version": version}]
    downloaded = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl"), tracking_uri=uri)
    assert pyfunc_data_dir(downloaded) == Path(downloaded) / "data" / "model"
    assert pyfunc_data_dir(local) is None  # a bare model directory (older versions)

    _trap_pickle(monkeypatch)
    loaded = registry.load_version(version)
    assert (loaded.version, loaded.run_id) == (version, run.info.run_id)
    for a, b in zip(_embeddings(model, inputs), _embeddings(loaded.model, inputs)):
        assert torch.equal(a, b)
