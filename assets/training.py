"""Training assets (paper 3.3-3.4, 4.2.1): ``training_examples`` (daily) and ``omnisage_model`` (unpartitioned).

training_examples, partition D:
    reads the published validated ``engagement_logs`` of the OMNISAGE_WINDOW_DAYS days ending at D (the
    same window as the graph of day D; days never published are absent), the day's ``entity_metadata``
    and ``graph/dt=D`` (snapshot + its ``neighborhoods/`` cache), and writes
    ``warehouse/training_examples/dt=D/`` with ``ml.training_examples.build_training_examples``: training
    and held-out pairs / user sequences / feature nodes and the day's entity universe. The held-out split
    is a stateless hash (graph_engine.holdout) with ``eval_fraction`` / ``holdout_seed``: daily_edges drops
    held-out pairs from the graph with the library defaults (ml.training_examples.drop_held_out_edges), so
    change those two values in both places or not at all.

omnisage_model (one asset, many MLflow model versions):
    trains on ONE training_examples partition (config ``training_partition``, default the newest
    published) with that day's snapshot, neighbourhood cache and feature store. Each materialization is one
    MLflow run (experiment of the ``mlflow`` resource): every config value and the training partition as
    params, the per-task losses as step metrics (Trainer callback), recall@10 per task on the held-out sets
    as metrics, the model directory (``ml.model_io``: JSON + safetensors, no pickle) as artifacts,
    registered as a new version of the registered model.

    Model selection and promotion gate on a validation split carved from the training rows
    (``validation_fraction``, ml.validation; the held-out test sets are reported, not selected on): the run
    keeps the best of ``validation_checks`` evaluations, then the new model AND the current ``champion`` are
    both evaluated now, by one ``ml.evaluator.Evaluator`` (same validation set, same negative pool and seed)
    over the tasks both models have; the new version gets alias ``champion`` when its mean recall@10 is >= the champion's, else
    ``challenger``. A champion that cannot be evaluated on this partition (its image dimension differs from
    the feature store's: it could not embed this data at all) loses to a model that can. The decision and
    both numbers go to the materialization metadata, the run's tags and the version's tags.

    Checkpoints: ``$OMNISAGE_HOME/checkpoints/omnisage_model/<fingerprint>-<run>/last.pt`` every
    ``checkpoint_every`` steps, where the fingerprint hashes the training partition's published version and
    every setting that changes the training trajectory, and each run has a folder of its own
    (``ml.checkpoint_dirs``: two runs of one config never share one). A materialization killed
    mid-training is resumed from its folder by the next materialization with the same config
    (``ml.train.Trainer`` restores the optimizer, schedule, sketches, RNG and position in the epoch); the
    folder is removed once the model is registered.

    Pool ``omnisage_model`` (partitions.MODEL_TRAINING_POOL, limit 1): one training at a time. The gate
    holds a promotion lock and compare-and-sets the champion (``ml.promotion_lock``), whatever the store.

(No ``from __future__ import annotations``: Dagster resolves the Config types from the real annotations.)
"""

from dataclasses import asdict
from typing import Any, Literal

import dagster as dg
from pydantic import Field, field_validator

from assets.checks import StagedGate, blocking_spec, examples_per_task
from assets.daily import ROW_COUNT, DayResult, materialize_days
from ml.config import TASK_NAMES
from ml.training_examples import ExampleConfig
from ml.training_run import CHAMPION, TrainingRunConfig
from omnisage_pipeline.partitions import (
    DAILY_BACKFILL_POLICY,
    DAILY_CHAIN_POOL,
    MODEL_TRAINING_POOL,
    daily_partitions,
    window_keys,
    window_mapping,
)
from omnisage_pipeline.resources import MlflowResource, StorageResource
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import partition_link
from omnisage_pipeline.training.examples import ExamplesDay, build_examples_day
from omnisage_pipeline.training.runner import check_training_partition, run_training

_EXAMPLE_DEFAULTS = ExampleConfig()


