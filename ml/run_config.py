"""The one training configuration: every setting of a training run, typed, validated and described once.

``omnisage_model`` (its Dagster config class subclasses this one), ``omnisage train --config``, ``omnisage
tune`` (``ml.tuning`` writes the best trial as a JSON object of these fields), the quality benchmark and the
ablation runner all build a :class:`TrainingRunConfig`; an unknown key is an error everywhere.
"""

from __future__ import annotations

from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ml.config import TASK_NAMES


def check_day(value: str, field_name: str = "training_partition") -> str:
    """``value`` if it is a day YYYY-MM-DD (a partition key), else ValueError naming the field."""
    try:
        ok = date.fromisoformat(value).isoformat() == value
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"config field {field_name!r} = {value!r}: expected a day YYYY-MM-DD")
    return value


def _known_tasks(tasks: list[str], field_name: str) -> list[str]:
    unknown = sorted(set(tasks) - set(TASK_NAMES))
    if unknown or not tasks:
        raise ValueError(f"config field {field_name!r} = {tasks}: tasks are {list(TASK_NAMES)}")
    return tasks


class TrainingRunConfig(BaseModel):
    """Settings of one training run (paper 3.3-3.4, A.3); defaults are the asset's."""

    model_config = ConfigDict(extra="forbid")

    training_partition: str | None = Field(
        default=None,
        description="training_examples partition (YYYY-MM-DD) to train on; default: the newest published",
    )
    preset: Literal["auto", "paper", "small"] = Field(
        default="auto",
        description="ml.config preset: 'paper' (A.3 hyper-parameters) or 'small'; 'auto' = paper on a GPU, "
        "small on CPU",
    )
    steps: int | None = Field(
        default=None,
        ge=0,
        description="optimizer steps (cosine horizon); default: the preset's total_steps; 0 = no training",
    )
    epochs: int | None = Field(default=None, ge=1, description="stop after this many passes over the pairs")
    warmup_steps: int | None = Field(default=None, ge=0, description="linear warm-up steps; default: the preset's")
    # The defaults below marked "tuned" are what the validation-only studies found on MovieLens-100k and the
    # synthetic data alike (docs/quality.md, "Asset defaults"): settings for data nobody tuned for.
    batch_size: int = Field(
        default=512, ge=1, description="entity-entity pairs per step (other tasks scale); tuned: 512"
    )
    num_random_negatives: int = Field(
        default=1024,
        ge=0,
        description="uniform random negatives per task and step; tuned: 1,024 (a small catalogue is then seen "
        "whole by every step's softmax)",
    )
    source_weights: dict[str, float] | None = Field(
        default=None,
        description="eq. 2's w_i per pair source (engagement_pin_pin, engagement_board_pin, graph_pin_pin, "
        "graph_pin_board_pin, graph_pin_board, graph_board_pin); unset = training_examples' weights",
    )
    pair_sampling: Literal["uniform", "count"] = Field(
        default="count",
        description="draws of a pair source: uniform over its distinct pairs, or in proportion to their "
        "engagement count (each engagement one example of eq. 2's D_pair); tuned: count",
    )
    lr: float | None = Field(default=None, gt=0, description="peak AdamW learning rate; default: the preset's")
    tasks: list[str] = Field(default=list(TASK_NAMES), description="enabled tasks (eq. 6 terms)")
    aggregator: Literal["transformer", "mean"] = Field(
        default="transformer",
        description="neighbour aggregation of f_t: 'transformer' (3.2) or 'mean' (A.2.4)",
    )
    id_buckets: int | None = Field(
        default=1 << 16,
        ge=0,
        description="rows of the learned identity token's hash table (0 = content only, the paper's f_t; "
        "entities of degree 0 never use it); unset = the preset's; tuned: 65,536",
    )
    width: int | None = Field(
        default=None,
        ge=4,
        description="embedding width d (output, embedder, text table, sequence model; ml.config.with_width); "
        "unset = the preset's (small 32, paper 256 out / 768 model)",
    )
    softmax_scale: float | None = Field(
        default=None,
        gt=0,
        description="eq. 1's lambda (inverse temperature on the cosine q.v); unset = the preset's (20)",
    )
    learn_scale: bool = Field(default=False, description="learn eq. 1's lambda (clamped to [5, 50]) from its start")
    id_dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="share of training rows whose identity tokens (u's and its neighbours') are zeroed, so the "
        "content + graph path learns to stand alone for entities training never saw (needs id_buckets > 0)",
    )
    lambda_p: float = Field(default=1.0, ge=0, description="eq. 6 weight of the entity-entity loss")
    lambda_f: float = Field(default=0.15, ge=0, description="eq. 6 weight of the entity-feature loss; tuned")
    lambda_s: float = Field(default=0.15, ge=0, description="eq. 6 weight of the user-entity (sequence) loss; tuned")
    pinsage_baseline: bool = Field(
        default=True,
        description="also train the PinSage-like baseline (Table 2: mean aggregation, entity-entity task only, "
        "same steps) into the run's artifacts 'baselines/pinsage', for recall_report",
    )
    device: str = Field(default="auto", description="'auto' = CUDA when present (fp16 autocast), else CPU")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto", description="auto | fp32 | fp16 | bf16 (auto: fp16 on CUDA, fp32 on CPU)"
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="token ids per entity read from the feature store; default: its width"
    )
    seed: int = Field(default=0, description="seed of initialisation and batch sampling")
    log_every: int = Field(default=10, ge=1, description="steps between logged (averaged) loss metrics")
    checkpoint_every: int = Field(default=50, ge=0, description="steps between resumable checkpoints (0 = end)")
    resume: bool = Field(default=True, description="resume from this config's checkpoint a killed run left")
    eval_k: int = Field(default=10, ge=1, description="k of recall@k (4.2.1)")
    pool_size: int = Field(default=10_000, ge=1, description="negative pool of the evaluator (gate, report)")
    eval_seed: int = Field(default=0, description="seed of the evaluator's negative pool")
    model_name: str | None = Field(default=None, description="registered model name; default: the resource's")
    num_workers: int | None = Field(
        default=None,
        ge=0,
        description="batch-building processes per rank (ml.loader); default: half of the rank's cores (>= 1); "
        "0 = build on the training thread",
    )
    prefetch_factor: int = Field(default=4, ge=1, description="steps each loader worker keeps in flight")
    feature_memory_budget_mb: float = Field(
        default=4096.0,
        ge=0,
        description="hold the day's feature store in memory when its decoded arrays fit this budget (0 = never: "
        "RocksDB lookups per batch)",
    )
    validation_fraction: float = Field(
        default=0.05,
        ge=0.0,
        lt=1.0,
        description="share of the training pairs, users and feature nodes carved out (stateless hash, the same "
        "rows every day) for model selection and the promotion gate; never trained on (ml.validation)",
    )
    validation_split: Literal["time", "hash"] = Field(
        default="time",
        description="entity-entity validation pairs (model selection and the promotion gate): 'time' = the pairs "
        "first engaged in the window's last eval_horizon_days (training_examples' future_pairs, at most "
        "validation_fraction of their sources' pairs, dropped from training; the hash split when there are none), 'hash' = the hash-carved share of every pair",
    )
    validation_checks: int = Field(
        default=4,
        ge=0,
        description="evaluations on the validation split at evenly spaced steps; the run keeps the best step's "
        "weights (0: the last step only)",
    )
    validation_max_queries: int = Field(default=2000, ge=1, description="validation queries per task and check")
    selection_tasks: list[str] = Field(
        default=["entity_entity"],
        description="tasks whose mean validation recall picks the step kept (the PinSage-like baseline is "
        "always selected on entity_entity: both on the same criterion by default)",
    )
    warm_start: bool = Field(
        default=False,
        description="start from the registry champion's weights and count-min sketches when its tensors and "
        "layout fit this configuration (else from scratch, and the run says why)",
    )
    nproc_per_node: int = Field(
        default=1,
        ge=1,
        description="training processes (ranks) on this machine; > 1 launches torchrun (DDP: NCCL on GPUs, gloo "
        "on CPU), rank 0 logs to MLflow and registers",
    )

    @field_validator("training_partition")
    @classmethod
    def _day(cls, value: str | None) -> str | None:
        return value if value is None else check_day(value)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: list[str]) -> list[str]:
        return _known_tasks(tasks, "tasks")

    @field_validator("selection_tasks")
    @classmethod
    def _selection_tasks(cls, tasks: list[str]) -> list[str]:
        return _known_tasks(tasks, "selection_tasks")

    def replace(self, **changes: Any) -> TrainingRunConfig:
        """A validated copy with ``changes`` (always a plain ``TrainingRunConfig``, even from a subclass)."""
        return TrainingRunConfig.model_validate({**self.plain(), **changes})

    def plain(self) -> dict[str, Any]:
        """The fields as JSON-ready values (what MLflow params, request files and config files hold)."""
        return self.model_dump(include=set(TrainingRunConfig.model_fields))
