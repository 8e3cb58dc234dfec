"""``ml.tuning``: an Optuna study on the validation split only, every trial an MLflow run nested under the
study's, its best settings a config the training run accepts."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from pipeline_fixtures import build_library_pipeline

from ml import tuning
from ml.tracking import MlflowTarget
from ml.training_run import TrainingInputs, TrainingRunConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return build_library_pipeline(tmp_path_factory.mktemp("pipe"), scale="tiny", days=3, seed=0)


def _inputs(art, tmp_path) -> TrainingInputs:
    return TrainingInputs(
        art.day, art.examples_dir, art.graph_dir, art.features_dir, tmp_path / "ckpt", tmp_path / "scratch"
    )


def _pair_keys(table) -> set:
    return set(zip(table["query_id"].to_pylist(), table["pos_id"].to_pylist()))


def test_study_scores_validation_pairs_only_and_logs_nested_trials(art, tmp_path, monkeypatch):
    import ml.evaluator

    seen = []

    class Recording(ml.evaluator.Evaluator):
        def __init__(self, data, *args, **kwargs):
            seen.append(data.eval_pairs)
            super().__init__(data, *args, **kwargs)

    monkeypatch.setattr(ml.evaluator, "Evaluator", Recording)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    target = MlflowTarget(uri, str(tmp_path / "artifacts"))
    base = TrainingRunConfig(num_workers=0, log_every=100, validation_fraction=0.2)
    tune = tuning.TuneConfig(trials=3, steps=4, checks=2, startup_trials=1)
    result = tuning.run_study(_inputs(art, tmp_path), base, tune, log=lambda m: None, target=target)

    # every evaluation the study made was on validation pairs of the chosen sources, never a test pair
    assert seen and all(t.num_rows > 0 for t in seen)
    test_pairs = _pair_keys(art.data.eval_pairs)
    for table in seen:
        assert not (_pair_keys(table) & test_pairs)
        assert set(table["source"].to_pylist()) <= set(tune.validation_sources)
    assert len(result.summary["trials"]) == 3 and result.summary["selection"] == "validation"

    # the best settings are a valid training config (unknown keys would raise)
    TrainingRunConfig(**result.best_config)
    assert result.best_config["steps"] == 4
    path = tmp_path / "best.json"
    result.write(path, tmp_path / "summary.json")
    assert json.loads(path.read_text()) == result.best_config

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("omnisage-tuning").experiment_id])
    parents = [r for r in runs if r.data.tags.get("omnisage.kind") == "study"]
    trials = [r for r in runs if r.data.tags.get("omnisage.kind") == "trial"]
    assert len(parents) == 1 and len(trials) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}


def test_pruning_stops_a_trial_below_the_median():
    import optuna

    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    )
    for value in (0.5, 0.5):
        trial = study.ask()
        score = tuning._pruning_score(trial, lambda model, v=value: v, [])
        score(None)
        study.tell(trial, value)
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        tuning._pruning_score(trial, lambda model: 0.01, [])(None)


def test_search_space_and_config_refuse_unknown_keys():
    with pytest.raises(ValueError):
        tuning.TuneConfig(trials=2, stepz=3)
    with pytest.raises(ValueError):
        tuning.SearchSpace(learning_rate=(0.1, 0.2))
    assert np.isclose(tuning.TuneConfig().space.lr[0], 1e-3)
