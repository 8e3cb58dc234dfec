"""``omnisage train``: the asset's training through the CLI, on 1 process and on 2 gloo ranks via torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
import pytest
from test_training_assets import _resources, mlflow_template, published  # noqa: F401 (fixtures)

from ml.launch import torchrun_command

pytestmark = pytest.mark.slow


def _publish_examples(settings, day: str) -> None:
    from assets.training import training_examples

    assert dg.materialize([training_examples], partition_key=day, resources=_resources(settings)).success


def _versions(settings) -> list[int]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    return sorted(int(v.version) for v in client.search_model_versions("name='omnisage'"))


def test_torchrun_command_passes_rendezvous_options_through(tmp_path):
    cmd = torchrun_command(
        tmp_path / "r.json",
        8,
        {
            "nnodes": 2,
            "node_rank": 1,
            "rdzv_backend": "c10d",
            "rdzv_endpoint": "host0:29400",
            "rdzv_id": "job",
        },
    )
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=8"]
    assert "--standalone" not in cmd and "--rdzv-endpoint=host0:29400" in cmd and "--node-rank=1" in cmd
    assert cmd[-3:] == ["-m", "ml.training_run", str(tmp_path / "r.json")]
    assert "--standalone" in torchrun_command(tmp_path / "r.json", 2)
    with pytest.raises(ValueError, match="unknown torchrun option"):
        torchrun_command(tmp_path / "r.json", 2, {"nproc": 3})


def _train_cmd(nproc: int, steps: int) -> list[str]:
    """``omnisage train`` on the CPU with a tiny batch, ``nproc`` ranks, ``steps`` steps."""
    options = ["--nproc-per-node", nproc, "--device", "cpu", "--steps", steps, "--batch-size", 16]
    options += ["--negatives", 8, "--num-workers", 0]
    return [sys.executable, "-m", "omnisage_pipeline.cli", "train", *map(str, options)]


def test_train_command_on_two_gloo_ranks_registers_a_version(published, omnisage_env):  # noqa: F811
    settings, art = published
    _publish_examples(settings, art.day)
    env = {**os.environ, **omnisage_env, "OMP_NUM_THREADS": "1"}
    cmd = _train_cmd(nproc=2, steps=4)
    out = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "model version 1 -> champion" in out.stdout
    assert "step 4/4" in out.stdout  # rank 0's progress lines reach the launcher's log
    assert _versions(settings) == [1]
    # a second run with one process: the same function, a new version
    out = subprocess.run(
        _train_cmd(nproc=1, steps=4), check=False, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert _versions(settings) == [1, 2]


def _ranks_alive(request_marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "ml.training_run" in line and request_marker in line]


def test_killing_the_launching_process_stops_every_rank(published, omnisage_env, tmp_path):  # noqa: F811
    """What a killed Dagster step does to its launcher: torchrun (and so every rank) goes with it."""
    import signal
    import time

    settings, art = published
    _publish_examples(settings, art.day)
    env = {**os.environ, **omnisage_env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = _train_cmd(nproc=2, steps=100_000)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = str(settings.scratch_dir)  # the request file lives under this home's scratch folder
    try:
        deadline, seen = time.monotonic() + 300, []
        for line in proc.stdout:  # wait until the ranks train
            seen.append(line)
            if line.startswith("step ") or time.monotonic() > deadline:
                break
        assert len(_ranks_alive(marker)) >= 2, "".join(seen[-30:])
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: only the death signal is left
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while _ranks_alive(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _ranks_alive(marker) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def _two_step_config():
    """Two CPU steps in process: enough for a registered version and its gate."""
    from assets.training import OmniSageModelConfig

    return OmniSageModelConfig(
        steps=2,
        batch_size=16,
        num_random_negatives=8,
        pool_size=200,
        device="cpu",
        pinsage_baseline=False,
        num_workers=0,
    )


def test_a_champion_saved_in_an_older_model_format_loses_the_gate(published, omnisage_env):  # noqa: F811
    """After an upgrade of the model format the daily training still registers and promotes."""
    import json

    from assets.training import train_from_asset_config
    from omnisage_pipeline.resources import MlflowResource

    settings, art = published
    _publish_examples(settings, art.day)
    config = _two_step_config()
    first = train_from_asset_config(settings, MlflowResource.from_settings(settings), config, log=lambda m: None)
    for path in (settings.home / "mlflow-artifacts").rglob("config.json"):  # as an older release wrote it
        raw = json.loads(path.read_text())
        path.write_text(json.dumps({**raw, "format_version": 1}))
    second = train_from_asset_config(settings, MlflowResource.from_settings(settings), config, log=lambda m: None)
    assert (first.version, second.version) == ("1", "2")
    assert second.alias == "champion" and "cannot be loaded by this release" in second.decision


def test_a_champion_moved_by_another_training_during_the_gate_is_not_overwritten(
    published,  # noqa: F811
    omnisage_env,
    monkeypatch,
):
    """Another host's training promotes while this one gates (no local lock sees it): this one re-reads the
    champion right before moving the alias and does not replace a model it was never compared with."""
    from assets.training import train_from_asset_config
    from ml import training_run
    from ml.registry import ModelRegistry
    from omnisage_pipeline.resources import MlflowResource

    settings, art = published
    _publish_examples(settings, art.day)
    config = _two_step_config()
    mlflow_res = MlflowResource.from_settings(settings)
    first = train_from_asset_config(settings, mlflow_res, config, log=lambda m: None)
    registry = ModelRegistry(settings.mlflow_tracking_uri)
    log_results = training_run.log_results

    def gate_then_another_host_promotes(client, run_id, cfg, gate, ev):
        out = log_results(client, run_id, cfg, gate, ev)
        registry.set_alias("champion", registry.register(first.run_id, "model"))  # v2, from elsewhere
        return out

    monkeypatch.setattr(training_run, "log_results", gate_then_another_host_promotes)
    second = train_from_asset_config(settings, mlflow_res, config, log=lambda m: None)
    assert (first.version, second.version) == ("1", "3") and second.previous_champion == "1"
    assert second.alias == "challenger" and "moved from v1 to v2" in second.decision
    assert registry.version_for_alias("champion") == "2" and registry.version_for_alias("challenger") == "3"
    assert registry.model_version("3").tags["gate.alias"] == "challenger"
