"""The promotion gate of a training run (``ml.training_run``): the new model and the current ``champion`` are
evaluated now by one ``Evaluator`` on the validation split (on the held-out test sets only when the
validation split has no example of the gate's tasks); the new version becomes ``champion`` when its mean
recall@k is >= the champion's, else ``challenger``. The result is a ``GateDecision``; right before the alias
moves it is checked once more against the registry (``GateDecision.rechecked``, ``ml.promotion_lock``).

torch (``ml.registry``, ``ml.model_io``, ``ml.evaluator``) and numba (``graph_engine.featurizer``,
``graph_engine.neighbor_sampler``) are imported where used: the Dagster code location imports this module.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graph_engine.batch_builder import BatchBuilder
from ml.fitting import Evaluated
from ml.promotion_lock import CHALLENGER, CHAMPION, compare_and_set
from ml.run_config import TrainingRunConfig
from ml.run_preparation import PreparedRun
from ml.tracking import MlflowTarget

if TYPE_CHECKING:
    from ml.registry import ModelRegistry


def report_json(report) -> dict:
    """An ``ml.evaluator.EvaluationReport`` as a JSON object."""
    raw = report.to_json()
    return json.loads(raw) if isinstance(raw, str) else raw


def task_recalls(report) -> dict[str, dict[str, Any]]:
    """{task: {"recall": float | None, "n": int}} from an ``ml.evaluator.EvaluationReport``."""
    tasks = getattr(report, "tasks", None)
    out: dict[str, dict[str, Any]] = {}
    if isinstance(tasks, dict):
        for name, t in tasks.items():
            if isinstance(t, dict):
                recall, n = t.get("recall", t.get("recall@10")), t.get("n", 0)
            else:
                recall, n = getattr(t, "recall", None), getattr(t, "n", 0)
            out[name] = {"recall": None if recall is None else float(recall), "n": int(n or 0)}
        return out
    raw = report_json(report)
    for name, t in raw.get("tasks", {}).items():
        recall = next((v for k, v in t.items() if k.startswith("recall")), None)
        out[name] = {"recall": None if recall is None else float(recall), "n": int(t.get("n", 0))}
    return out


def _mean(values: list[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


@dataclass(frozen=True)
class GateDecision:
    """The gate's decision on ``split`` and everything the run logs about it. ``alias`` is "" for a run that
    does not register (an ablation variant)."""

    split: str  # "validation" or "test"
    registry: ModelRegistry
    alias: str
    decision: str
    new_mean: float | None
    champion_mean: float | None
    previous: str | None  # the champion version compared against
    tasks: list[str]
    new_recall: dict[str, Any]
    champion_recall: dict[str, Any]

    def rechecked(self) -> GateDecision:
        """This decision, or a challenger when the champion moved since the gate read it (another host's
        training): ``ml.promotion_lock.compare_and_set``."""
        checked = compare_and_set(
            self.registry, {"alias": self.alias, "previous": self.previous, "decision": self.decision}
        )
        return dataclasses.replace(self, alias=checked["alias"], decision=checked["decision"])


def _champion_recall(prep: PreparedRun, evaluator, champ, version: str, gate_tasks: list[str]):
    """-> (recall per task, note why the champion cannot embed this data or "")."""
    from graph_engine.featurizer import Featurizer
    from graph_engine.neighbor_sampler import NeighborSampler
    from ml.evaluator import model_embedders

    if champ.config.image_dim and champ.config.image_dim != prep.features.image_dim:
        return {}, (
            f"champion v{version} expects image vectors of length {champ.config.image_dim}, the feature store of "
            f"dt={prep.data.day} has {prep.features.image_dim}: it cannot embed this data"
        )
    champ_layout = champ.layout or prep.layout
    hoods = (
        prep.cache
        if champ_layout == prep.layout
        else NeighborSampler(
            prep.snapshot, champ_layout, restart_prob=prep.cache.restart_prob, budget=prep.cache.budget
        )
    )
    same_tokens = not champ.max_tokens or champ.max_tokens == prep.features.max_tokens
    features = prep.features if same_tokens else Featurizer(prep.features.path, max_tokens=champ.max_tokens)
    report = evaluator.evaluate(
        *model_embedders(champ.model, BatchBuilder(prep.snapshot, hoods, features, champ_layout)), gate_tasks
    )
    return task_recalls(report), ""


def _champion_on_split(registry: ModelRegistry, prep: PreparedRun, evaluator, previous, gate_tasks):
    """-> (the gate's tasks both models have, the champion's recall per task, note why it cannot compete)."""
    from ml.model_io import ModelFormatError

    try:
        champ = registry.load_version(previous, map_location=prep.device)
    except ModelFormatError as exc:  # saved by an older release: it cannot be evaluated, so it cannot win
        return gate_tasks, {}, f"champion v{previous} cannot be loaded by this release ({exc})"
    gate_tasks = [t for t in gate_tasks if t in champ.config.tasks]
    champion_recall, champion_note = _champion_recall(prep, evaluator, champ, previous, gate_tasks)
    return gate_tasks, champion_recall, champion_note


def decide_gate(
    prep: PreparedRun,
    target: MlflowTarget,
    config: TrainingRunConfig,
    evaluator,
    new_report,
    register: bool,
    split: str = "validation",
) -> GateDecision:
    """The promotion decision (module docstring) on ``evaluator``'s split."""
    from ml.registry import ModelRegistry

    registry = ModelRegistry(target.tracking_uri, model_name=config.model_name or target.registered_model_name)
    new_recall = task_recalls(new_report)
    gate_tasks = list(prep.model_config.tasks)
    previous = registry.version_for_alias(CHAMPION) if register else None
    champion_recall, champion_note = {}, ""
    if previous is not None:
        gate_tasks, champion_recall, champion_note = _champion_on_split(registry, prep, evaluator, previous, gate_tasks)
    champion_mean = _mean([champion_recall.get(t, {}).get("recall") for t in gate_tasks]) if champion_recall else None
    new_mean = _mean([new_recall.get(t, {}).get("recall") for t in gate_tasks])
    k = config.eval_k
    on = "" if split == "validation" else " (held-out test sets: the validation split is empty)"
    if not register:
        promote, decision = False, "unregistered: ablation variant"
    elif previous is None:
        promote, decision = True, "champion: no previous champion"
    elif champion_note:
        promote, decision = True, f"champion: {champion_note}"
    elif new_mean is None:
        promote, decision = False, "challenger: no evaluation examples for the gate's tasks"
    elif champion_mean is None or new_mean >= champion_mean:
        promote = True
        decision = (
            f"champion: mean recall@{k} {new_mean:.4f} >= champion v{previous}'s "
            f"{'n/a' if champion_mean is None else f'{champion_mean:.4f}'}{on}"
        )
    else:
        promote = False
        decision = f"challenger: mean recall@{k} {new_mean:.4f} < champion v{previous}'s {champion_mean:.4f}{on}"
    return GateDecision(
        split=split,
        registry=registry,
        alias=(CHAMPION if promote else CHALLENGER) if register else "",
        decision=decision,
        new_mean=new_mean,
        champion_mean=champion_mean,
        previous=previous,
        tasks=gate_tasks,
        new_recall=new_recall,
        champion_recall=champion_recall,
    )


def gate_on_best_split(
    prep: PreparedRun, target: MlflowTarget, config: TrainingRunConfig, ev: Evaluated, val_evaluator, register
) -> GateDecision:
    """The gate on the validation split, or on the test sets when the validation split is empty."""
    from ml.evaluator import model_embedders

    if val_evaluator is None:
        return decide_gate(prep, target, config, ev.evaluator, ev.new_report, register, "test")
    report = val_evaluator.evaluate(*model_embedders(ev.model, prep.builder), list(prep.model_config.tasks))
    return decide_gate(prep, target, config, val_evaluator, report, register, "validation")
