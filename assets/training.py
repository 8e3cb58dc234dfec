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
    as metrics, the model directory (``ml.model_io``: JSON + safetensors, no pickle) logged as an MLflow
    pyfunc model (``ml.mlflow_model``), registered as a new version of the registered model. The run, its
    LoggedModel and the version are tagged with the Dagster run id, the asset's code version and the
    training partition; the metadata links to them in the MLflow UI (``mlflow_run_url``,
    ``mlflow_model_version_url``, ``mlflow_logged_model_url``; base OMNISAGE_MLFLOW_UI_URL).

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
from typing import Any

import dagster as dg
from pydantic import Field, field_validator

from assets.checks import StagedGate, blocking_spec, examples_per_task
from assets.daily import ROW_COUNT, DayResult, materialize_days
from ml.config import TASK_NAMES
from ml.mlflow_links import link_run, redacted_uri
from ml.run_config import TrainingRunConfig
from ml.training_examples import ExampleConfig
from ml.training_run import CHAMPION
from omnisage_pipeline.partitions import (
    DAILY_BACKFILL_POLICY,
    DAILY_CHAIN_POOL,
    MODEL_TRAINING_POOL,
    daily_partitions,
    window_keys,
    window_mapping,
)
from omnisage_pipeline.resources import MlflowResource, StorageResource
from omnisage_pipeline.settings import Settings, load_settings
from omnisage_pipeline.storage.publish import partition_link
from omnisage_pipeline.training.examples import ExamplesDay, build_examples_day
from omnisage_pipeline.training.runner import check_training_partition, run_training

_EXAMPLE_DEFAULTS = ExampleConfig()


# ==========================================================================================================
# training_examples
# ==========================================================================================================
class TrainingExamplesConfig(dg.Config):
    t_max: int = Field(default=_EXAMPLE_DEFAULTS.t_max, ge=1, description="t_max of 3.3.3: history length per user")
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
    sample_seed: int = Field(default=_EXAMPLE_DEFAULTS.sample_seed, description="seed of the graph-pair draws")
    graph_pairs_per_node: int = Field(
        default=_EXAMPLE_DEFAULTS.graph_pairs_per_node,
        ge=1,
        description="graph-pair draws per (node, graph source)",
    )
    coengagement_window: int = Field(
        default=_EXAMPLE_DEFAULTS.coengagement_window,
        ge=0,
        description="co-engagement pairs (source coengagement_pin_pin): pins one user engaged within N events "
        "of each other, both directions, weighted by count (0: none)",
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
            coengagement_window=self.coengagement_window,
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
        "path": dg.MetadataValue.path(str(partition_link(settings.warehouse_dataset("training_examples"), day))),
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
            partitions_def=daily_partitions,
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
def training_examples(context: dg.AssetExecutionContext, config: TrainingExamplesConfig, storage: StorageResource):
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
class OmniSageModelConfig(dg.Config, TrainingRunConfig):
    """``ml.run_config.TrainingRunConfig`` (every field described there, unknown keys refused) as the asset's
    Dagster config; the training partition must also be one of the daily partitions."""

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
    return config.replace()


def train_from_asset_config(
    settings: Settings, mlflow_resource: MlflowResource, config: "OmniSageModelConfig", **kwargs
):
    """``omnisage_pipeline.training.runner.run_training`` with this asset's config (Dagster-free apart from the
    config class): the partition, reader leases, in-process or torchrun (``nproc_per_node``)."""
    return run_training(settings, mlflow_resource.target(), to_run_config(config), **kwargs)


@dg.asset(
    # Unpartitioned: one asset whose materializations are MLflow model versions. The deps carry lineage;
    # the partition actually read is config.training_partition (default the newest published).
    deps=[
        dg.AssetDep(key, partition_mapping=dg.LastPartitionMapping())
        for key in ("training_examples", "graph_snapshot", "feature_store")
    ],
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
    outcome = train_from_asset_config(settings, mlflow, config, log=context.log.info, dagster_run_id=context.run_id)
    assert outcome is not None
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key) or ""
    urls = link_run(
        mlflow.tracking_uri,
        mlflow.registered_model_name,
        load_settings().mlflow_ui_url,  # the code location's Settings (the resources do not carry it)
        run_id=outcome.run_id,
        version=outcome.version,
        model_id=outcome.model_id,
        tags={"dagster_run_id": context.run_id, "dagster_code_version": code_version},
    )

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
        "validation_split": outcome.validation_split,
        "gate_new_recall": dg.MetadataValue.json(outcome.gate_new_recall),
        "selected_step": outcome.selected_step if outcome.selected_step is not None else -1,
        "warm_start": outcome.warm_start or "off",
        "new_recall": dg.MetadataValue.json(outcome.new_recall),
        "champion_recall": dg.MetadataValue.json(outcome.champion_recall),
        "training_partition": outcome.training_partition,
        "mlflow_run_id": outcome.run_id,
        "mlflow_tracking_uri": redacted_uri(mlflow.tracking_uri),
        "mlflow_model_id": outcome.model_id,
        **{f"mlflow_{name}_url": dg.MetadataValue.url(url) for name, url in urls.items()},
        "steps": outcome.steps,
        "resumed_from_step": outcome.resumed_from_step,
        "train_seconds": round(outcome.train_seconds, 3),
        "device": outcome.device,
        "preset": outcome.preset,
        **{f"recall_at_10.{t}": num(r["recall"]) for t, r in outcome.new_recall.items()},
    }
    return dg.MaterializeResult(metadata=meta)
