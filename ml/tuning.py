"""Hyper-parameter search on the validation split (Optuna): ``omnisage tune`` and the quality benchmark.

A study trains the model (or its PinSage-like simplification, on the same budget) once per trial on one
``training_examples`` partition, with settings drawn from a declared :class:`SearchSpace` by a seeded TPE
sampler. Every trial is scored on the SAME validation pairs - the entity-entity rows of the validation split
(``ml.validation``) whose source is in ``TuneConfig.validation_sources`` - never on the held-out test sets
(paper 4.2.1): a trial's score is its model selection's best validation recall@k, and the intermediate
checks feed a median pruner that stops hopeless trials early. Each trial is an MLflow run nested under the
study's run (params, the validation curve, state); the best trial's settings are written as a JSON object
of ``omnisage_model`` config fields that ``omnisage train --config`` and the asset read.

The validation pairs are fixed across trials on purpose: ``keep_trained_sources`` would otherwise validate
each trial on the sources it trains on, and trials with different source weights could not be compared.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ml.training_examples import COENGAGEMENT_SOURCE, ENGAGEMENT_SOURCES, GRAPH_SOURCES

#: eq. 2's source weights w_i a trial may choose: every source; engagement and co-engagement only; the direct
#: engagement sources only; pin -> pin engagement and co-engagement only (where the product's relation is
#: "related pins").
_ALL = (*ENGAGEMENT_SOURCES, COENGAGEMENT_SOURCE, *GRAPH_SOURCES)
SOURCE_PROFILES: dict[str, dict[str, float] | None] = {
    "all": None,
    "engagement": {s: float(s not in GRAPH_SOURCES) for s in _ALL},
    "direct": {s: float(s in ENGAGEMENT_SOURCES) for s in _ALL},
    "pin_pin": {s: float(s in ("engagement_pin_pin", COENGAGEMENT_SOURCE)) for s in _ALL},
}


class SearchSpace(BaseModel):
    """What a trial may choose. Ranges are (low, high), drawn log-uniformly; lists are categorical."""

    model_config = ConfigDict(extra="forbid")

    lr: tuple[float, float] = Field((1e-3, 2e-2), description="AdamW learning rate (log-uniform)")
    batch_size: list[int] = Field([256, 512], description="entity-entity pairs per step")
    num_random_negatives: list[int] = Field([128, 1024], description="random negatives per type and step")
    lambda_aux: tuple[float, float] = Field(
        (0.03, 1.0), description="eq. 6's lambda_f = lambda_s (log-uniform); the model only"
    )
    id_buckets: list[int] = Field([0, 1 << 16], description="identity-token rows (0: content and graph only)")
    width: list[int] = Field([32, 64], description="embedding width d (ml.config.with_width)")
    pair_sampling: list[Literal["uniform", "count"]] = Field(["uniform", "count"])
    source_profile: list[Literal["all", "engagement", "direct", "pin_pin"]] = Field(
        ["all", "engagement", "direct", "pin_pin"], description="eq. 2's source weights (SOURCE_PROFILES)"
    )


class TuneConfig(BaseModel):
    """One study: which system, how many trials of how many steps, the sampler's seed."""

    model_config = ConfigDict(extra="forbid")

    system: Literal["model", "pinsage"] = "model"
    trials: int = Field(12, ge=1, description="trials of the study (pruned ones included)")
    steps: int = Field(300, ge=1, description="optimizer steps per trial")
    checks: int = Field(3, ge=1, description="validation evaluations per trial (model selection, pruning)")
    seed: int = Field(0, description="TPE sampler seed (the trials' training seed is the base config's)")
    startup_trials: int = Field(4, ge=0, description="random trials before TPE and before pruning")
    validation_sources: list[str] = Field(
        list(ENGAGEMENT_SOURCES), description="pair sources of the validation pairs every trial is scored on"
    )
    space: SearchSpace = SearchSpace()


@dataclasses.dataclass
class StudyResult:
    """The best trial's ``omnisage_model`` config fields and a JSON-ready summary of every trial."""

    best_config: dict[str, Any]
    best_value: float | None
    summary: dict[str, Any]

    def write(self, config_path: Path, summary_path: Path | None = None) -> None:
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(self.best_config, indent=2, sort_keys=True) + "\n")
        if summary_path is not None:
            summary_path.write_text(json.dumps(self.summary, indent=2, sort_keys=True) + "\n")


