"""What a training run records in MLflow (``ml.training_run``, rank 0): the run itself and its tags, every
config value as params, the per-task losses as step metrics, the evaluation and gate metrics, the model as an
MLflow pyfunc model (``ml.mlflow_model``) with the PinSage-like baseline as artifacts, and the registered
version with its alias and the gate's decision as tags.

mlflow's entities and torch (``ml.model_io``) are imported where used: the Dagster code location imports
this module without training.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ml.fitting import Evaluated
from ml.layout import MODEL_ARTIFACT_PATH, PINSAGE_ARTIFACT_PATH
from ml.mlflow_model import log_pyfunc_model
from ml.promotion_gate import GateDecision, report_json, task_recalls
from ml.run_config import TrainingRunConfig
from ml.run_preparation import PreparedRun
from ml.run_types import RunOptions, TrainingInputs
from ml.tracking import MlflowTarget


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def start_run(prep: PreparedRun, target: MlflowTarget, inputs: TrainingInputs, options: RunOptions):
    """-> (client, run id, previous run id of a resumed checkpoint)."""
    dagster_run_id, run_tags = options.dagster_run_id, options.run_tags
    client = target.client()
    experiment_id = target.experiment_id(options.experiment_name)
    tags = {
        "training_partition": inputs.partition,
        "asset": "omnisage_model",
        "checkpoint_fingerprint": prep.fingerprint,
    }
    if dagster_run_id:
        tags["dagster_run_id"] = dagster_run_id
    tags.update(run_tags or {})
    run = client.create_run(experiment_id, run_name=f"omnisage_model dt={inputs.partition}", tags=tags)
    prep.ckpt_dir.mkdir(parents=True, exist_ok=True)
    run_file = prep.ckpt_dir / "mlflow_run.json"
    previous_run = None
    if prep.resume is not None and run_file.is_file():
        previous_run = json.loads(run_file.read_text()).get("run_id")
    run_file.write_text(json.dumps({"run_id": run.info.run_id}))
    return client, run.info.run_id, previous_run


def log_params(client, run_id: str, prep: PreparedRun, config: TrainingRunConfig, inputs: TrainingInputs) -> None:
    """Every config value, the resolved model/train configs and the data's counts as run params."""
    from mlflow.entities import Param

    params: dict[str, str] = {}
    _flatten("config", config.plain(), params)
    params["training_partition"] = inputs.partition
    params["preset_resolved"] = prep.preset_name
    params["device_resolved"] = str(prep.device)
    params["world_size"] = os.environ.get("WORLD_SIZE", "1")
    params["num_workers_resolved"] = str(prep.loader.num_workers)
    params["features_in_memory"] = str(hasattr(prep.features, "fetch_nodes"))
    _flatten("model", prep.model_config.to_dict(), params)
    _flatten("train", {k: v for k, v in prep.train_config.to_dict().items() if k != "checkpoint_dir"}, params)
    params["layout"] = json.dumps([asdict(b) for b in prep.layout.blocks])
    params["max_tokens"] = str(prep.features.max_tokens)
    params["image_dim"] = str(prep.features.image_dim)
    params["steps_per_epoch"] = str(prep.loader.steps_per_epoch)
    _flatten("examples", dict(prep.data.manifest.get("counts", {})), params)
    _flatten("example_config", prep.data.manifest.get("config", {}), params)
    items = [Param(k[:250], v[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def metric_logger(client, run_id: str):
    """The Trainer's ``on_log`` callback: losses as ``loss/*``, the rest as ``train/*`` step metrics."""
    from mlflow.entities import Metric

    def on_log(step: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        out = []
        for k, v in metrics.items():
            if k == "step" or v is None:
                continue
            name = (
                f"train/{k}"
                if k in ("lr", "scale", "examples_per_s", "grad_norm")
                else ("loss/total" if k == "loss" else f"loss/{k}")
            )
            out.append(Metric(name, float(v), ts, int(step)))
        client.log_batch(run_id, metrics=out)

    return on_log


def mark_resumed(client, run_id: str, resumed_from: int, previous_run: str | None) -> None:
    """Tag a resumed run with its start step and the run it continues; that run, if still RUNNING, is
    marked KILLED."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    tags = [RunTag("resumed_from_step", str(resumed_from))]
    if previous_run:
        tags.append(RunTag("resumed_from_run", previous_run))
    client.log_batch(run_id, tags=tags)
    if previous_run:
        # the old run may live in another store; the tag is enough then
        with contextlib.suppress(MlflowException):
            if client.get_run(previous_run).info.status == "RUNNING":
                client.set_terminated(previous_run, status="KILLED")


def log_results(client, run_id, config: TrainingRunConfig, gate: GateDecision, ev: Evaluated) -> dict:
    """Metrics: ``eval/*`` the held-out test sets (reported), ``gate/*`` the gate's split, ``validation/*``
    the model-selection history. -> the evaluation report logged as ``evaluation/report.json``."""
    from mlflow.entities import Metric

    result, train_seconds, selection = ev.result, ev.train_seconds, ev.selection
    new_report, pinsage_report = ev.new_report, ev.pinsage_report
    k, ts, step = config.eval_k, int(time.time() * 1000), int(result.steps)
    metrics = []
    for name, r in task_recalls(new_report).items():
        if r["recall"] is not None:
            metrics.append(Metric(f"eval/recall_at_{k}/{name}", r["recall"], ts, step))
        metrics.append(Metric(f"eval/n/{name}", float(r["n"]), ts, step))
    if new_report.mean_recall is not None:
        metrics.append(Metric(f"eval/mean_recall_at_{k}", new_report.mean_recall, ts, step))
    for name, r in gate.new_recall.items():
        if r["recall"] is not None:
            metrics.append(Metric(f"gate/recall_at_{k}/{name}", r["recall"], ts, step))
    if gate.new_mean is not None:
        metrics.append(Metric(f"gate/new_mean_recall_at_{k}", gate.new_mean, ts, step))
    if gate.champion_mean is not None:
        metrics.append(Metric(f"gate/champion_mean_recall_at_{k}", gate.champion_mean, ts, step))
    for point in selection.history if selection is not None else []:
        if point["score"] is not None:
            metrics.append(Metric(f"validation/mean_recall_at_{k}", point["score"], ts, int(point["step"])))
    metrics.append(Metric("train/seconds", train_seconds, ts, step))
    metrics.append(Metric("train/steps", float(step), ts, step))
    if selection is not None and selection.best_step is not None:
        metrics.append(Metric("train/selected_step", float(selection.best_step), ts, step))
    if pinsage_report is not None and pinsage_report.recall("entity_entity") is not None:
        metrics.append(
            Metric(
                f"baseline/pinsage/recall_at_{k}/entity_entity",
                pinsage_report.recall("entity_entity"),
                ts,
                step,
            )
        )
    client.log_batch(run_id, metrics=metrics)
    evaluation = {
        "new": report_json(new_report),
        "gate_tasks": gate.tasks,
        "gate_split": gate.split,
        "gate_new_recall": gate.new_recall,
    }
    if selection is not None:
        evaluation["model_selection"] = {"selected_step": selection.best_step, "history": selection.history}
    if pinsage_report is not None:
        evaluation["pinsage_baseline"] = report_json(pinsage_report)
    client.log_dict(run_id, evaluation, "evaluation/report.json")
    return evaluation


def lineage_tags(inputs: TrainingInputs, options: RunOptions) -> dict[str, str]:
    """What links a logged model and its version back to the run that made it (and its Dagster run)."""
    tags = {"training_partition": inputs.partition, **(options.run_tags or {})}
    if options.dagster_run_id:
        tags["dagster_run_id"] = options.dagster_run_id
    return tags


def log_models(
    client,
    run_id: str,
    prep: PreparedRun,
    config: TrainingRunConfig,
    inputs: TrainingInputs,
    ev: Evaluated,
    tracking_uri: str,
    lineage: dict[str, str],
) -> str:
    """The model as an MLflow pyfunc model (``ml.mlflow_model``) and the baseline directory as artifacts.
    -> the LoggedModel id."""
    from ml.model_io import save_model_dir

    step = int(ev.result.steps)
    common = {
        "layout": prep.layout,
        "max_tokens": prep.features.max_tokens,
        "training_partition": inputs.partition,
    }
    inputs.scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="omnisage-model-", dir=str(inputs.scratch_dir)) as tmp:
        extra = {
            "preset": prep.preset_name,
            "steps": step,
            "mlflow_run_id": run_id,
            "example_config": prep.data.manifest.get("config", {}),
            "tasks": list(prep.model_config.tasks),
            "eval": {"k": config.eval_k, "pool_size": config.pool_size, "seed": config.eval_seed},
            # "time": the time split's pairs (ml.time_split) were held out of training
            "validation_split": prep.validation_split,
            "validation_fraction": config.validation_fraction,
        }
        local = save_model_dir(ev.model, Path(tmp) / MODEL_ARTIFACT_PATH, extra, **common)
        # at the run's last step: the eval/* and gate/* metrics logged there are linked to the LoggedModel
        info = log_pyfunc_model(tracking_uri, run_id, local, name=MODEL_ARTIFACT_PATH, step=step, tags=lineage)
        if ev.pinsage is not None:
            extra = {
                "steps": step,
                "mlflow_run_id": run_id,
                "baseline": "pinsage",
                "tasks": ["entity_entity"],
            }
            baseline_dir = save_model_dir(ev.pinsage, Path(tmp) / PINSAGE_ARTIFACT_PATH, extra, **common)
            client.log_artifacts(run_id, str(baseline_dir), artifact_path=PINSAGE_ARTIFACT_PATH)
    return info.model_id


def record_decision(
    client, run_id: str, gate: GateDecision, model_id: str, lineage: dict[str, str], register: bool
) -> str:
    """Register the logged model and set the gate's alias (when ``register``), and tag the run and the
    version with the decision. -> the version, or "" unregistered."""
    from mlflow.entities import RunTag

    fmt = lambda x: "null" if x is None else f"{x:.6f}"
    gate_tags = {
        "gate.decision": gate.decision,
        "gate.alias": gate.alias,
        "gate.new_mean_recall": fmt(gate.new_mean),
        "gate.champion_mean_recall": fmt(gate.champion_mean),
        "gate.previous_champion": gate.previous or "",
        "gate.tasks": ",".join(gate.tasks),
        "gate.split": gate.split,
    }
    version = ""
    if register:
        version = gate.registry.register(run_id, MODEL_ARTIFACT_PATH, tags={**gate_tags, **lineage}, model_id=model_id)
        gate.registry.set_alias(gate.alias, version)
    run_tags = {**gate_tags, "model_version": version, "model_id": model_id}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags.items()])
    return version
