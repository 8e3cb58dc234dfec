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

    Promotion gate: the new model AND the current ``champion`` are both evaluated now, by one
    ``ml.evaluator.Evaluator`` (same held-out sets, same negative pool and seed) over the tasks both models
    have; the new version gets alias ``champion`` when its mean recall@10 is >= the champion's, else
    ``challenger``. A champion that cannot be evaluated on this partition (its image dimension differs from
    the feature store's: it could not embed this data at all) loses to a model that can. The decision and
    both numbers go to the materialization metadata, the run's tags and the version's tags.

    Checkpoints: ``$OMNISAGE_HOME/checkpoints/omnisage_model/<fingerprint>/last.pt`` every
    ``checkpoint_every`` steps, where the fingerprint hashes the training partition's published version and
    every setting that changes the training trajectory. A materialization killed mid-training is resumed
    from there by the next materialization with the same config (``ml.train.Trainer`` restores the
    optimizer, schedule, sketches, RNG and position in the epoch); the directory is removed once the model
    is registered.

(No ``from __future__ import annotations``: Dagster resolves the Config types from the real annotations.)
"""

import contextlib
import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import dagster as dg
from pydantic import Field

from assets.daily import DayResult, materialize_days
from assets.graph import HOLDOUT_FILE
from assets.snapshot import NEIGHBORHOODS_DIR
from ml.config import TASK_NAMES
from ml.training_examples import ExampleConfig
from omnisage_pipeline.partitions import DAILY_BACKFILL_POLICY, daily_partitions, window_keys, window_mapping
from omnisage_pipeline.publish import (
    list_published,
    partition_link,
    publish_partition,
    published_path,
    require_published,
)
from omnisage_pipeline.resources import MlflowResource, StorageResource, store_lock
from omnisage_pipeline.settings import Settings

_EXAMPLE_DEFAULTS = ExampleConfig()
MODEL_ARTIFACT_PATH = "model"
#: The PinSage-like baseline (Table 2) trained beside the model, in the same MLflow run (never registered).
PINSAGE_ARTIFACT_PATH = "baselines/pinsage"
CHAMPION, CHALLENGER = "champion", "challenger"


# ==========================================================================================================
# training_examples
# ==========================================================================================================
class TrainingExamplesConfig(dg.Config):
    t_max: int = Field(default=_EXAMPLE_DEFAULTS.t_max, description="t_max of 3.3.3: history length per user")
    future_delta: int = Field(
        default=_EXAMPLE_DEFAULTS.future_delta, description="Delta of eq. 5: future engagements kept after t_max"
    )
    eval_horizon_days: int = Field(
        default=_EXAMPLE_DEFAULTS.eval_horizon_days,
        description="user-entity evaluation (4.2.1): engagement in the window's last N days is the future",
    )
    sample_seed: int = Field(default=_EXAMPLE_DEFAULTS.sample_seed, description="seed of the graph-pair draws")
    graph_pairs_per_node: int = Field(
        default=_EXAMPLE_DEFAULTS.graph_pairs_per_node, description="graph-pair draws per (node, graph source)"
    )

    def example_config(self) -> ExampleConfig:
        for name in ("t_max", "future_delta", "eval_horizon_days", "graph_pairs_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"training_examples config field '{name}' = {getattr(self, name)}: need >= 1")
        return ExampleConfig(
            t_max=self.t_max,
            future_delta=self.future_delta,
            eval_horizon_days=self.eval_horizon_days,
            sample_seed=self.sample_seed,
            graph_pairs_per_node=self.graph_pairs_per_node,
        )


def build_examples_day(settings: Settings, day: str, example_config: ExampleConfig, log=None) -> DayResult:
    """One day of training_examples (Dagster-free apart from the metadata values)."""
    from graph_engine.neighbor_sampler import NeighborhoodCache
    from graph_engine.snapshot import GraphSnapshot
    from ml.training_examples import build_training_examples

    logs_ds = settings.warehouse_dataset("engagement_logs")
    present, missing, files = [], [], []
    for key in window_keys(day):
        path = published_path(logs_ds, key)
        if path is None:
            missing.append(key)
            continue
        present.append(key)
        files.extend(sorted(path.glob("*.parquet")))
    if day not in present:
        require_published(logs_ds, day)  # the day itself must exist: raises with the dataset and key
    metadata_dir = require_published(settings.warehouse_dataset("entity_metadata"), day)
    # Hold out exactly the pairs the day's graph left out (pruned_edges records its choice).
    holdout = json.loads((require_published(settings.warehouse_dataset("pruned_edges"), day) / HOLDOUT_FILE).read_text())
    example_config = dataclasses.replace(
        example_config, eval_fraction=float(holdout["fraction"]), holdout_seed=int(holdout["seed"])
    )
    graph = require_published(settings.graph_dir, day)
    snapshot = GraphSnapshot.open(graph)
    cache = NeighborhoodCache.open(graph / NEIGHBORHOODS_DIR, snapshot)
    dataset = settings.warehouse_dataset("training_examples")
    t0 = time.perf_counter()
    with publish_partition(dataset, day) as staging:
        manifest = build_training_examples(
            files,
            metadata_dir / "pins",
            snapshot,
            cache,
            cache.layout,
            staging,
            day,
            example_config,
            boards_dir=metadata_dir / "boards",
        )
    seconds = time.perf_counter() - t0
    del snapshot, cache
    counts = manifest["counts"]
    if log is not None:
        log(
            f"training_examples dt={day}: {counts.get('pairs', 0)} training pairs, {counts.get('eval_pairs', 0)} "
            f"held out, {counts.get('sequences', 0)} sequences, from {len(files)} log files of "
            f"{len(present)} day(s) in {seconds:.1f}s"
        )
    meta: dict[str, Any] = {
        "path": dg.MetadataValue.path(str(partition_link(dataset, day))),
        **{f"rows_{name}": int(n) for name, n in counts.items()},
        "held_out_pairs": int(counts.get("eval_pairs", 0)),
        "held_out_users": int(counts.get("eval_sequences", 0)),
        "held_out_feature_nodes": int(counts.get("eval_feature_nodes", 0)),
        **{f"pairs.{src}": int(n) for src, n in manifest["per_source"].get("pairs", {}).items()},
        **{f"held_out_pairs.{src}": int(n) for src, n in manifest["per_source"].get("eval_pairs", {}).items()},
        "user_eval_cutoff": manifest.get("user_eval_cutoff", ""),
        "window": dg.MetadataValue.json({"present": present, "missing": missing}),
        "log_files": len(files),
        "example_config": dg.MetadataValue.json(asdict(example_config)),
        "build_seconds": round(seconds, 3),
    }
    return DayResult(meta)


@dg.asset(
    partitions_def=daily_partitions,
    backfill_policy=DAILY_BACKFILL_POLICY,
    deps=[
        dg.AssetDep("engagement_logs", partition_mapping=window_mapping()),
        dg.AssetDep("entity_metadata"),
        dg.AssetDep("graph_snapshot"),
    ],
    group_name="training",
    kinds={"parquet"},
    description="Training and held-out examples of day D (paper 3.3, 4.2.1): entity-entity pairs from the graph "
    "and from engagement (tagged with source and segment, weights w_i of eq. 2), user sequences (t_max + Delta), "
    "entity-feature nodes, and the day's entity universe; held out by a stateless hash.",
)
def training_examples(
    context: dg.AssetExecutionContext, config: TrainingExamplesConfig, storage: StorageResource
) -> dg.MaterializeResult:
    settings = storage.settings
    example_config = config.example_config()
    return materialize_days(
        context, lambda day: build_examples_day(settings, day, example_config, log=context.log.info)
    )


# ==========================================================================================================
# omnisage_model
# ==========================================================================================================
class OmniSageModelConfig(dg.Config):
    training_partition: Optional[str] = Field(
        default=None, description="training_examples partition (YYYY-MM-DD) to train on; default: the newest published"
    )
    preset: str = Field(
        default="auto",
        description="ml.config preset: 'paper' (A.3 hyper-parameters) or 'small'; 'auto' = paper on a GPU, small on CPU",
    )
    steps: Optional[int] = Field(
        default=None, description="optimizer steps (cosine horizon); default: the preset's total_steps; 0 = no training"
    )
    epochs: Optional[int] = Field(default=None, description="stop after this many passes over the training pairs")
    warmup_steps: Optional[int] = Field(default=None, description="linear warm-up steps; default: the preset's")
    batch_size: int = Field(default=128, description="entity-entity pairs per step (other tasks scale with it)")
    num_random_negatives: int = Field(default=128, description="uniform random negatives per task and step")
    lr: Optional[float] = Field(default=None, description="peak AdamW learning rate; default: the preset's")
    tasks: list[str] = Field(default=list(TASK_NAMES), description="enabled tasks (eq. 6 terms)")
    aggregator: str = Field(
        default="transformer", description="neighbour aggregation of f_t: 'transformer' (3.2) or 'mean' (A.2.4)"
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
    precision: str = Field(default="auto", description="auto | fp32 | fp16 | bf16 (auto: fp16 on CUDA, fp32 on CPU)")
    max_tokens: Optional[int] = Field(
        default=None, description="token ids per entity read from the feature store; default: the store's width"
    )
    seed: int = Field(default=0, description="seed of initialisation and batch sampling")
    log_every: int = Field(default=10, description="steps between logged (averaged) loss metrics")
    checkpoint_every: int = Field(default=50, description="steps between resumable checkpoints (0 = end only)")
    resume: bool = Field(default=True, description="resume from this config's checkpoint when a killed run left one")
    eval_k: int = Field(default=10, description="k of recall@k (4.2.1)")
    pool_size: int = Field(default=10_000, description="negative pool of the evaluator (gate and report)")
    eval_seed: int = Field(default=0, description="seed of the evaluator's negative pool")
    model_name: Optional[str] = Field(default=None, description="registered model name; default: the mlflow resource's")


@dataclass
class TrainingOutcome:
    """What ``train_and_register`` did (the asset turns it into metadata)."""

    run_id: str
    version: str
    alias: str
    decision: str
    new_mean_recall: Optional[float]
    champion_mean_recall: Optional[float]
    previous_champion: Optional[str]
    gate_tasks: list[str]
    new_recall: dict[str, Any]
    champion_recall: dict[str, Any]
    training_partition: str
    steps: int
    resumed_from_step: int
    train_seconds: float
    device: str
    preset: str
    last_metrics: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)


def resolve_training_partition(settings: Settings, requested: Optional[str]) -> str:
    dataset = settings.warehouse_dataset("training_examples")
    if requested:
        require_published(dataset, requested)
        return requested
    keys = list_published(dataset)
    if not keys:
        raise FileNotFoundError(
            f"no published training_examples partition under {dataset}: materialize training_examples first"
        )
    return keys[-1]


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def _mean(values: list[Optional[float]]) -> Optional[float]:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def task_recalls(report) -> dict[str, dict[str, Any]]:
    """{task: {"recall": float | None, "n": int}} from an ``ml.evaluator.EvaluationReport``."""
    tasks = getattr(report, "tasks", None)
    out: dict[str, dict[str, Any]] = {}
    if isinstance(tasks, dict):
        for name, t in tasks.items():
            if isinstance(t, dict):
                recall = t.get("recall", t.get("recall@10"))
                n = t.get("n", 0)
            else:
                recall, n = getattr(t, "recall", None), getattr(t, "n", 0)
            out[name] = {"recall": None if recall is None else float(recall), "n": int(n or 0)}
        return out
    raw = report.to_json()
    raw = json.loads(raw) if isinstance(raw, str) else raw
    for name, t in raw.get("tasks", {}).items():
        recall = next((v for k, v in t.items() if k.startswith("recall")), None)
        out[name] = {"recall": None if recall is None else float(recall), "n": int(t.get("n", 0))}
    return out


def _report_json(report) -> dict:
    raw = report.to_json()
    return json.loads(raw) if isinstance(raw, str) else raw


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_and_register(settings: Settings, mlflow_resource: MlflowResource, config: "OmniSageModelConfig", **kwargs):
    """``_train_and_register`` holding reader leases on the partition's graph and feature store for the whole
    run, so retention (omnisage_pipeline.retention) never removes what training reads."""
    from omnisage_pipeline.retention import read_lease

    partition = resolve_training_partition(settings, config.training_partition)
    config = config.model_copy(update={"training_partition": partition})
    with read_lease(settings.graph_dir, partition), read_lease(settings.features_dir, partition):
        return _train_and_register(settings, mlflow_resource, config, **kwargs)


def _train_and_register(
    settings: Settings,
    mlflow_resource: MlflowResource,
    config: OmniSageModelConfig,
    *,
    log: Callable[[str], None] = print,
    dagster_run_id: Optional[str] = None,
    stop_after: Optional[int] = None,
    register: bool = True,
    experiment_name: Optional[str] = None,
    run_tags: Optional[dict[str, str]] = None,
) -> Optional[TrainingOutcome]:
    """Train, log, register and gate one model (module docstring). Dagster-free: the asset, the benchmark and
    the tests call it. ``stop_after`` (tests of the resume path) trains up to that step, keeps the checkpoint
    and returns None without registering - what a killed run leaves behind. ``register=False`` (ablation
    variants) logs the run and its model artifact in ``experiment_name`` but never touches the registry: no
    version, no alias, no champion comparison."""
    from mlflow.entities import Metric, Param, RunTag

    from graph_engine.batch_builder import BatchBuilder
    from graph_engine.featurizer import Featurizer
    from graph_engine.neighbor_sampler import NeighborhoodCache, NeighborSampler
    from graph_engine.snapshot import GraphSnapshot
    from ml.config import preset as make_preset
    from ml.evaluator import Evaluator, model_embedders
    from ml.example_loader import load_training_examples, make_batch_iterator_factory
    from ml.model_io import save_model_dir
    from ml.registry import ModelRegistry
    from ml.train import Trainer, resolve_device

    bad = [t for t in config.tasks if t not in TASK_NAMES]
    if bad or not config.tasks:
        raise ValueError(f"omnisage_model config field 'tasks': {config.tasks} (known: {list(TASK_NAMES)})")
    if config.aggregator not in ("transformer", "mean"):
        raise ValueError(f"omnisage_model config field 'aggregator': {config.aggregator!r} (transformer | mean)")
    if config.steps is not None and config.steps < 0:
        raise ValueError(f"omnisage_model config field 'steps' = {config.steps}: need >= 0")

    # ---------------------------------------------------------------------------------------- inputs
    partition = resolve_training_partition(settings, config.training_partition)
    examples_dir = require_published(settings.warehouse_dataset("training_examples"), partition)
    graph_dir = require_published(settings.graph_dir, partition)
    features_dir = require_published(settings.features_dir, partition)
    snapshot = GraphSnapshot.open(graph_dir)
    cache = NeighborhoodCache.open(graph_dir / NEIGHBORHOODS_DIR, snapshot)
    layout = cache.layout
    featurizer = Featurizer(features_dir, **({"max_tokens": config.max_tokens} if config.max_tokens else {}))
    builder = BatchBuilder(snapshot, cache, featurizer, layout)
    data = load_training_examples(examples_dir)
    universe = data.universe()

    device = resolve_device(config.device)
    preset_name = config.preset
    if preset_name == "auto":
        preset_name = "paper" if device.type == "cuda" else "small"
    model_config, train_config = make_preset(preset_name, image_dim=featurizer.image_dim)
    model_config = model_config.replace(
        tasks=tuple(config.tasks),
        embedder=dataclasses.replace(model_config.embedder, aggregator=config.aggregator),
        lambda_p=config.lambda_p,
        lambda_f=config.lambda_f,
        lambda_s=config.lambda_s,
    )
    if layout.width and len(layout.blocks) > model_config.embedder.max_blocks:
        raise ValueError(
            f"graph/dt={partition}: layout has {len(layout.blocks)} blocks, the preset's embedder holds "
            f"{model_config.embedder.max_blocks}"
        )
    total_steps = train_config.total_steps if config.steps is None else int(config.steps)
    train_config = train_config.replace(
        total_steps=total_steps,
        epochs=config.epochs,
        warmup_steps=train_config.warmup_steps if config.warmup_steps is None else config.warmup_steps,
        lr=train_config.lr if config.lr is None else config.lr,
        device=str(device),
        precision=config.precision,
        seed=config.seed,
        log_every=max(1, config.log_every),
        checkpoint_every=max(0, config.checkpoint_every),
    )
    train_config = train_config.replace(warmup_steps=min(train_config.warmup_steps, max(total_steps, 0)))
    factory = make_batch_iterator_factory(
        data,
        builder,
        tasks=tuple(config.tasks),
        batch_size=config.batch_size,
        num_random_negatives=config.num_random_negatives,
        seed=config.seed,
        universe=universe,
        max_sequence_length=model_config.sequence.max_len,
    )

    # A checkpoint belongs to exactly one training trajectory: the published version of the inputs and
    # every setting that changes the batches or the optimisation.
    fingerprint = _fingerprint(
        {
            "examples": str(examples_dir),
            "graph": str(graph_dir),
            "features": str(features_dir),
            "model": model_config.to_dict(),
            "train": {k: v for k, v in train_config.to_dict().items() if k not in ("log_every", "checkpoint_every", "checkpoint_dir")},
            "batch_size": config.batch_size,
            "negatives": config.num_random_negatives,
        }
    )
    ckpt_dir = settings.home / "checkpoints" / "omnisage_model" / fingerprint
    train_config = train_config.replace(checkpoint_dir=str(ckpt_dir))
    ckpt = ckpt_dir / "last.pt"
    resume = ckpt if (config.resume and ckpt.is_file()) else None

    # ------------------------------------------------------------------------------------------ MLflow
    client = mlflow_resource.client()
    experiment_id = mlflow_resource.experiment_id(experiment_name)
    model_name = config.model_name or mlflow_resource.registered_model_name
    registry = ModelRegistry(mlflow_resource.tracking_uri, model_name=model_name)
    tags = {"training_partition": partition, "asset": "omnisage_model", "checkpoint_fingerprint": fingerprint}
    if dagster_run_id:
        tags["dagster_run_id"] = dagster_run_id
    tags.update(run_tags or {})
    run = client.create_run(experiment_id, run_name=f"omnisage_model dt={partition}", tags=tags)
    run_id = run.info.run_id
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    previous_run = None
    run_file = ckpt_dir / "mlflow_run.json"
    if resume is not None and run_file.is_file():
        previous_run = json.loads(run_file.read_text()).get("run_id")
    run_file.write_text(json.dumps({"run_id": run_id}))

    try:
        params: dict[str, str] = {}
        _flatten("config", config.model_dump(), params)
        params["training_partition"] = partition
        params["preset_resolved"] = preset_name
        params["device_resolved"] = str(device)
        _flatten("model", model_config.to_dict(), params)
        _flatten("train", {k: v for k, v in train_config.to_dict().items() if k != "checkpoint_dir"}, params)
        params["layout"] = json.dumps([asdict(b) for b in layout.blocks])
        params["max_tokens"] = str(featurizer.max_tokens)
        params["image_dim"] = str(featurizer.image_dim)
        params["steps_per_epoch"] = str(getattr(factory, "steps_per_epoch", ""))
        _flatten("examples", {k: v for k, v in data.manifest.get("counts", {}).items()}, params)
        _flatten("example_config", data.manifest.get("config", {}), params)
        items = [Param(k[:250], v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])

        # -------------------------------------------------------------------------------------- train
        skip = {"step"}

        def on_log(step: int, metrics: dict[str, float]) -> None:
            ts = int(time.time() * 1000)
            out = []
            for k, v in metrics.items():
                if k in skip or v is None:
                    continue
                name = (
                    f"train/{k}"
                    if k in ("lr", "scale", "examples_per_s", "grad_norm")
                    else ("loss/total" if k == "loss" else f"loss/{k}")
                )
                out.append(Metric(name, float(v), ts, int(step)))
            client.log_batch(run_id, metrics=out)

        t0 = time.perf_counter()
        trainer = Trainer(model_config, train_config, factory, on_log=on_log, progress=log)
        try:
            if resume is not None:
                log(f"resuming from checkpoint {resume}")
                trainer.load(resume)
            resumed_from = int(trainer.step)
            if resume is not None:
                tags_resume = [RunTag("resumed_from_step", str(resumed_from))]
                if previous_run:
                    tags_resume.append(RunTag("resumed_from_run", previous_run))
                client.log_batch(run_id, tags=tags_resume)
                if previous_run:
                    try:
                        if client.get_run(previous_run).info.status == "RUNNING":
                            client.set_terminated(previous_run, status="KILLED")
                    except Exception:  # the old run may live in another store; the tag is enough
                        pass
            result = trainer.fit(stop_after=stop_after)
        finally:
            trainer.close()
        train_seconds = time.perf_counter() - t0
        model = trainer.model.eval()
        if stop_after is not None:
            client.set_terminated(run_id, status="KILLED")
            return None

        # ----------------------------------------------------------------------------------- evaluate
        evaluator = Evaluator(data, universe, k=config.eval_k, pool_size=config.pool_size, seed=config.eval_seed)
        new_tasks = list(model_config.tasks)
        new_report = evaluator.evaluate(*model_embedders(model, builder), new_tasks)
        new_recall = task_recalls(new_report)

        # ------------------------------------------------- the PinSage-like baseline (Table 2), same data
        pinsage = None
        if config.pinsage_baseline and "entity_entity" in model_config.tasks and total_steps > 0:
            pinsage = _train_pinsage_baseline(
                model_config, train_config, data, builder, universe, evaluator, config, ckpt_dir, log
            )

        # The gate, from reading the champion to moving the alias, holds the store's lock: two trainings
        # finishing together must not both see "no champion" (or the same old one) and both promote.
        gate_lock = contextlib.ExitStack()
        if register:
            gate_lock.enter_context(store_lock(mlflow_resource.tracking_uri))
        previous = registry.version_for_alias(CHAMPION) if register else None
        champion_recall: dict[str, Any] = {}
        champion_mean: Optional[float] = None
        gate_tasks = new_tasks
        champion_note = ""
        if previous is not None:
            champ = registry.load_version(previous, map_location=device)
            gate_tasks = [t for t in new_tasks if t in champ.config.tasks]
            if champ.config.image_dim and champ.config.image_dim != featurizer.image_dim:
                champion_note = (
                    f"champion v{previous} expects image vectors of length {champ.config.image_dim}, the feature "
                    f"store of dt={partition} has {featurizer.image_dim}: it cannot embed this data"
                )
            else:
                champ_layout = champ.layout or layout
                hoods = cache if champ_layout == layout else NeighborSampler(
                    snapshot, champ_layout, restart_prob=cache.restart_prob, budget=cache.budget
                )
                champ_features = (
                    featurizer
                    if not champ.max_tokens or champ.max_tokens == featurizer.max_tokens
                    else Featurizer(features_dir, max_tokens=champ.max_tokens)
                )
                champ_builder = BatchBuilder(snapshot, hoods, champ_features, champ_layout)
                champ_report = evaluator.evaluate(*model_embedders(champ.model, champ_builder), gate_tasks)
                champion_recall = task_recalls(champ_report)
                champion_mean = _mean([champion_recall.get(t, {}).get("recall") for t in gate_tasks])
            del champ
        new_mean = _mean([new_recall.get(t, {}).get("recall") for t in gate_tasks])

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
                f"champion: mean recall@{config.eval_k} {new_mean:.4f} >= champion v{previous}'s "
                f"{'n/a' if champion_mean is None else f'{champion_mean:.4f}'}"
            )
        else:
            promote = False
            decision = (
                f"challenger: mean recall@{config.eval_k} {new_mean:.4f} < champion v{previous}'s {champion_mean:.4f}"
            )
        alias = (CHAMPION if promote else CHALLENGER) if register else ""

        # --------------------------------------------------------------------- log, register, promote
        metrics = []
        ts = int(time.time() * 1000)
        final_step = int(result.steps)
        for name, r in new_recall.items():
            if r["recall"] is not None:
                metrics.append(Metric(f"eval/recall_at_{config.eval_k}/{name}", r["recall"], ts, final_step))
            metrics.append(Metric(f"eval/n/{name}", float(r["n"]), ts, final_step))
        if new_mean is not None:
            metrics.append(Metric(f"eval/mean_recall_at_{config.eval_k}", new_mean, ts, final_step))
        if champion_mean is not None:
            metrics.append(Metric(f"gate/champion_mean_recall_at_{config.eval_k}", champion_mean, ts, final_step))
        metrics.append(Metric("train/seconds", train_seconds, ts, final_step))
        metrics.append(Metric("train/steps", float(final_step), ts, final_step))
        if pinsage is not None and pinsage[1].recall("entity_entity") is not None:
            metrics.append(Metric(
                f"baseline/pinsage/recall_at_{config.eval_k}/entity_entity", pinsage[1].recall("entity_entity"),
                ts, final_step,
            ))
        client.log_batch(run_id, metrics=metrics)
        evaluation = {"new": _report_json(new_report), "gate_tasks": gate_tasks}
        if pinsage is not None:
            evaluation["pinsage_baseline"] = _report_json(pinsage[1])
        client.log_dict(run_id, evaluation, "evaluation/report.json")

        with tempfile.TemporaryDirectory(prefix="omnisage-model-", dir=_scratch(settings)) as tmp:
            local = save_model_dir(
                model,
                Path(tmp) / MODEL_ARTIFACT_PATH,
                {
                    "preset": preset_name,
                    "steps": final_step,
                    "mlflow_run_id": run_id,
                    "example_config": data.manifest.get("config", {}),
                    "tasks": list(model_config.tasks),
                    "eval": {"k": config.eval_k, "pool_size": config.pool_size, "seed": config.eval_seed},
                },
                layout=layout,
                max_tokens=featurizer.max_tokens,
                training_partition=partition,
            )
            client.log_artifacts(run_id, str(local), artifact_path=MODEL_ARTIFACT_PATH)
            if pinsage is not None:
                baseline_dir = save_model_dir(
                    pinsage[0],
                    Path(tmp) / PINSAGE_ARTIFACT_PATH,
                    {"steps": final_step, "mlflow_run_id": run_id, "baseline": "pinsage", "tasks": ["entity_entity"]},
                    layout=layout,
                    max_tokens=featurizer.max_tokens,
                    training_partition=partition,
                )
                client.log_artifacts(run_id, str(baseline_dir), artifact_path=PINSAGE_ARTIFACT_PATH)
        gate_tags = {
            "gate.decision": decision,
            "gate.alias": alias,
            "gate.new_mean_recall": "null" if new_mean is None else f"{new_mean:.6f}",
            "gate.champion_mean_recall": "null" if champion_mean is None else f"{champion_mean:.6f}",
            "gate.previous_champion": previous or "",
            "gate.tasks": ",".join(gate_tasks),
        }
        if register:
            version = registry.register(run_id, MODEL_ARTIFACT_PATH, tags={**gate_tags, "training_partition": partition})
            registry.set_alias(alias, version)
        else:
            version = ""
        gate_lock.close()
        client.log_batch(
            run_id, tags=[RunTag(k, v) for k, v in {**gate_tags, "model_version": version}.items()]
        )
        client.set_terminated(run_id, status="FINISHED")
    except BaseException:
        if "gate_lock" in locals():
            gate_lock.close()
        try:
            client.set_terminated(run_id, status="FAILED")
        except Exception:
            pass
        raise

    shutil.rmtree(ckpt_dir, ignore_errors=True)  # registered: the checkpoint has no further use
    log(f"omnisage_model: version {version} -> {alias} ({decision})")
    return TrainingOutcome(
        run_id=run_id,
        version=version,
        alias=alias,
        decision=decision,
        new_mean_recall=new_mean,
        champion_mean_recall=champion_mean,
        previous_champion=previous,
        gate_tasks=gate_tasks,
        new_recall=new_recall,
        champion_recall=champion_recall,
        training_partition=partition,
        steps=final_step,
        resumed_from_step=resumed_from,
        train_seconds=train_seconds,
        device=str(device),
        preset=preset_name,
        last_metrics=dict(result.last_metrics),
        evaluation=evaluation,
    )


def _train_pinsage_baseline(model_config, train_config, data, builder, universe, evaluator, config, ckpt_dir, log):
    """The paper's Table 2 PinSage-like baseline: the same pipeline (graph, neighbourhoods, features, data,
    steps, optimiser) with mean-pooling aggregation and the entity-entity task only. Returns (model, report)."""
    from ml.evaluator import model_embedders
    from ml.example_loader import make_batch_iterator_factory
    from ml.train import Trainer

    baseline_config = model_config.replace(
        tasks=("entity_entity",), embedder=dataclasses.replace(model_config.embedder, aggregator="mean")
    )
    factory = make_batch_iterator_factory(
        data, builder, tasks=("entity_entity",), batch_size=config.batch_size,
        num_random_negatives=config.num_random_negatives, seed=config.seed, universe=universe,
        max_sequence_length=model_config.sequence.max_len,
    )
    checkpoint_dir = Path(ckpt_dir) / "pinsage"
    trainer = Trainer(baseline_config, train_config.replace(checkpoint_dir=str(checkpoint_dir)), factory, progress=log)
    try:
        if config.resume and (checkpoint_dir / "last.pt").is_file():
            log(f"pinsage baseline: resuming from {checkpoint_dir / 'last.pt'}")
            trainer.load(checkpoint_dir / "last.pt")
        trainer.fit()
    finally:
        trainer.close()
    model = trainer.model.eval()
    report = evaluator.evaluate(*model_embedders(model, builder), ["entity_entity"])
    log(f"pinsage baseline: recall@{config.eval_k} entity_entity = {report.recall('entity_entity')}")
    return model, report


def _scratch(settings: Settings) -> str:
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    return str(settings.scratch_dir)


@dg.asset(
    # Unpartitioned: one asset whose materializations are MLflow model versions. The deps carry lineage;
    # the partition actually read is config.training_partition (default the newest published).
    deps=[dg.AssetDep("training_examples"), dg.AssetDep("graph_snapshot"), dg.AssetDep("feature_store")],
    group_name="training",
    kinds={"pytorch", "mlflow"},
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
    outcome = train_and_register(settings, mlflow, config, log=context.log.info, dagster_run_id=context.run_id)
    assert outcome is not None

    def num(x: Optional[float]) -> Any:
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