# ==========================================================================================================
# training_examples
# ==========================================================================================================
class TrainingExamplesConfig(dg.Config):
    t_max: int = Field(
        default=_EXAMPLE_DEFAULTS.t_max, ge=1, description="t_max of 3.3.3: history length per user"
    )
    future_delta: int = Field(
        default=_EXAMPLE_DEFAULTS.future_delta,
        ge=1,
        description="Delta of eq. 5: future engagements kept after t_max",
    )
    sequence_stride: int = Field(
        default=_EXAMPLE_DEFAULTS.sequence_stride,
        ge=0,
        description="training sequences are windows of t_max ending every N engagements of a user's history "
        "before the cutoff (0: one window per user, the last t_max + Delta)",
    )
    eval_horizon_days: int = Field(
        default=_EXAMPLE_DEFAULTS.eval_horizon_days,
        ge=1,
        description="user-entity evaluation (4.2.1): engagement in the window's last N days is the future",
    )
    sample_seed: int = Field(
        default=_EXAMPLE_DEFAULTS.sample_seed, description="seed of the graph-pair draws"
    )
    graph_pairs_per_node: int = Field(
        default=_EXAMPLE_DEFAULTS.graph_pairs_per_node,
        ge=1,
        description="graph-pair draws per (node, graph source)",
    )
    required_tasks: list[str] = Field(
        default=["entity_entity", "entity_feature"],
        description="check examples_for_every_task: a task listed here without training examples blocks the "
        "day (entity_entity: pairs, entity_feature: feature_nodes, user_entity: sequences); an empty task not "
        "listed is a warning. user_entity is not required by default: its training sequences end before the "
        "evaluation horizon, so the first days of a data set have none",
    )

    @field_validator("required_tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = sorted(set(tasks) - set(TASK_NAMES))
        if unknown:
            raise ValueError(
                f"training_examples config field 'required_tasks': unknown {unknown}; tasks are {TASK_NAMES}"
            )
        return tasks

    def example_config(self) -> ExampleConfig:
        return ExampleConfig(
            t_max=self.t_max,
            future_delta=self.future_delta,
            sequence_stride=self.sequence_stride,
            eval_horizon_days=self.eval_horizon_days,
            sample_seed=self.sample_seed,
            graph_pairs_per_node=self.graph_pairs_per_node,
        )


def examples_day(
    settings: Settings, day: str, example_config: ExampleConfig, log=None, required_tasks=("entity_entity",)
) -> DayResult:
    """One day of training_examples with the blocking check ``examples_for_every_task`` on the staged
    tables (each of ``required_tasks`` has examples) and the day's metadata."""
    gate = StagedGate(day, lambda staged: [examples_per_task(staged, required_tasks)])
    built = build_examples_day(settings, day, example_config, window_keys(day), validate=gate)
    counts, logs = built.manifest["counts"], built.logs
    if log is not None:
        log(
            f"training_examples dt={day}: {counts.get('pairs', 0)} training pairs, {counts.get('eval_pairs', 0)} "
            f"held out, {counts.get('sequences', 0)} sequences, from {len(logs.files)} log files of "
            f"{len(logs.present)} day(s) in {built.seconds:.1f}s"
        )
    return DayResult(_examples_metadata(settings, day, built), gate.results)


def _examples_metadata(settings: Settings, day: str, built: ExamplesDay) -> dict[str, Any]:
    counts, per_source = built.manifest["counts"], built.manifest["per_source"]
    return {
        ROW_COUNT: int(counts.get("pairs", 0)),  # the main table: entity-entity training pairs
        "path": dg.MetadataValue.path(
            str(partition_link(settings.warehouse_dataset("training_examples"), day))
        ),
        **{f"rows_{name}": int(n) for name, n in counts.items()},
        "held_out_pairs": int(counts.get("eval_pairs", 0)),
        "held_out_users": int(counts.get("eval_sequences", 0)),
        "held_out_feature_nodes": int(counts.get("eval_feature_nodes", 0)),
        **{f"pairs.{src}": int(n) for src, n in per_source.get("pairs", {}).items()},
        **{f"held_out_pairs.{src}": int(n) for src, n in per_source.get("eval_pairs", {}).items()},
        "user_eval_cutoff": built.manifest.get("user_eval_cutoff", ""),
        "window": dg.MetadataValue.json({"present": built.logs.present, "missing": built.logs.missing}),
        "log_files": len(built.logs.files),
        "example_config": dg.MetadataValue.json(asdict(built.example_config)),
        "build_seconds": round(built.seconds, 3),
    }


@dg.asset(
    partitions_def=daily_partitions,
    backfill_policy=DAILY_BACKFILL_POLICY,
    pool=DAILY_CHAIN_POOL,
    deps=[
        dg.AssetDep("engagement_logs", partition_mapping=window_mapping()),
        dg.AssetDep("entity_metadata"),
        dg.AssetDep("graph_snapshot"),
    ],
    check_specs=[
        blocking_spec(
            "examples_for_every_task",
            "training_examples",
            "every task has training examples (a required one blocks)",
        )
    ],
    group_name="training",
    kinds={"parquet"},
    owners=["team:omnisage-ml"],
    tags={"layer": "training"},
    code_version="training-examples-2",
    description="Training and held-out examples of day D (paper 3.3, 4.2.1): entity-entity pairs from the graph "
    "and from engagement (tagged with source and segment, weights w_i of eq. 2), user sequences (t_max + Delta), "
    "entity-feature nodes, and the day's entity universe; held out by a stateless hash.",
)
def training_examples(
    context: dg.AssetExecutionContext, config: TrainingExamplesConfig, storage: StorageResource
):
    settings = storage.settings
    example_config = config.example_config()
    yield from materialize_days(
        context,
        lambda day: examples_day(
            settings, day, example_config, log=context.log.info, required_tasks=config.required_tasks
        ),
    )


# ==========================================================================================================
# omnisage_model
# ==========================================================================================================
class OmniSageModelConfig(dg.Config):
    training_partition: str | None = Field(
        default=None,
        description="training_examples partition (YYYY-MM-DD) to train on; default: the newest published",
    )
    preset: Literal["auto", "paper", "small"] = Field(
        default="auto",
        description="ml.config preset: 'paper' (A.3 hyper-parameters) or 'small'; 'auto' = paper on a GPU, small on CPU",
    )
    steps: int | None = Field(
        default=None,
        description="optimizer steps (cosine horizon); default: the preset's total_steps; 0 = no training",
    )
    epochs: int | None = Field(
        default=None, description="stop after this many passes over the training pairs"
    )
    warmup_steps: int | None = Field(default=None, description="linear warm-up steps; default: the preset's")
    batch_size: int = Field(
        default=128, description="entity-entity pairs per step (other tasks scale with it)"
    )
    num_random_negatives: int = Field(default=128, description="uniform random negatives per task and step")
    source_weights: dict[str, float] | None = Field(
        default=None,
        description="eq. 2's w_i per pair source (engagement_pin_pin, engagement_board_pin, graph_pin_pin, "
        "graph_pin_board_pin, graph_pin_board, graph_board_pin); unset = training_examples' weights",
    )
    lr: float | None = Field(default=None, description="peak AdamW learning rate; default: the preset's")
    tasks: list[str] = Field(default=list(TASK_NAMES), description="enabled tasks (eq. 6 terms)")
    aggregator: Literal["transformer", "mean"] = Field(
        default="transformer",
        description="neighbour aggregation of f_t: 'transformer' (3.2) or 'mean' (A.2.4)",
    )
    pair_sampling: Literal["uniform", "count"] = Field(
        default="uniform",
        description="draws of a pair source: uniform over its distinct pairs, or in proportion to their "
        "engagement count",
    )
    id_buckets: int | None = Field(
        default=None,
        ge=0,
        description="rows of the learned identity token's hash table (0 = content only, the paper's f_t); "
        "unset = the preset's",
    )
    lambda_p: float = Field(default=1.0, description="eq. 6 weight of the entity-entity loss")
    lambda_f: float = Field(default=1.0, description="eq. 6 weight of the entity-feature loss")
    lambda_s: float = Field(default=1.0, description="eq. 6 weight of the user-entity (sequence) loss")
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
        default=None,
        description="token ids per entity read from the feature store; default: the store's width",
    )
    seed: int = Field(default=0, description="seed of initialisation and batch sampling")
    log_every: int = Field(default=10, description="steps between logged (averaged) loss metrics")
    checkpoint_every: int = Field(
        default=50, description="steps between resumable checkpoints (0 = end only)"
    )
    resume: bool = Field(
        default=True, description="resume from this config's checkpoint when a killed run left one"
    )
    eval_k: int = Field(default=10, description="k of recall@k (4.2.1)")
    pool_size: int = Field(default=10_000, description="negative pool of the evaluator (gate and report)")
    eval_seed: int = Field(default=0, description="seed of the evaluator's negative pool")
    model_name: str | None = Field(
        default=None, description="registered model name; default: the mlflow resource's"
    )
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
    validation_checks: int = Field(
        default=4,
        ge=0,
        description="evaluations on the validation split at evenly spaced steps; the run keeps the best step's "
        "weights (0: the last step only)",
    )
    validation_max_queries: int = Field(
        default=2000, ge=1, description="validation queries per task and evaluation"
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
    def _daily_partition_key(cls, value: str | None) -> str | None:
        if value is None:
            return value
        check_training_partition(value)
        if not daily_partitions.has_partition_key(value):
            raise ValueError(
                f"omnisage_model config field 'training_partition' = {value!r}: not a daily partition (from "
                f"{daily_partitions.start.strftime('%Y-%m-%d')} to yesterday, UTC)"
            )
        return value


def to_run_config(config: "OmniSageModelConfig") -> TrainingRunConfig:
    return TrainingRunConfig.from_mapping(config.model_dump())


def train_and_register(
    settings: Settings, mlflow_resource: MlflowResource, config: "OmniSageModelConfig", **kwargs
):
    """``omnisage_pipeline.training.runner.run_training`` with this asset's config (Dagster-free apart from the
    config class): the partition, reader leases, in-process or torchrun (``nproc_per_node``)."""
    return run_training(settings, mlflow_resource.target(), to_run_config(config), **kwargs)


@dg.asset(
    # Unpartitioned: one asset whose materializations are MLflow model versions. The deps carry lineage;
    # the partition actually read is config.training_partition (default the newest published).
    deps=[dg.AssetDep("training_examples"), dg.AssetDep("graph_snapshot"), dg.AssetDep("feature_store")],
    pool=MODEL_TRAINING_POOL,
    group_name="training",
    kinds={"pytorch", "mlflow"},
    owners=["team:omnisage-ml"],
    tags={"layer": "training"},
    code_version="omnisage-model-2",
    description="OmniSage model trained on one training_examples partition (paper 3.3-3.4, A.3): one MLflow run "
    "per materialization, registered; alias 'champion' only if its mean recall@10 on the held-out sets is at "
    "least the current champion's (both evaluated now), else 'challenger'.",
)
def omnisage_model(
    context: dg.AssetExecutionContext,
    config: OmniSageModelConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    settings = storage.settings
    outcome = train_and_register(
        settings, mlflow, config, log=context.log.info, dagster_run_id=context.run_id
    )
    assert outcome is not None

    def num(x: float | None) -> Any:
        return dg.MetadataValue.float(float(x)) if x is not None else dg.MetadataValue.text("null")

    meta: dict[str, Any] = {
        "model_version": outcome.version,
        "alias": outcome.alias,
        "promoted": outcome.alias == CHAMPION,
        "gate_decision": outcome.decision,
        "new_mean_recall_at_10": num(outcome.new_mean_recall),
        "champion_mean_recall_at_10": num(outcome.champion_mean_recall),
        "previous_champion_version": outcome.previous_champion or "",
        "gate_tasks": dg.MetadataValue.json(outcome.gate_tasks),
        "gate_split": outcome.gate_split,
        "gate_new_recall": dg.MetadataValue.json(outcome.gate_new_recall),
        "selected_step": outcome.selected_step if outcome.selected_step is not None else -1,
        "warm_start": outcome.warm_start or "off",
        "new_recall": dg.MetadataValue.json(outcome.new_recall),
        "champion_recall": dg.MetadataValue.json(outcome.champion_recall),
        "training_partition": outcome.training_partition,
        "mlflow_run_id": outcome.run_id,
        "mlflow_tracking_uri": mlflow.tracking_uri,
        "steps": outcome.steps,
        "resumed_from_step": outcome.resumed_from_step,
        "train_seconds": round(outcome.train_seconds, 3),
        "device": outcome.device,
        "preset": outcome.preset,
        **{f"recall_at_10.{t}": num(r["recall"]) for t, r in outcome.new_recall.items()},
    }
    return dg.MaterializeResult(metadata=meta)
