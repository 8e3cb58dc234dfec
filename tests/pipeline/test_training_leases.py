"""Training and tuning read exactly the versions their reader leases hold: the day's training examples, graph
and feature store are leased for the whole run, and the run's inputs are the paths those leases resolved, so a
re-publish of the day (before the run reads, or while it trains) changes nothing it reads. The builders of
training_examples and feature_store read the day's entity_metadata and graph under leases too."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_publish_leases import _content, _publish

from ml.layout import HOLDOUT_FILE
from ml.run_config import TrainingRunConfig
from ml.training_examples import ExampleConfig
from ml.tuning import TuneConfig
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage import leases, retention
from omnisage_pipeline.training import runner, tune

KEY = "2026-01-01"
FIELDS = ("examples_dir", "graph_dir", "features_dir")


def _home(tmp_path: Path) -> tuple[Settings, dict[str, Path]]:
    settings = Settings.from_env({"OMNISAGE_HOME": str(tmp_path / "home")})
    datasets = {
        "examples_dir": settings.warehouse_dataset("training_examples"),
        "graph_dir": settings.graph_dir,
        "features_dir": settings.features_dir,
    }
    for dataset in datasets.values():
        _publish(dataset, "original")
    return settings, datasets


def _republish(datasets: dict[str, Path]) -> None:
    # Twice: the original is then neither the current nor the kept previous version.
    for dataset in datasets.values():
        _publish(dataset, "republished")
        _publish(dataset, "republished again")


def _read_inputs(inputs, datasets: dict[str, Path]) -> dict[str, tuple[set[str], bool]]:
    """What the run reads of each input, and whether a live lease names that version."""
    seen = {}
    for field in FIELDS:
        path = Path(getattr(inputs, field))
        seen[field] = (_content(path), path.name in leases.lease_holds(datasets[field]).versions)
    return seen


LEASED_ORIGINALS = {field: ({"original"}, True) for field in FIELDS}


@pytest.fixture
def run_with(monkeypatch):
    """Run ``omnisage train`` (runner) or ``omnisage tune`` with the training replaced by ``fake(inputs)``."""

    def run(kind: str, settings: Settings, fake) -> None:
        if kind == "train":
            monkeypatch.setattr(runner, "train_and_register", lambda inputs, *a, **k: fake(inputs))
            runner.run_training(settings, None, TrainingRunConfig(), log=lambda msg: None)
        else:

            def study(inputs, *a, **k):
                fake(inputs)
                return SimpleNamespace(write=lambda *paths: None)

            monkeypatch.setattr(tune, "run_study", study)
            tune.tune_partition(settings, None, TrainingRunConfig(), TuneConfig(), settings.home / "best.json")

    return run


@pytest.mark.parametrize("kind", ["train", "tune"])
def test_a_republish_during_training_keeps_the_versions_the_run_reads(tmp_path, run_with, kind):
    settings, datasets = _home(tmp_path)
    seen = {}

    def fake(inputs):
        _republish(datasets)  # another writer re-publishes the day mid-run
        seen.update(_read_inputs(inputs, datasets))

    run_with(kind, settings, fake)
    assert seen == LEASED_ORIGINALS
    for dataset in datasets.values():  # released when the run ended
        assert not list((dataset / ".leases").glob("dt=*"))


@pytest.mark.parametrize("kind", ["train", "tune"])
def test_a_republish_between_lease_and_read_does_not_change_the_inputs(tmp_path, monkeypatch, run_with, kind):
    """The day is re-published right after each lease resolved it: the run still reads what was leased, not
    a version resolved again afterwards that no lease holds."""
    settings, datasets = _home(tmp_path)
    real = leases.read_lease

    @contextmanager
    def racing(dataset_dir, partition_key):
        with real(dataset_dir, partition_key) as held:
            _publish(dataset_dir, "republished")
            _publish(dataset_dir, "republished again")
            yield held

    monkeypatch.setattr(runner, "read_lease", racing, raising=False)
    monkeypatch.setattr(retention, "read_lease", racing)  # where the runner once took it from
    seen = {}
    run_with(kind, settings, lambda inputs: seen.update(_read_inputs(inputs, datasets)))
    assert seen == LEASED_ORIGINALS


# ------------------------------------------------------------------------- builders of training_examples, features
class _Stop(Exception):
    """Ends a build once its inputs were read (nothing is published then)."""


def _builder_inputs(tmp_path: Path) -> tuple[Settings, dict[str, Path]]:
    settings = Settings.from_env({"OMNISAGE_HOME": str(tmp_path / "home")})
    inputs = {"metadata": settings.warehouse_dataset("entity_metadata"), "graph": settings.graph_dir}
    for dataset in inputs.values():
        _publish(dataset, "original")
    return settings, inputs


def _leased_reads(inputs: dict[str, Path], metadata_dir: Path, graph_dir: Path) -> dict:
    _republish(inputs)  # another writer re-publishes the day while it is being built
    read = {"metadata": Path(metadata_dir), "graph": Path(graph_dir)}
    return {
        name: (_content(path), path.name in leases.lease_holds(inputs[name]).versions) for name, path in read.items()
    }


BUILDER_READS = {"metadata": ({"original"}, True), "graph": ({"original"}, True)}


def test_training_examples_read_metadata_and_graph_under_leases(tmp_path, monkeypatch):
    import graph_engine.neighbor_sampler
    import graph_engine.snapshot
    import ml.training_examples
    from omnisage_pipeline.training.examples import build_examples_day

    settings, inputs = _builder_inputs(tmp_path)
    _publish(settings.warehouse_dataset("engagement_logs"), "logs")
    pruned = _publish(settings.warehouse_dataset("pruned_edges"), "pruned")
    (pruned / HOLDOUT_FILE).write_text(json.dumps({"fraction": 0.1, "seed": 0}))
    seen = {}

    def build(log_files, pins_dir, snapshot, cache, staging, day, config, boards_dir):
        seen.update(_leased_reads(inputs, Path(pins_dir).parent, snapshot))
        raise _Stop

    monkeypatch.setattr(graph_engine.snapshot.GraphSnapshot, "open", staticmethod(lambda path: path))
    monkeypatch.setattr(graph_engine.neighbor_sampler.NeighborhoodCache, "open", staticmethod(lambda *a: None))
    monkeypatch.setattr(ml.training_examples, "build_training_examples", build)
    with pytest.raises(_Stop):
        build_examples_day(settings, KEY, ExampleConfig(), [KEY])
    assert seen == BUILDER_READS


def test_feature_store_reads_metadata_and_graph_under_leases(tmp_path, monkeypatch):
    from assets import features

    settings, inputs = _builder_inputs(tmp_path)
    seen = {}

    def build(metadata_dir, snapshot, staging, **kwargs):
        seen.update(_leased_reads(inputs, metadata_dir, snapshot))
        raise _Stop

    monkeypatch.setattr(features.GraphSnapshot, "open", staticmethod(lambda path: path))
    monkeypatch.setattr(features, "day_entities", lambda metadata_dir, snapshot: {})
    monkeypatch.setattr(features, "build_feature_store", build)
    context = SimpleNamespace(log=SimpleNamespace(info=print, warning=print))
    with pytest.raises(_Stop):
        features._build_day(context, features.FeatureStoreConfig(), settings, KEY)
    assert seen == BUILDER_READS