def sample_settings(trial, space: SearchSpace, system: str) -> dict[str, Any]:
    """-> ``omnisage_model`` config fields drawn from ``space`` (the PinSage-like system has no eq. 6 terms)."""
    out: dict[str, Any] = {
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "batch_size": trial.suggest_categorical("batch_size", space.batch_size),
        "num_random_negatives": trial.suggest_categorical("num_random_negatives", space.num_random_negatives),
        "id_buckets": trial.suggest_categorical("id_buckets", space.id_buckets),
        "width": trial.suggest_categorical("width", space.width),
        "pair_sampling": trial.suggest_categorical("pair_sampling", space.pair_sampling),
        "source_weights": SOURCE_PROFILES[trial.suggest_categorical("source_profile", space.source_profile)],
    }
    if system == "model":
        out["lambda_f"] = out["lambda_s"] = trial.suggest_float("lambda_aux", *space.lambda_aux, log=True)
    return out


def _pruning_score(trial, score: Callable, steps_seen: list[int]) -> Callable:
    """Wrap a selection score: report each check to Optuna and stop a trial the pruner calls hopeless."""
    import optuna

    def scored(model) -> float | None:
        value = score(model)
        step = len(steps_seen)
        steps_seen.append(step)
        trial.report(0.0 if value is None else float(value), step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation recall {value} at check {step}")
        return value

    return scored


class _StudyLog:
    """MLflow logging of a study: the study's run and one nested run per trial (client API, explicit ids)."""

    def __init__(self, target, name: str, tune: TuneConfig):
        self.client = target.client()
        experiment = target.experiment_id(f"{target.experiment_name}-tuning")
        self.experiment = experiment
        run = self.client.create_run(experiment, run_name=name, tags={"omnisage.kind": "study"})
        self.parent = run.info.run_id
        self.client.log_param(self.parent, "tune", json.dumps(tune.model_dump(), sort_keys=True))

    def trial(self, number: int, params: dict) -> str:
        tags = {"mlflow.parentRunId": self.parent, "omnisage.kind": "trial"}
        run = self.client.create_run(self.experiment, run_name=f"trial-{number}", tags=tags)
        for key, value in params.items():
            self.client.log_param(run.info.run_id, key, json.dumps(value) if isinstance(value, dict) else value)
        return run.info.run_id

    def finish_trial(self, run_id: str, state: str, history: list[dict], value: float | None) -> None:
        for point in history:
            if point["score"] is not None:
                self.client.log_metric(run_id, "validation/recall", point["score"], step=int(point["step"]))
        if value is not None:
            self.client.log_metric(run_id, "objective", value)
        self.client.set_tag(run_id, "optuna.state", state)
        self.client.set_terminated(run_id, "FINISHED" if state == "COMPLETE" else "KILLED")

    def finish(self, result: StudyResult) -> None:
        if result.best_value is not None:
            self.client.log_metric(self.parent, "best_objective", result.best_value)
        self.client.log_dict(self.parent, result.best_config, "best_config.json")
        self.client.log_dict(self.parent, result.summary, "study_summary.json")
        self.client.set_terminated(self.parent)


def _objective(inputs, base, tune: TuneConfig, scorer_factory, log, study_log):
    """One trial: draw settings, train with model selection on the validation scorer, -> best recall."""
    import optuna

    from ml.train import ModelSelection
    from ml.training_run import prepare, train_model, train_pinsage_baseline

    def objective(trial) -> float:
        settings = sample_settings(trial, tune.space, tune.system)
        config = base.replace(
            **settings, steps=tune.steps, resume=False, checkpoint_every=0, validation_checks=tune.checks
        )
        trial_inputs = dataclasses.replace(inputs, checkpoint_root=inputs.checkpoint_root / f"trial-{trial.number}")
        run_id = study_log.trial(trial.number, settings) if study_log else None
        prep = prepare(trial_inputs, config)
        selection = ModelSelection(_pruning_score(trial, scorer_factory(prep, config), []), checks=tune.checks)
        state = "COMPLETE"
        try:
            if tune.system == "model":
                train_model(prep, log, config=config, selection=selection)
            else:
                train_pinsage_baseline(prep, config, log, selection=selection)
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        finally:
            prep.loader.close()
            if study_log:
                study_log.finish_trial(run_id, state, selection.history, selection.best_score)
        return 0.0 if selection.best_score is None else selection.best_score

    return objective


def split_validation_scorer(inputs, base, sources: list[str]) -> tuple[Callable, int]:
    """The default objective: entity-entity recall@k on the validation split's pairs of ``sources`` (the
    same pairs for every trial). -> (scorer factory ``(prep, config) -> (model -> recall)``, pair count)."""
    from ml.evaluator import Evaluator, model_embedders
    from ml.training_examples_reader import load_training_examples
    from ml.validation import split_validation

    # the split every trial's prepare() carves: its validation pairs are never trained on
    _, validation = split_validation(
        load_training_examples(inputs.examples_dir),
        base.validation_fraction,
        seed=base.eval_seed,
        split=base.validation_split,
    )
    validation = fixed_validation_of(validation, sources)
    if validation.eval_pairs.num_rows == 0:
        raise ValueError(f"no validation pairs of sources {sources} in {inputs.examples_dir}")

    def factory(prep, config):
        limits = {"pool_size": config.pool_size, "max_queries": config.validation_max_queries}
        evaluator = Evaluator(validation, prep.universe, k=config.eval_k, seed=config.eval_seed, **limits)

        def score(model) -> float | None:
            report = evaluator.evaluate(*model_embedders(model.eval(), prep.builder), ["entity_entity"])
            return report.recall("entity_entity")

        return score

    return factory, validation.eval_pairs.num_rows


def run_study(inputs, base, tune: TuneConfig, log: Callable[[str], None], target=None, scorer=None) -> StudyResult:
    """Run the study on the partition ``inputs`` (``ml.training_run.TrainingInputs``) from the ``base``
    ``TrainingRunConfig``; ``target`` (an ``ml.tracking.MlflowTarget``) logs it to MLflow. ``scorer``:
    (factory, validation pair count) of another objective (default ``split_validation_scorer``; the quality
    benchmark scores the time-split validation pairs)."""
    import optuna

    factory, pairs = scorer or split_validation_scorer(inputs, base, tune.validation_sources)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=tune.seed, n_startup_trials=tune.startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=1)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    study_log = _StudyLog(target, f"tune-{tune.system}-{inputs.partition}", tune) if target else None
    t0 = time.perf_counter()
    study.optimize(_objective(inputs, base, tune, factory, log, study_log), n_trials=tune.trials)
    result = _result(study, base, tune, pairs, time.perf_counter() - t0)
    if study_log:
        study_log.finish(result)
    return result


