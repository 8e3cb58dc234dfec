"""What one training run takes and gives back (``ml.training_run``): its resolved inputs, how it is recorded
and what it did. Plain data, no torch: the Dagster assets, the CLI and the torchrun request read them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainingInputs:
    """Resolved, published inputs of one run (the caller holds reader leases on them)."""

    partition: str
    examples_dir: Path
    graph_dir: Path
    features_dir: Path
    checkpoint_root: Path  # <home>/checkpoints/omnisage_model
    scratch_dir: Path

    def to_json(self) -> dict:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> TrainingInputs:
        return cls(
            d["partition"],
            *(Path(d[k]) for k in ("examples_dir", "graph_dir", "features_dir", "checkpoint_root", "scratch_dir")),
        )


@dataclass(frozen=True)
class RunOptions:
    """How one training run is recorded. ``stop_after`` (tests of the resume path) trains up to that step,
    keeps the checkpoint and returns None without registering - what a killed run leaves behind.
    ``register=False`` (ablation variants) logs the run and its model artifact in ``experiment_name`` but
    never touches the registry."""

    dagster_run_id: str | None = None
    stop_after: int | None = None
    register: bool = True
    experiment_name: str | None = None  # default: the target's experiment
    run_tags: dict[str, str] | None = None


@dataclass
class TrainingOutcome:
    """What ``train_and_register`` did (the asset turns it into metadata)."""

    run_id: str
    version: str
    alias: str
    decision: str
    new_mean_recall: float | None
    champion_mean_recall: float | None
    previous_champion: str | None
    gate_tasks: list[str]
    new_recall: dict[str, Any]  # held-out test sets (4.2.1)
    champion_recall: dict[str, Any]  # the gate's split
    training_partition: str
    steps: int
    resumed_from_step: int
    train_seconds: float
    device: str
    preset: str
    last_metrics: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    gate_split: str = "validation"
    validation_split: str = "none"  # ml.validation: "time", "hash" or "none" (no validation split)
    gate_new_recall: dict[str, Any] = field(default_factory=dict)  # the new model on the gate's split
    selected_step: int | None = None
    warm_start: str = ""
    model_id: str = ""  # the MLflow LoggedModel the version was registered from (ml.mlflow_model)
