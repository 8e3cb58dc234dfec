"""The daily recall@10 report (paper 4.2.1, Table 2; contract "recall.json"): the model and its baselines
scored by one ``ml.evaluator.Evaluator`` - the same query sets and negative pools for all - plus the
markdown table and the history plot the Dagster UI shows, and the regression rule of the asset check.

    report = build_report(day, model_version, evaluator, model_pair, {"random": pair, ...})
    report["tasks"]["entity_entity"]["recall@10"]          # the model
    report["baselines"]["cooccurrence"]["entity_entity"]    # a baseline, same shape

Dagster-free: ``omnisage_pipeline.evaluation.report`` publishes it and logs it to MLflow; the asset
attaches the markdown.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ml.config import TASK_NAMES
from ml.evaluator import EvaluationReport, Evaluator
from ml.pair_scoring import ItemScorer, evaluate_on

#: Baselines in the order the report lists them (``ml.baselines``, the item-item scorers
#: ``ml.window_cooccurrence`` and ``ml.ease``, and the PinSage-like model).
BASELINE_ORDER = (
    "random",
    "popularity",
    "cooccurrence",
    "window_cooccurrence",
    "ease",
    "als",
    "pinsage",
    "oracle",
)


@dataclass
class Candidate:
    """One scored system: an EntityEmbedder, an optional UserEmbedder and the tasks it can be scored on
    (a task it cannot do reports null with n = 0 and a reason). An item-item scorer
    (``ml.pair_scoring.ItemScorer``: window co-occurrence, EASE) goes in ``entity``; it is scored on the
    evaluator's own sets and pools by ``ml.pair_scoring.evaluate_on``, with the evaluator's rule."""

    entity: Any
    user: Any = None
    tasks: Sequence[str] = TASK_NAMES
    unavailable: str = ""  # when set, every task reports null with this reason (e.g. no PinSage model)


def _null(reason: str, k: int) -> dict:
    return {f"recall@{k}": None, "n": 0, "reason": reason}


def score(evaluator: Evaluator, candidate: Candidate) -> dict[str, dict]:
    """{task: {"recall@k": x | None, "n": int, ...}} for every task of the evaluation protocol."""
    k = evaluator.k
    if candidate.unavailable:
        return {t: _null(candidate.unavailable, k) for t in TASK_NAMES}
    tasks = [t for t in TASK_NAMES if t in candidate.tasks]
    if isinstance(candidate.entity, ItemScorer):
        report: EvaluationReport = evaluate_on(evaluator, candidate.entity, tasks)
    else:
        report = evaluator.evaluate(candidate.entity, candidate.user, tasks)
    out = report.to_json()
    for t in TASK_NAMES:
        if t not in out:
            out[t] = _null("not a task of this baseline", k)
    return {t: out[t] for t in TASK_NAMES}


def build_report(
    partition: str,
    model_version: str,
    evaluator: Evaluator,
    model: Candidate,
    baselines: Mapping[str, Candidate],
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """The contract's recall.json: model tasks, then each baseline on exactly the same sets."""
    tasks = score(evaluator, model)
    scored = {name: score(evaluator, baselines[name]) for name in _ordered(baselines)}
    return {
        "partition": partition,
        "model_version": str(model_version),
        "negatives": int(evaluator.pool_size),
        "k": evaluator.k,
        "pool_sizes": {t: int(v.size) for t, v in evaluator.pools.items()},
        "tasks": tasks,
        "baselines": scored,
        **dict(extra or {}),
    }


def _ordered(names) -> list[str]:
    names = list(names)
    return [n for n in BASELINE_ORDER if n in names] + sorted(n for n in names if n not in BASELINE_ORDER)


def recall_of(task_entry: Mapping[str, Any] | None, k: int = 10) -> float | None:
    if not task_entry:
        return None
    value = task_entry.get(f"recall@{k}")
    return None if value is None else float(value)


# ------------------------------------------------------------------------------------------- regression
@dataclass
class Regression:
    task: str
    previous: float
    current: float

    @property
    def drop(self) -> float:
        return self.previous - self.current