def fixed_validation_of(validation, sources: list[str]):
    """``validation`` with only the entity-entity pairs of ``sources`` (the same for every trial)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = pc.is_in(validation.eval_pairs["source"], value_set=pa.array(sources, pa.string()))
    return dataclasses.replace(validation, eval_pairs=validation.eval_pairs.filter(keep))


def _result(study, base, tune: TuneConfig, pairs: int, seconds: float) -> StudyResult:
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    trials = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "checks": {str(k): v for k, v in t.intermediate_values.items()},
        }
        for t in study.trials
    ]
    best = study.best_trial if complete else None
    settings: dict[str, Any] = {}
    if best is not None:
        settings = dict(best.params)
        settings["source_weights"] = SOURCE_PROFILES[settings.pop("source_profile")]
        if "lambda_aux" in settings:
            settings["lambda_f"] = settings["lambda_s"] = settings.pop("lambda_aux")
        settings["steps"] = tune.steps
    summary = {
        "system": tune.system,
        "selection": "validation",
        "objective": "entity_entity recall@k",
        "validation_pairs": pairs,
        "validation_sources": tune.validation_sources,
        "trials": trials,
        "complete": len(complete),
        "pruned": sum(t["state"] == "PRUNED" for t in trials),
        "seconds": round(seconds, 1),
        "tune": tune.model_dump(),
        "base_seed": base.seed,
        "best_trial": None if best is None else best.number,
    }
    return StudyResult(settings, None if best is None else best.value, summary)
