"""``omnisage tune``: the command builds one validated TrainingRunConfig and TuneConfig from its options and a
base file, refuses unknown keys naming them, and hands both to the service (``omnisage_pipeline.training.tune``)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ml.tuning import StudyResult
from omnisage_pipeline import cli
from omnisage_pipeline.training import tune


def test_tune_passes_one_validated_config_to_the_service(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNISAGE_HOME", str(tmp_path / "home"))
    seen = {}

    def fake(settings, target, base, study, out, log=print):
        seen.update(base=base, study=study, out=out)
        return StudyResult({"lr": 0.01}, 0.2, {"complete": 2, "pruned": 1, "seconds": 3.0})

    monkeypatch.setattr(tune, "tune_partition", fake)
    base_file = tmp_path / "base.json"
    base_file.write_text(json.dumps({"batch_size": 64, "num_workers": 0}))
    out = tmp_path / "best.json"
    args = ["tune", "--system", "pinsage", "--trials", "3", "--steps", "7", "--partition", "2026-01-02"]
    result = CliRunner().invoke(cli.main, [*args, "--base", str(base_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert seen["base"].batch_size == 64 and seen["base"].training_partition == "2026-01-02"
    assert (seen["study"].system, seen["study"].trials, seen["study"].steps) == ("pinsage", 3, 7)
    assert seen["out"] == out and "best validation recall 0.2" in result.output


def test_tune_refuses_unknown_base_keys_naming_them(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNISAGE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tune, "tune_partition", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    base_file = tmp_path / "base.json"
    base_file.write_text(json.dumps({"batch_sise": 64}))
    result = CliRunner().invoke(cli.main, ["tune", "--base", str(base_file)])
    assert result.exit_code != 0 and "batch_sise" in result.output
