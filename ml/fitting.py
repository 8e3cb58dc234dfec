"""Training on a ``PreparedRun`` (every rank): one ``ml.train.Trainer`` per model (``fit``), model selection
on the validation split (``model_selection``), the PinSage-like baseline (Table 2) and the held-out test
sets' evaluation of both (``evaluate_on_test_sets``). MLflow-free: ``train_model`` is the benchmarks' and the
tuner's entry point.

torch (``ml.train``, ``ml.evaluator``) is imported where used: the Dagster code location and the CLI import
this module without training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.run_config import TrainingRunConfig
from ml.run_preparation import PreparedRun, make_loader

if TYPE_CHECKING:
    from ml.config import ModelConfig
    from ml.evaluator import EvaluationReport, Evaluator
    from ml.train import ModelSelection, Trainer, TrainResult
    from ml.warm_start import WarmStart


@dataclass
class FitPlan:
    """Where and how one Trainer runs: its checkpoint directory, the checkpoint it resumes (or the warm
    start), its batches (default the run's loader), metric callback, model selection and early stop."""

    checkpoint_dir: Path
    resume: Path | None = None
    loader: Any = None
    on_log: Callable | None = None
    selection: ModelSelection | None = None
    warm: WarmStart | None = None
    stop_after: int | None = None


def fit(prep: PreparedRun, model_config: ModelConfig, log, plan: FitPlan) -> tuple[Trainer, TrainResult, int]:
    """-> (Trainer, TrainResult, resumed-from step)."""
    from ml.train import Trainer

    train_config = prep.train_config.replace(checkpoint_dir=str(plan.checkpoint_dir))
    trainer = Trainer(
        model_config,
        train_config,
        plan.loader or prep.loader,
        on_log=plan.on_log,
        progress=log,
        selection=plan.selection,
    )
    try:
        if plan.resume is not None:
            log(f"resuming from checkpoint {plan.resume}")
            trainer.load(plan.resume)
        elif plan.warm is not None:
            trainer.warm_start(plan.warm.weights, plan.warm.sketches)
        resumed_from = int(trainer.step)
        result = trainer.fit(stop_after=plan.stop_after)
    finally:
        trainer.close()
    return trainer, result, resumed_from


def validation_evaluator(prep: PreparedRun, config: TrainingRunConfig) -> Evaluator | None:
    """The evaluator of the validation split, or None when it holds no example of the model's tasks."""
    from ml.evaluator import Evaluator
    from ml.validation import validation_counts

    counts = validation_counts(prep.validation)
    if not any(counts[t] for t in prep.model_config.tasks):
        return None
    return Evaluator(
        prep.validation,
        prep.universe,
        k=config.eval_k,
        pool_size=config.pool_size,
        seed=config.eval_seed,
        max_queries=config.validation_max_queries,
    )


def model_selection(
    prep: PreparedRun, config: TrainingRunConfig, val_evaluator, log, tasks=None
) -> ModelSelection | None:
    """Model selection on the validation split (``ml.train.ModelSelection``): mean recall@k over ``tasks``
    (default the config's ``selection_tasks`` the model trains; all its tasks when it trains none of them)."""
    from ml.evaluator import model_embedders
    from ml.train import ModelSelection

    trained = list(prep.model_config.tasks)
    tasks = list(tasks or [t for t in config.selection_tasks if t in trained] or trained)
    if val_evaluator is None or prep.train_config.total_steps <= 0:
        return None

    def score(model) -> float | None:
        report = val_evaluator.evaluate(*model_embedders(model.eval(), prep.builder), tasks)
        value = report.mean_recall
        if log is not None:
            log(f"validation mean recall@{config.eval_k}: {value}")
        return value

    return ModelSelection(score, checks=config.validation_checks)


def train_model(
    prep: PreparedRun,
    log,
    model_config=None,
    loader=None,
    config: TrainingRunConfig | None = None,
    selection=None,
):
    """Train ``model_config`` (default the run's) on the prepared inputs from scratch (or the run's checkpoint)
    without MLflow: the benchmarks' and the tuner's entry point. With ``config``, model selection on the
    validation split as in a registered run (or the given ``ml.train.ModelSelection``). -> the trained model
    in eval mode."""
    if selection is None and config is not None:
        selection = model_selection(prep, config, validation_evaluator(prep, config), log)
    plan = FitPlan(prep.ckpt_dir, prep.resume, loader=loader, selection=selection)
    trainer, _, _ = fit(prep, model_config or prep.model_config, log, plan)
    if selection is not None and log is not None:
        log(f"model selection: step {selection.best_step} of {trainer.step} (validation {selection.best_score})")
    return trainer.model.eval()


def train_pinsage_baseline(prep: PreparedRun, config: TrainingRunConfig, log, selection=None):
    """The paper's Table 2 PinSage-like baseline: the same pipeline (graph, neighbourhoods, features, data,
    steps, optimiser) with mean-pooling aggregation and the entity-entity task only. -> the trained model."""
    baseline_config = prep.model_config.replace(
        tasks=("entity_entity",), embedder=dataclasses.replace(prep.model_config.embedder, aggregator="mean")
    )
    loader = make_loader(
        prep.data, prep.builder, config, ("entity_entity",), prep.model_config.sequence.max_len, prep.device
    )
    checkpoint_dir = prep.ckpt_dir / "pinsage"
    resume = checkpoint_dir / "last.pt" if config.resume and (checkpoint_dir / "last.pt").is_file() else None
    # the same model selection as the model's (validation entity-entity recall): a baseline on equal terms
    if selection is None:
        selection = model_selection(prep, config, validation_evaluator(prep, config), log, ("entity_entity",))
    try:
        plan = FitPlan(checkpoint_dir, resume, loader=loader, selection=selection)
        trainer, _, _ = fit(prep, baseline_config, log, plan)
    finally:
        loader.close()
    return trainer.model.eval()


def wants_pinsage_baseline(prep: PreparedRun, config: TrainingRunConfig) -> bool:
    """Whether the run trains the PinSage-like baseline beside the model (it needs the entity-entity task)."""
    return config.pinsage_baseline and "entity_entity" in prep.model_config.tasks and prep.train_config.total_steps > 0


@dataclass
class Evaluated:
    """A trained model (and its PinSage-like baseline) with their reports on the held-out test sets."""

    result: TrainResult
    train_seconds: float
    model: Any
    selection: ModelSelection | None
    evaluator: Evaluator | None = None  # the test sets' evaluator
    new_report: EvaluationReport | None = None
    pinsage: Any = None
    pinsage_report: EvaluationReport | None = None


def evaluate_on_test_sets(prep: PreparedRun, config: TrainingRunConfig, ev: Evaluated, log) -> None:
    """Train the PinSage-like baseline when asked, then score both models on the held-out test sets."""
    from ml.evaluator import Evaluator, model_embedders

    if wants_pinsage_baseline(prep, config):
        ev.pinsage = train_pinsage_baseline(prep, config, log)
    ev.evaluator = Evaluator(
        prep.data, prep.universe, k=config.eval_k, pool_size=config.pool_size, seed=config.eval_seed
    )
    ev.new_report = ev.evaluator.evaluate(*model_embedders(ev.model, prep.builder), list(prep.model_config.tasks))
    if ev.pinsage is not None:
        ev.pinsage_report = ev.evaluator.evaluate(*model_embedders(ev.pinsage, prep.builder), ["entity_entity"])
        log(f"pinsage baseline: recall@{config.eval_k} entity_entity = {ev.pinsage_report.recall('entity_entity')}")
