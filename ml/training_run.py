"""One training run of the OmniSage model (paper 3.3-3.4, A.3): train, log to MLflow, evaluate, register and
gate. Dagster-free: the ``omnisage_model`` asset, the ``omnisage train`` command, the benchmarks and the tests
call ``train_and_register``; under ``torchrun`` every rank runs it (``python -m ml.training_run REQUEST``).

    outcome = train_and_register(inputs, MlflowTarget(...), TrainingRunConfig(steps=500))

- inputs: one published partition's training examples, graph snapshot + neighbourhood cache and feature
  store (``TrainingInputs``, ``ml.run_types``), opened by ``ml.run_preparation.prepare``; the features are
  held in memory when they fit ``feature_memory_budget_mb`` (``graph_engine.feature_table``), batches are
  built by ``num_workers`` loader processes (``ml.loader``);
- one MLflow run (``ml.run_logging``): every config value as params, per-task losses as step metrics,
  recall@k per task on the held-out sets, the model directory (``ml.model_io``: JSON + safetensors) logged as
  an MLflow pyfunc model (``ml.mlflow_model``: a LoggedModel of the run, loadable with
  ``mlflow.pyfunc.load_model``) and registered from it as a new version, tagged with the training partition
  and the Dagster run id; the PinSage-like baseline (Table 2) is trained beside it as run artifacts
  ``baselines/pinsage`` (``ml.fitting``);
- validation split (``ml.validation``): ``validation_fraction`` of the training pairs, users and feature
  nodes carved out by a stateless hash and never trained on; model selection keeps the weights of the best
  of ``validation_checks`` evenly spaced evaluations on it (``ml.train.ModelSelection``);
- promotion gate on the validation split (``ml.promotion_gate``): the new model and the current ``champion``
  are evaluated now by one ``Evaluator``; the new version becomes ``champion`` when its mean recall@k is >=
  the champion's, else ``challenger``. The held-out test sets (4.2.1) are reported, never selected on; only
  when the validation split has no example of the gate's tasks (``validation_fraction`` 0, tiny data) does
  the gate read them, and its decision says so; promotions are serialised and compare-and-set
  (``ml.promotion_lock``);
- warm start (``warm_start``): the champion's weights and count-min sketches (``ml.warm_start``);
- checkpoints: ``checkpoint_root/<fingerprint>-<run>/last.pt`` every ``checkpoint_every`` steps, one folder
  per run (``ml.checkpoint_dirs``); a killed run's folder is resumed by the next run with the same fingerprint
  (inputs' published versions, every setting that changes the trajectory, the world size);
- distributed: with WORLD_SIZE > 1 (torchrun) every rank trains (DDP, ``ml.train``) and rank 0 alone logs,
  evaluates and registers.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ml.checkpoint_dirs import RunDir, claimed_run_dir
from ml.fitting import (
    Evaluated,
    FitPlan,
    evaluate_on_test_sets,
    fit,
    model_selection,
    train_model,
    train_pinsage_baseline,
    validation_evaluator,
    wants_pinsage_baseline,
)
from ml.layout import NEIGHBORHOODS_DIR
from ml.promotion_gate import GateDecision, gate_on_best_split, task_recalls
from ml.promotion_lock import CHALLENGER, CHAMPION, promotion_lock
from ml.run_config import TrainingRunConfig
from ml.run_logging import (
    lineage_tags,
    log_models,
    log_params,
    log_results,
    mark_resumed,
    metric_logger,
    record_decision,
    start_run,
)
from ml.run_preparation import PreparedRun, make_loader, prepare, with_warm_start
from ml.run_types import RunOptions, TrainingInputs, TrainingOutcome
from ml.tracking import MlflowTarget

# what the benchmarks, the tuner, the runner and the assets import from here
__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "NEIGHBORHOODS_DIR",
    "GateDecision",
    "PreparedRun",
    "RunOptions",
    "TrainingInputs",
    "TrainingOutcome",
    "TrainingRunConfig",
    "distributed",
    "main",
    "make_loader",
    "prepare",
    "task_recalls",
    "train_and_register",
    "train_model",
    "train_pinsage_baseline",
    "with_warm_start",
    "write_request",
]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def distributed(device_type: str):
    """One process group for the whole run under torchrun (the model's and the baseline's trainers share
    it): NCCL on CUDA, gloo on CPU. A no-op in a single process."""
    import torch.distributed as dist  # torch on first use: the Dagster code location imports this module

    world = int(os.environ.get("WORLD_SIZE", "1"))
    owns = world > 1 and dist.is_available() and not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    try:
        yield
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


def train_and_register(
    inputs: TrainingInputs,
    target: MlflowTarget,
    config: TrainingRunConfig,
    *,
    log: Callable[[str], None] = print,
    **options,
) -> TrainingOutcome | None:
    """Train, log, register and gate one model (module docstring); ``options`` are ``RunOptions`` fields.
    Ranks other than 0 train and return None."""
    opts = RunOptions(**options)
    prep = with_warm_start(prepare(inputs, config), config, target, log if _rank() == 0 else None)
    with distributed(prep.device.type), claimed_run_dir(prep.ckpt_dir, config.resume, _rank() == 0) as own:
        prep.ckpt_dir, prep.resume = own.path, own.resume  # this run's folder, never another live run's
        if _rank() != 0:
            plan = FitPlan(prep.ckpt_dir, prep.resume, stop_after=opts.stop_after, warm=prep.warm)
            fit(prep, prep.model_config, None, plan)
            if opts.stop_after is None and wants_pinsage_baseline(prep, config):
                train_pinsage_baseline(prep, config, log=None)
            prep.loader.close()
            return None
        try:
            return _run_rank0(prep, inputs, target, config, log=log, options=opts)
        finally:
            prep.loader.close()


def _run_rank0(
    prep: PreparedRun,
    inputs: TrainingInputs,
    target: MlflowTarget,
    config: TrainingRunConfig,
    *,
    log,
    options: RunOptions,
) -> TrainingOutcome | None:
    """Rank 0: train with model selection, evaluate, gate, log, register (module docstring)."""
    client, run_id, previous_run = start_run(prep, target, inputs, options)
    gate_lock = contextlib.ExitStack()
    try:
        log_params(client, run_id, prep, config, inputs)
        t0 = time.perf_counter()
        val_evaluator = validation_evaluator(prep, config)
        selection = model_selection(prep, config, val_evaluator, log)
        plan = FitPlan(
            prep.ckpt_dir,
            prep.resume,
            on_log=metric_logger(client, run_id),
            selection=selection,
            warm=prep.warm,
            stop_after=options.stop_after,
        )
        trainer, result, resumed_from = fit(prep, prep.model_config, log, plan)
        if prep.resume is not None:
            mark_resumed(client, run_id, resumed_from, previous_run)
        ev = Evaluated(result, time.perf_counter() - t0, trainer.model.eval(), selection)
        if options.stop_after is not None:
            client.set_terminated(run_id, status="KILLED")
            return None
        evaluate_on_test_sets(prep, config, ev, log)
        if options.register:  # from reading the champion to moving the alias: one promotion at a time
            name = config.model_name or target.registered_model_name
            gate_lock.enter_context(promotion_lock(inputs.checkpoint_root, target.tracking_uri, name))
        gate = gate_on_best_split(prep, target, config, ev, val_evaluator, options.register)
        evaluation = log_results(client, run_id, config, gate, ev)
        lineage = lineage_tags(inputs, options)
        model_id = log_models(client, run_id, prep, config, inputs, ev, gate.registry.tracking_uri, lineage)
        if options.register:  # the champion may have moved since the gate read it (another host's training)
            gate = gate.rechecked()
        version = record_decision(client, run_id, gate, model_id, lineage, options.register)
        gate_lock.close()
        client.set_terminated(run_id, status="FINISHED")
    except BaseException:
        gate_lock.close()
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status="FAILED")
        raise
    RunDir(prep.ckpt_dir).remove()  # registered: the checkpoint has no further use
    log(f"omnisage_model: version {version} -> {gate.alias} ({gate.decision})")
    return TrainingOutcome(
        run_id=run_id,
        version=version,
        alias=gate.alias,
        decision=gate.decision,
        new_mean_recall=gate.new_mean,
        champion_mean_recall=gate.champion_mean,
        previous_champion=gate.previous,
        gate_tasks=gate.tasks,
        new_recall=task_recalls(ev.new_report),
        champion_recall=gate.champion_recall,
        training_partition=inputs.partition,
        steps=int(result.steps),
        resumed_from_step=resumed_from,
        train_seconds=ev.train_seconds,
        device=str(prep.device),
        preset=prep.preset_name,
        last_metrics=dict(result.last_metrics),
        evaluation=evaluation,
        gate_split=gate.split,
        validation_split=prep.validation_split,
        gate_new_recall=gate.new_recall,
        selected_step=None if selection is None else selection.best_step,
        warm_start=prep.warm_note,
        model_id=model_id,
    )


# ----------------------------------------------------------------------------------------------------------
# torchrun entry point: python -m ml.training_run REQUEST.json
# ----------------------------------------------------------------------------------------------------------
def write_request(
    path: Path,
    inputs: TrainingInputs,
    target: MlflowTarget,
    config: TrainingRunConfig,
    outcome_path: Path,
    dagster_run_id: str | None = None,
) -> Path:
    """The request every rank of a launched run reads (``main``). -> ``path``."""
    path.write_text(
        json.dumps(
            {
                "inputs": inputs.to_json(),
                "target": asdict(target),
                "config": config.plain(),
                "outcome": str(outcome_path),
                "dagster_run_id": dagster_run_id,
            }
        )
    )
    return path


def main(argv: list[str] | None = None) -> int:
    """One rank of a launched run: reads the request, trains; rank 0 writes the outcome JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ml.training_run REQUEST.json", file=sys.stderr)
        return 2
    req = json.loads(Path(argv[0]).read_text())
    rank = _rank()
    log = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
    outcome = train_and_register(
        TrainingInputs.from_json(req["inputs"]),
        MlflowTarget(**req["target"]),
        TrainingRunConfig.model_validate(req["config"]),
        log=log,
        dagster_run_id=req.get("dagster_run_id"),
    )
    if outcome is not None:
        Path(req["outcome"]).write_text(json.dumps(asdict(outcome), default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