def regressions(current: Mapping, previous: Mapping | None, max_drop: float) -> list[Regression]:
    """Tasks whose model recall fell by more than ``max_drop`` (absolute) against the previous report.
    A task null on either side (no examples) is not compared."""
    if not previous:
        return []
    k = int(current.get("k", 10))
    out = []
    for task in TASK_NAMES:
        cur = recall_of(current.get("tasks", {}).get(task), k)
        prev = recall_of(previous.get("tasks", {}).get(task), k)
        if cur is not None and prev is not None and prev - cur > max_drop:
            out.append(Regression(task, prev, cur))
    return out


# ------------------------------------------------------------------------------------------- presentation
def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


def markdown(report: Mapping, previous: Mapping | None = None) -> str:
    """A table: rows = the model and each baseline, columns = tasks (recall@k and n), plus the oracle ratio."""
    k = int(report.get("k", 10))
    rows = [("**model** v" + str(report.get("model_version", "")), report["tasks"])]
    rows += [(name, tasks) for name, tasks in report.get("baselines", {}).items()]
    head = "| system | " + " | ".join(f"{t} recall@{k} (n)" for t in TASK_NAMES) + " |"
    lines = [
        (
            f"### recall@{k} on dt={report['partition']} (negatives: {report['negatives']} per type, "
            f"pools {report.get('pool_sizes', {})})"
        ),
        "",
        head,
        "|" + " --- |" * (len(TASK_NAMES) + 1),
    ]
    for name, tasks in rows:
        cells = [f"{_fmt(recall_of(tasks.get(t), k))} ({tasks.get(t, {}).get('n', 0)})" for t in TASK_NAMES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    oracle = report.get("baselines", {}).get("oracle", {})
    ee_model, ee_oracle = (
        recall_of(report["tasks"].get("entity_entity"), k),
        recall_of(oracle.get("entity_entity"), k),
    )
    if ee_model is not None and ee_oracle:
        lines += ["", f"entity_entity model / oracle = {ee_model / ee_oracle:.3f}"]
    lines += _time_split_lines(report, k)
    if previous:
        deltas = []
        for t in TASK_NAMES:
            cur, prev = recall_of(report["tasks"].get(t), k), recall_of(previous.get("tasks", {}).get(t), k)
            if cur is not None and prev is not None:
                deltas.append(f"{t} {cur - prev:+.4f}")
        if deltas:
            lines += ["", f"change vs dt={previous.get('partition')}: " + ", ".join(deltas)]
    return "\n".join(lines)


def _time_split_lines(report: Mapping, k: int) -> list[str]:
    """The time split's table (``report["time_split"]``, ``ml.time_split``); nothing without one."""
    split = report.get("time_split")
    if not split:
        return []
    lines = [
        "",
        f"entity_entity recall@{k} on the time split: {split['pairs']} pairs first engaged after {split['cutoff']}",
        "",
        "| system | entity_entity (n) |",
        "| --- | --- |",
    ]
    for name, entry in split["entity_entity"].items():
        label = "**model**" if name == "model" else name
        lines.append(f"| {label} | {_fmt(recall_of(entry, k))} ({entry.get('n', 0)}) |")
    return lines


def plot_png(history: Sequence[Mapping]) -> bytes:
    """PNG bytes: recall@k per task over the given reports (oldest first), the model solid, each baseline
    dashed, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = int(history[-1].get("k", 10)) if history else 10
    days = [h["partition"] for h in history]
    fig, axes = plt.subplots(1, len(TASK_NAMES), figsize=(4.2 * len(TASK_NAMES), 3.4), squeeze=False)
    systems = ["model"] + _ordered({n for h in history for n in h.get("baselines", {})})
    for ax, task in zip(axes[0], TASK_NAMES):
        for name in systems:
            values = [
                recall_of((h["tasks"] if name == "model" else h.get("baselines", {}).get(name, {})).get(task), k)
                for h in history
            ]
            if all(v is None for v in values):
                continue
            ys = [float("nan") if v is None else v for v in values]
            ax.plot(
                days,
                ys,
                marker="o",
                linestyle="-" if name == "model" else "--",
                linewidth=2.2 if name == "model" else 1.2,
                label=name,
            )
        ax.set_title(task)
        ax.set_ylabel(f"recall@{k}")
        ax.set_ylim(bottom=0)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
