"""Validation split (ml.validation), model selection (ml.train.ModelSelection), sketches in the model format
and warm start from the champion (ml.warm_start)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from pipeline_fixtures import build_library_pipeline

from ml.config import small
from ml.model import OmniSageModel
from ml.model_io import load_model_dir, save_model_dir
from ml.testing import small_layout, synthetic_task_batches
from ml.train import ModelSelection, Trainer
from ml.validation import keep_trained_sources, split_validation, validation_counts

IMG = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_library_pipeline(tmp_path_factory.mktemp("pipe"), scale="tiny", days=3, seed=0).data


def _unordered(t: pa.Table) -> set:
    q = zip(t["query_type"].to_pylist(), t["query_id"].to_pylist())
    p = zip(t["pos_type"].to_pylist(), t["pos_id"].to_pylist())
    return {frozenset((a, b)) for a, b in zip(q, p)}


def test_validation_rows_are_never_trained_on(data):
    train, val = split_validation(data, 0.2, seed=0)
    counts = validation_counts(val)
    assert counts["entity_entity"] > 0 and counts["entity_feature"] > 0 and counts["user_entity"] > 0
    assert train.pairs.num_rows + val.eval_pairs.num_rows == data.pairs.num_rows
    # a pair goes to one side with both directions and every source
    assert not (_unordered(train.pairs) & _unordered(val.eval_pairs))
    assert not set(train.sequences["user_id"].to_pylist()) & set(val.eval_sequences["user_id"].to_pylist())
    tn = set(zip(train.feature_nodes["entity_type"].to_pylist(), train.feature_nodes["entity_id"].to_pylist()))
    vn = set(zip(val.eval_feature_nodes["entity_type"].to_pylist(), val.eval_feature_nodes["entity_id"].to_pylist()))
    assert vn and not (tn & vn)
    # the test sets are untouched and nothing of validation is left to train on
    assert train.eval_pairs.equals(data.eval_pairs) and val.pairs.num_rows == 0 and val.sequences.num_rows == 0
    assert abs(val.eval_pairs.num_rows / data.pairs.num_rows - 0.2) < 0.1


def test_the_split_does_not_depend_on_the_other_rows(data):
    """The same pairs are carved out every day: a row's side depends on it alone (and the seed)."""
    _, full = split_validation(data, 0.2, seed=0)
    half = dataclasses.replace(data, pairs=data.pairs.slice(0, data.pairs.num_rows // 2))
    _, part = split_validation(half, 0.2, seed=0)
    assert _unordered(part.eval_pairs) <= _unordered(full.eval_pairs)
    _, other_seed = split_validation(data, 0.2, seed=1)
    assert _unordered(other_seed.eval_pairs) != _unordered(full.eval_pairs)
    _, none = split_validation(data, 0.0)
    assert sum(validation_counts(none).values()) == 0
    with pytest.raises(ValueError, match="validation fraction"):
        split_validation(data, 1.0)


def _factory(epoch: int):
    rng = np.random.default_rng([0, epoch])
    for _ in range(4):
        yield synthetic_task_batches(rng, image_dim=IMG, batch_size=6, num_negatives=6, num_users=3, seq_len=4)


def _trainer(tmp_path, scores: list[float], steps: int = 8, checks: int = 4):
    mc, tc = small(image_dim=IMG)
    tc = tc.replace(
        device="cpu",
        precision="fp32",
        warmup_steps=1,
        total_steps=steps,
        log_every=1,
        seed=0,
        checkpoint_dir=str(tmp_path),
    )
    snapshots: dict[int, dict] = {}
    calls = iter(scores)

    def score(model):
        snapshots[len(snapshots)] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return next(calls)

    return Trainer(mc, tc, _factory, progress=None, selection=ModelSelection(score, checks=checks)), snapshots


def test_model_selection_keeps_the_best_steps_weights(tmp_path):
    trainer, snapshots = _trainer(tmp_path, [0.1, 0.4, 0.2, 0.3])
    trainer.fit()
    sel = trainer.selection
    assert [h["step"] for h in sel.history] == [2, 4, 6, 8]
    assert sel.best_step == 4 and sel.best_score == 0.4
    for k, v in trainer.model.state_dict().items():  # the weights of step 4, not of the last step
        assert torch.equal(v, snapshots[1][k])
    assert any(not torch.equal(snapshots[1][k], snapshots[3][k]) for k in snapshots[1])


def test_model_selection_survives_a_resume(tmp_path):
    first, snaps = _trainer(tmp_path, [0.5, 0.1])
    first.fit(stop_after=4)  # killed after two checks; the checkpoint holds the selection state
    resumed, _ = _trainer(tmp_path, [0.2, 0.3])
    resumed.load(tmp_path / "last.pt")
    resumed.fit()
    assert resumed.selection.best_step == 2 and [h["step"] for h in resumed.selection.history] == [2, 4, 6, 8]
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, snaps[0][k])


def _trained_model() -> OmniSageModel:
    mc, tc = small(image_dim=IMG)
    tc = tc.replace(device="cpu", precision="fp32", warmup_steps=1, total_steps=3, log_every=1, seed=0)
    trainer = Trainer(mc, tc, _factory, progress=None)
    trainer.fit()
    assert trainer.model.sketches  # training filled the logQ sketches
    return trainer.model.eval()


def test_sketches_travel_with_the_model(tmp_path):
    model = _trained_model()
    out = save_model_dir(model, tmp_path / "m", {}, layout=small_layout(), max_tokens=8)
    loaded = load_model_dir(out)
    assert set(loaded.sketches) == set(model.sketches)
    for name, sk in model.sketches.items():
        assert torch.equal(loaded.sketches[name]["table"], sk.state_dict()["table"])
        assert int(loaded.sketches[name]["total"]) == int(sk.state_dict()["total"]) > 0


def test_warm_start_loads_the_champions_weights_and_sketches(tmp_path, omnisage_env, monkeypatch):
    import mlflow

    from ml.registry import CHAMPION, ModelRegistry
    from ml.warm_start import champion_warm_start

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert champion_warm_start(uri, "omnisage", small(image_dim=IMG)[0], small_layout())[0] is None
    model = _trained_model()
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("x", artifact_location=str(tmp_path / "art")))
    local = save_model_dir(model, tmp_path / "m", {}, layout=small_layout(), max_tokens=8)
    client.log_artifacts(run.info.run_id, str(local), artifact_path="model")
    registry = ModelRegistry(uri)
    registry.set_alias(CHAMPION, registry.register(run.info.run_id, "model"))
    shutil.rmtree(local)

    warm, note = champion_warm_start(uri, "omnisage", model.config, small_layout())
    assert warm is not None and "champion v1" in note
    mc, tc = small(image_dim=IMG)
    fresh = Trainer(mc, tc.replace(device="cpu", precision="fp32", total_steps=1), _factory, progress=None)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in fresh.model.state_dict().items())
    fresh.warm_start(warm.weights, warm.sketches)
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
    assert set(fresh.model.sketches) == set(model.sketches)

    other = model.config.replace(out_dim=16)
    miss, why = champion_warm_start(uri, "omnisage", other, small_layout())
    assert miss is None and "does not fit" in why and "from scratch" in why


def test_validation_pairs_follow_the_sources_the_run_trains_on(data):
    _, val = split_validation(data, 0.3, seed=0)
    sources = set(val.eval_pairs["source"].to_pylist())
    assert "engagement_pin_pin" in sources and len(sources) > 1
    only = keep_trained_sources(val, {s: (1.0 if s == "engagement_pin_pin" else 0.0) for s in sources})
    assert set(only.eval_pairs["source"].to_pylist()) == {"engagement_pin_pin"}
    assert keep_trained_sources(val, None).eval_pairs.num_rows == val.eval_pairs.num_rows
