"""One training run of the OmniSage model (paper 3.3-3.4, A.3): train, log to MLflow, evaluate, register and
gate. Dagster-free: the ``omnisage_model`` asset, the ``omnisage train`` command, the benchmarks and the tests
call ``train_and_register``; under ``torchrun`` every rank runs it (``python -m ml.training_run REQUEST``).

    outcome = train_and_register(inputs, MlflowTarget(...), TrainingRunConfig(steps=500))

- inputs: one published partition's training examples, graph snapshot + neighbourhood cache and feature
  store (``TrainingInputs``); the features are held in memory when they fit ``feature_memory_budget_mb``
  (``graph_engine.feature_table``), batches are built by ``num_workers`` loader processes (``ml.loader``);
- one MLflow run: every config value as params, per-task losses as step metrics, recall@k per task on the
  held-out sets, the model directory (``ml.model_io``: JSON + safetensors) logged as an MLflow pyfunc model
  (``ml.mlflow_model``: a LoggedModel of the run, loadable with ``mlflow.pyfunc.load_model``) and registered
  from it as a new version, tagged with the training partition and the Dagster run id; the PinSage-like
  baseline (Table 2) is trained beside it as run artifacts ``baselines/pinsage``;
- validation split (``ml.validation``): ``validation_fraction`` of the training pairs, users and feature
  nodes carved out by a stateless hash and never trained on; model selection keeps the weights of the best
  of ``validation_checks`` evenly spaced evaluations on it (``ml.train.ModelSelection``);
- promotion gate on the validation split: the new model and the current ``champion`` are evaluated now by
  one ``Evaluator``; the new version becomes ``champion`` when its mean recall@k is >= the champion's, else
  ``challenger``. The held-out test sets (4.2.1) are reported, never selected on; only when the validation
  split has no example of the gate's tasks (``validation_fraction`` 0, tiny data) does the gate read them,
  and its decision says so; promotions are serialised and compare-and-set (``ml.promotion_lock``);
- warm start (``warm_start``): the champion's weights and count-min sketches (``ml.warm_start``);
- checkpoints: ``checkpoint_root/<fingerprint>-<run>/last.pt`` every ``checkpoint_every`` steps, one folder
  per run (``ml.checkpoint_dirs``); a killed run's folder is resumed by the next run with the same fingerprint
  (inputs' published versions, every setting that changes the trajectory, the world size);
- distributed: with WORLD_SIZE > 1 (torchrun) every rank trains (DDP, ``ml.train``) and rank 0 alone logs,
  evaluates and registers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ml.checkpoint_dirs import RunDir, claimed_run_dir
from ml.layout import MODEL_ARTIFACT_PATH, NEIGHBORHOODS_DIR, PINSAGE_ARTIFACT_PATH
from ml.promotion_lock import compare_and_set, promotion_lock
from ml.run_config import TrainingRunConfig
from ml.tracking import MlflowTarget
from ml.validation import keep_trained_sources, split_validation

CHAMPION, CHALLENGER = "champion", "challenger"


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
            *(
                Path(d[k])
                for k in ("examples_dir", "graph_dir", "features_dir", "checkpoint_root", "scratch_dir")
            ),
        )


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
    gate_new_recall: dict[str, Any] = field(default_factory=dict)  # the new model on the gate's split
    selected_step: int | None = None
    warm_start: str = ""
    model_id: str = ""  # the MLflow LoggedModel the version was registered from (ml.mlflow_model)


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------
def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def _mean(values: list[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


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
    raw = _report_json(report)
    for name, t in raw.get("tasks", {}).items():
        recall = next((v for k, v in t.items() if k.startswith("recall")), None)
        out[name] = {"recall": None if recall is None else float(recall), "n": int(t.get("n", 0))}
    return out


def _report_json(report) -> dict:
    raw = report.to_json()
    return json.loads(raw) if isinstance(raw, str) else raw


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ----------------------------------------------------------------------------------------------------------
# inputs -> model config, batches, checkpoint
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    snapshot: Any
    cache: Any
    layout: Any
    features: Any
    builder: Any
    data: Any
    universe: dict
    device: Any
    preset_name: str
    model_config: Any
    train_config: Any
    loader: Any
    fingerprint: str
    ckpt_dir: Path
    resume: Path | None
    validation: Any = None  # TrainingData whose eval_* tables are the validation split
    warm: Any = None  # ml.warm_start.WarmStart
    warm_note: str = ""


def _configs(config: TrainingRunConfig, device, image_dim: int, layout):
    from ml.config import preset as make_preset
    from ml.config import with_width

    preset_name = (
        config.preset if config.preset != "auto" else ("paper" if device.type == "cuda" else "small")
    )
    model_config, train_config = make_preset(preset_name, image_dim=image_dim)
    if config.width is not None:
        model_config = with_width(model_config, config.width)
    model_config = model_config.replace(
        tasks=tuple(config.tasks),
        embedder=dataclasses.replace(
            model_config.embedder,
            aggregator=config.aggregator,
            id_buckets=model_config.embedder.id_buckets if config.id_buckets is None else config.id_buckets,
        ),
        lambda_p=config.lambda_p,
        lambda_f=config.lambda_f,
        lambda_s=config.lambda_s,
    )
    if layout.width and len(layout.blocks) > model_config.embedder.max_blocks:
        raise ValueError(
            f"layout has {len(layout.blocks)} blocks, the preset's embedder holds {model_config.embedder.max_blocks}"
        )
    total_steps = train_config.total_steps if config.steps is None else int(config.steps)
    train_config = train_config.replace(
        total_steps=total_steps,
        epochs=config.epochs,
        warmup_steps=min(
            train_config.warmup_steps if config.warmup_steps is None else config.warmup_steps,
            max(total_steps, 0),
        ),
        lr=train_config.lr if config.lr is None else config.lr,
        device=str(device),
        precision=config.precision,
        seed=config.seed,
        log_every=max(1, config.log_every),
        checkpoint_every=max(0, config.checkpoint_every),
    )
    return preset_name, model_config, train_config


def make_loader(data, builder, config: TrainingRunConfig, tasks, max_len: int, device):
    """The run's batches: keyed steps (``ml.step_sampler``) built by ``num_workers`` processes."""
    from ml.loader import BatchLoader, default_num_workers
    from ml.step_sampler import BatchConfig, make_batch_iterator_factory

    batches = BatchConfig(
        tasks=tuple(tasks),
        batch_size=config.batch_size,
        num_random_negatives=config.num_random_negatives,
        source_weights=config.source_weights,
        pair_sampling=config.pair_sampling,
        seed=config.seed,
        max_sequence_length=max_len,
    )
    source = make_batch_iterator_factory(data, builder, batches)
    workers = default_num_workers(config.nproc_per_node) if config.num_workers is None else config.num_workers
    return BatchLoader(
        source, num_workers=workers, prefetch_factor=config.prefetch_factor, pin_memory=device.type == "cuda"
    )


def prepare(inputs: TrainingInputs, config: TrainingRunConfig) -> _Prepared:
    from graph_engine.batch_builder import BatchBuilder
    from graph_engine.feature_table import open_features
    from graph_engine.neighbor_sampler import NeighborhoodCache
    from graph_engine.snapshot import GraphSnapshot
    from ml.train import resolve_device
    from ml.training_examples_reader import load_training_examples

    snapshot = GraphSnapshot.open(inputs.graph_dir)
    cache = NeighborhoodCache.open(inputs.graph_dir / NEIGHBORHOODS_DIR, snapshot)
    features = open_features(
        inputs.features_dir,
        max_tokens=config.max_tokens,
        memory_budget_mb=config.feature_memory_budget_mb,
        snapshot=snapshot,
    )
    builder = BatchBuilder(snapshot, cache, features, cache.layout)
    data, validation = split_validation(
        load_training_examples(inputs.examples_dir), config.validation_fraction, seed=config.eval_seed
    )
    validation = keep_trained_sources(validation, config.source_weights)
    device = resolve_device(config.device)
    preset_name, model_config, train_config = _configs(config, device, features.image_dim, cache.layout)
    loader = make_loader(data, builder, config, config.tasks, model_config.sequence.max_len, device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # A checkpoint belongs to exactly one training trajectory: the published version of the inputs, every
    # setting that changes the batches or the optimisation, and the world size (ranks shard the steps).
    fingerprint = _fingerprint(
        {
            "examples": str(inputs.examples_dir),
            "graph": str(inputs.graph_dir),
            "features": str(inputs.features_dir),
            "model": model_config.to_dict(),
            "train": {
                k: v
                for k, v in train_config.to_dict().items()
                if k not in ("log_every", "checkpoint_every", "checkpoint_dir")
            },
            "batch_size": config.batch_size,
            "negatives": config.num_random_negatives,
            **({"source_weights": config.source_weights} if config.source_weights else {}),
            **({"pair_sampling": config.pair_sampling} if config.pair_sampling != "uniform" else {}),
            **({"world_size": world} if world > 1 else {}),
            **(
                {"validation": [config.validation_fraction, config.eval_seed]}
                if config.validation_fraction
                else {}
            ),
        }
    )
    # the trajectory's name: train_and_register claims a folder of its own named after it (ml.checkpoint_dirs)
    ckpt_dir, resume = inputs.checkpoint_root / fingerprint, None
    return _Prepared(
        snapshot,
        cache,
        cache.layout,
        features,
        builder,
        data,
        data.universe(),
        device,
        preset_name,
        model_config,
        train_config,
        loader,
        fingerprint,
        ckpt_dir,
        resume,
        validation,
    )


def with_warm_start(prep: _Prepared, config: TrainingRunConfig, target: MlflowTarget, log) -> _Prepared:
    """Resolve ``warm_start`` against the registry: the champion's state goes to every rank's trainer, and
    its version into the checkpoint fingerprint (a resumed run continues the same trajectory)."""
    if not config.warm_start:
        return prep
    from ml.warm_start import champion_warm_start

    warm, note = champion_warm_start(
        target.tracking_uri, config.model_name or target.registered_model_name, prep.model_config, prep.layout
    )
    if log is not None:
        log(note)
    prep.warm, prep.warm_note = warm, note
    if warm is not None:
        prep.fingerprint = _fingerprint({"run": prep.fingerprint, "warm_start": warm.version})
        prep.ckpt_dir = prep.ckpt_dir.parent / prep.fingerprint
    return prep


# ----------------------------------------------------------------------------------------------------------
# training (every rank)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _FitPlan:
    """Where and how one Trainer runs: its checkpoint directory, the checkpoint it resumes (or the warm
    start), its batches (default the run's loader), metric callback, model selection and early stop."""

    checkpoint_dir: Path
    resume: Path | None = None
    loader: Any = None
    on_log: Callable | None = None
    selection: Any = None
    warm: Any = None
    stop_after: int | None = None


def _fit(prep: _Prepared, model_config, log, plan: _FitPlan):
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


def train_model(
    prep: _Prepared,
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
        selection = _selection(prep, config, _validation_evaluator(prep, config), log)
    plan = _FitPlan(prep.ckpt_dir, prep.resume, loader=loader, selection=selection)
    trainer, _, _ = _fit(prep, model_config or prep.model_config, log, plan)
    if selection is not None and log is not None:
        log(
            f"model selection: step {selection.best_step} of {trainer.step} (validation {selection.best_score})"
        )
    return trainer.model.eval()


def train_pinsage_baseline(prep: _Prepared, config: TrainingRunConfig, log, selection=None):
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
        selection = _selection(prep, config, _validation_evaluator(prep, config), log, ("entity_entity",))
    try:
        plan = _FitPlan(checkpoint_dir, resume, loader=loader, selection=selection)
        trainer, _, _ = _fit(prep, baseline_config, log, plan)
    finally:
        loader.close()
    return trainer.model.eval()


@contextlib.contextmanager
def distributed(device_type: str):
    """One process group for the whole run under torchrun (the model's and the baseline's trainers share
    it): NCCL on CUDA, gloo on CPU. A no-op in a single process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    owns = world > 1 and dist.is_available() and not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    try:
        yield
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------
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
            plan = _FitPlan(prep.ckpt_dir, prep.resume, stop_after=opts.stop_after, warm=prep.warm)
            _fit(prep, prep.model_config, None, plan)
            if (
                opts.stop_after is None
                and config.pinsage_baseline
                and "entity_entity" in config.tasks
                and prep.train_config.total_steps > 0
            ):
                train_pinsage_baseline(prep, config, log=None)
            prep.loader.close()
            return None
        try:
            return _run_rank0(prep, inputs, target, config, log=log, options=opts)
        finally:
            prep.loader.close()


def _start_run(prep: _Prepared, target: MlflowTarget, config, inputs, options: RunOptions):
    """-> (client, run id, previous run id of a resumed checkpoint)."""
    dagster_run_id, run_tags = options.dagster_run_id, options.run_tags
    client = target.client()
    experiment_id = target.experiment_id(options.experiment_name)
    tags = {
        "training_partition": inputs.partition,
        "asset": "omnisage_model",
        "checkpoint_fingerprint": prep.fingerprint,
    }
    if dagster_run_id:
        tags["dagster_run_id"] = dagster_run_id
    tags.update(run_tags or {})
    run = client.create_run(experiment_id, run_name=f"omnisage_model dt={inputs.partition}", tags=tags)
    prep.ckpt_dir.mkdir(parents=True, exist_ok=True)
    run_file = prep.ckpt_dir / "mlflow_run.json"
    previous_run = None
    if prep.resume is not None and run_file.is_file():
        previous_run = json.loads(run_file.read_text()).get("run_id")
    run_file.write_text(json.dumps({"run_id": run.info.run_id}))
    return client, run.info.run_id, previous_run


def _log_params(
    client, run_id: str, prep: _Prepared, config: TrainingRunConfig, inputs: TrainingInputs
) -> None:
    from mlflow.entities import Param

    params: dict[str, str] = {}
    _flatten("config", config.plain(), params)
    params["training_partition"] = inputs.partition
    params["preset_resolved"] = prep.preset_name
    params["device_resolved"] = str(prep.device)
    params["world_size"] = os.environ.get("WORLD_SIZE", "1")
    params["num_workers_resolved"] = str(prep.loader.num_workers)
    params["features_in_memory"] = str(hasattr(prep.features, "fetch_nodes"))
    _flatten("model", prep.model_config.to_dict(), params)
    _flatten("train", {k: v for k, v in prep.train_config.to_dict().items() if k != "checkpoint_dir"}, params)
    params["layout"] = json.dumps([asdict(b) for b in prep.layout.blocks])
    params["max_tokens"] = str(prep.features.max_tokens)
    params["image_dim"] = str(prep.features.image_dim)
    params["steps_per_epoch"] = str(prep.loader.steps_per_epoch)
    _flatten("examples", dict(prep.data.manifest.get("counts", {})), params)
    _flatten("example_config", prep.data.manifest.get("config", {}), params)
    items = [Param(k[:250], v[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def _metric_logger(client, run_id: str):
    from mlflow.entities import Metric

    def on_log(step: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        out = []
        for k, v in metrics.items():
            if k == "step" or v is None:
                continue
            name = (
                f"train/{k}"
                if k in ("lr", "scale", "examples_per_s", "grad_norm")
                else ("loss/total" if k == "loss" else f"loss/{k}")
            )
            out.append(Metric(name, float(v), ts, int(step)))
        client.log_batch(run_id, metrics=out)

    return on_log


def _mark_resumed(client, run_id: str, resumed_from: int, previous_run: str | None) -> None:
    from mlflow.entities import RunTag

    tags = [RunTag("resumed_from_step", str(resumed_from))]
    if previous_run:
        tags.append(RunTag("resumed_from_run", previous_run))
    client.log_batch(run_id, tags=tags)
    if previous_run:
        from mlflow.exceptions import MlflowException

        # the old run may live in another store; the tag is enough then
        with contextlib.suppress(MlflowException):
            if client.get_run(previous_run).info.status == "RUNNING":
                client.set_terminated(previous_run, status="KILLED")


@dataclass
class _Evaluated:
    """A trained model (and its PinSage-like baseline) with their reports on the held-out test sets."""

    result: Any  # ml.train.TrainResult
    train_seconds: float
    model: Any
    selection: Any  # ml.train.ModelSelection or None
    evaluator: Any  # the test sets' evaluator
    new_report: Any
    pinsage: Any = None
    pinsage_report: Any = None


def _evaluate(prep: _Prepared, config: TrainingRunConfig, ev: _Evaluated, log) -> None:
    """Train the PinSage-like baseline when asked, then score both models on the held-out test sets."""
    from ml.evaluator import Evaluator, model_embedders

    if (
        config.pinsage_baseline
        and "entity_entity" in prep.model_config.tasks
        and prep.train_config.total_steps > 0
    ):
        ev.pinsage = train_pinsage_baseline(prep, config, log)
    ev.evaluator = Evaluator(
        prep.data, prep.universe, k=config.eval_k, pool_size=config.pool_size, seed=config.eval_seed
    )
    ev.new_report = ev.evaluator.evaluate(
        *model_embedders(ev.model, prep.builder), list(prep.model_config.tasks)
    )
    if ev.pinsage is not None:
        ev.pinsage_report = ev.evaluator.evaluate(
            *model_embedders(ev.pinsage, prep.builder), ["entity_entity"]
        )
        log(
            f"pinsage baseline: recall@{config.eval_k} entity_entity = {ev.pinsage_report.recall('entity_entity')}"
        )


def _gate_on_best_split(prep, target, config, ev: _Evaluated, val_evaluator, register: bool) -> dict:
    """The gate on the validation split, or on the test sets when the validation split is empty."""
    from ml.evaluator import model_embedders

    if val_evaluator is None:
        return _gate(prep, target, config, ev.evaluator, ev.new_report, register, "test")
    report = val_evaluator.evaluate(*model_embedders(ev.model, prep.builder), list(prep.model_config.tasks))
    return _gate(prep, target, config, val_evaluator, report, register, "validation")


def _run_rank0(
    prep: _Prepared,
    inputs: TrainingInputs,
    target: MlflowTarget,
    config: TrainingRunConfig,
    *,
    log,
    options: RunOptions,
) -> TrainingOutcome | None:
    client, run_id, previous_run = _start_run(prep, target, config, inputs, options)
    gate_lock = contextlib.ExitStack()
    try:
        _log_params(client, run_id, prep, config, inputs)
        t0 = time.perf_counter()
        val_evaluator = _validation_evaluator(prep, config)
        selection = _selection(prep, config, val_evaluator, log)
        plan = _FitPlan(
            prep.ckpt_dir,
            prep.resume,
            on_log=_metric_logger(client, run_id),
            selection=selection,
            warm=prep.warm,
            stop_after=options.stop_after,
        )
        trainer, result, resumed_from = _fit(prep, prep.model_config, log, plan)
        if prep.resume is not None:
            _mark_resumed(client, run_id, resumed_from, previous_run)
        ev = _Evaluated(result, time.perf_counter() - t0, trainer.model.eval(), selection, None, None)
        if options.stop_after is not None:
            client.set_terminated(run_id, status="KILLED")
            return None
        _evaluate(prep, config, ev, log)
        if options.register:  # from reading the champion to moving the alias: one promotion at a time
            name = config.model_name or target.registered_model_name
            gate_lock.enter_context(promotion_lock(inputs.checkpoint_root, target.tracking_uri, name))
        gate = _gate_on_best_split(prep, target, config, ev, val_evaluator, options.register)
        evaluation = _log_results(client, run_id, config, gate, ev)
        version, model_id = _log_models(client, run_id, prep, config, inputs, ev, gate, options)
        gate_lock.close()
        client.set_terminated(run_id, status="FINISHED")
    except BaseException:
        gate_lock.close()
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status="FAILED")
        raise
    RunDir(prep.ckpt_dir).remove()  # registered: the checkpoint has no further use
    log(f"omnisage_model: version {version} -> {gate['alias']} ({gate['decision']})")
    return TrainingOutcome(
        run_id=run_id,
        version=version,
        alias=gate["alias"],
        decision=gate["decision"],
        new_mean_recall=gate["new_mean"],
        champion_mean_recall=gate["champion_mean"],
        previous_champion=gate["previous"],
        gate_tasks=gate["tasks"],
        new_recall=task_recalls(ev.new_report),
        champion_recall=gate["champion_recall"],
        training_partition=inputs.partition,
        steps=int(result.steps),
        resumed_from_step=resumed_from,
        train_seconds=ev.train_seconds,
        device=str(prep.device),
        preset=prep.preset_name,
        last_metrics=dict(result.last_metrics),
        evaluation=evaluation,
        gate_split=gate["split"],
        gate_new_recall=gate["new_recall"],
        selected_step=None if selection is None else selection.best_step,
        warm_start=prep.warm_note,
        model_id=model_id,
    )


def _validation_evaluator(prep: _Prepared, config: TrainingRunConfig):
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


def _selection(prep: _Prepared, config: TrainingRunConfig, val_evaluator, log, tasks=None):
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


def _champion_recall(prep: _Prepared, evaluator, champ, version: str, gate_tasks: list[str]):
    """-> (recall per task, note why the champion cannot embed this data or "")."""
    from graph_engine.batch_builder import BatchBuilder
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


def _gate(
    prep: _Prepared,
    target: MlflowTarget,
    config: TrainingRunConfig,
    evaluator,
    new_report,
    register,
    split: str = "validation",
) -> dict:
    """The promotion decision (module docstring) on ``evaluator``'s split, as a dict of everything the run
    logs about it."""
    from ml.registry import ModelRegistry

    registry = ModelRegistry(
        target.tracking_uri, model_name=config.model_name or target.registered_model_name
    )
    new_recall = task_recalls(new_report)
    gate_tasks = list(prep.model_config.tasks)
    previous = registry.version_for_alias(CHAMPION) if register else None
    champion_recall, champion_note = {}, ""
    if previous is not None:
        from ml.model_io import ModelFormatError

        try:
            champ = registry.load_version(previous, map_location=prep.device)
        except ModelFormatError as exc:  # saved by an older release: it cannot be evaluated, so it cannot win
            champ, champion_note = None, f"champion v{previous} cannot be loaded by this release ({exc})"
        if champ is not None:
            gate_tasks = [t for t in gate_tasks if t in champ.config.tasks]
            champion_recall, champion_note = _champion_recall(prep, evaluator, champ, previous, gate_tasks)
            del champ
    champion_mean = (
        _mean([champion_recall.get(t, {}).get("recall") for t in gate_tasks]) if champion_recall else None
    )
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
        decision = (
            f"challenger: mean recall@{k} {new_mean:.4f} < champion v{previous}'s {champion_mean:.4f}{on}"
        )
    return {
        "split": split,
        "registry": registry,
        "alias": (CHAMPION if promote else CHALLENGER) if register else "",
        "decision": decision,
        "new_mean": new_mean,
        "champion_mean": champion_mean,
        "previous": previous,
        "tasks": gate_tasks,
        "new_recall": new_recall,
        "champion_recall": champion_recall,
    }


def _log_results(client, run_id, config, gate, ev: _Evaluated) -> dict:
    """Metrics: ``eval/*`` the held-out test sets (reported), ``gate/*`` the gate's split, ``validation/*``
    the model-selection history."""
    from mlflow.entities import Metric

    result, train_seconds, selection = ev.result, ev.train_seconds, ev.selection
    new_report, pinsage_report = ev.new_report, ev.pinsage_report
    k, ts, step = config.eval_k, int(time.time() * 1000), int(result.steps)
    metrics = []
    for name, r in task_recalls(new_report).items():
        if r["recall"] is not None:
            metrics.append(Metric(f"eval/recall_at_{k}/{name}", r["recall"], ts, step))
        metrics.append(Metric(f"eval/n/{name}", float(r["n"]), ts, step))
    if new_report.mean_recall is not None:
        metrics.append(Metric(f"eval/mean_recall_at_{k}", new_report.mean_recall, ts, step))
    for name, r in gate["new_recall"].items():
        if r["recall"] is not None:
            metrics.append(Metric(f"gate/recall_at_{k}/{name}", r["recall"], ts, step))
    if gate["new_mean"] is not None:
        metrics.append(Metric(f"gate/new_mean_recall_at_{k}", gate["new_mean"], ts, step))
    if gate["champion_mean"] is not None:
        metrics.append(Metric(f"gate/champion_mean_recall_at_{k}", gate["champion_mean"], ts, step))
    for point in selection.history if selection is not None else []:
        if point["score"] is not None:
            metrics.append(Metric(f"validation/mean_recall_at_{k}", point["score"], ts, int(point["step"])))
    metrics.append(Metric("train/seconds", train_seconds, ts, step))
    metrics.append(Metric("train/steps", float(step), ts, step))
    if selection is not None and selection.best_step is not None:
        metrics.append(Metric("train/selected_step", float(selection.best_step), ts, step))
    if pinsage_report is not None and pinsage_report.recall("entity_entity") is not None:
        metrics.append(
            Metric(
                f"baseline/pinsage/recall_at_{k}/entity_entity",
                pinsage_report.recall("entity_entity"),
                ts,
                step,
            )
        )
    client.log_batch(run_id, metrics=metrics)
    evaluation = {
        "new": _report_json(new_report),
        "gate_tasks": gate["tasks"],
        "gate_split": gate["split"],
        "gate_new_recall": gate["new_recall"],
    }
    if selection is not None:
        evaluation["model_selection"] = {"selected_step": selection.best_step, "history": selection.history}
    if pinsage_report is not None:
        evaluation["pinsage_baseline"] = _report_json(pinsage_report)
    client.log_dict(run_id, evaluation, "evaluation/report.json")
    return evaluation


def _lineage_tags(inputs: TrainingInputs, options: RunOptions) -> dict[str, str]:
    """What links a logged model and its version back to the run that made it (and its Dagster run)."""
    tags = {"training_partition": inputs.partition, **(options.run_tags or {})}
    if options.dagster_run_id:
        tags["dagster_run_id"] = options.dagster_run_id
    return tags


def _log_models(
    client, run_id, prep, config, inputs, ev: _Evaluated, gate, options: RunOptions
) -> tuple[str, str]:
    """The model as an MLflow pyfunc model (``ml.mlflow_model``) and the baseline directory as artifacts;
    register and set the alias. -> (version or "", LoggedModel id)."""
    from mlflow.entities import RunTag

    from ml.mlflow_model import log_pyfunc_model
    from ml.model_io import save_model_dir

    model, pinsage, result, register = ev.model, ev.pinsage, ev.result, options.register
    step = int(result.steps)
    lineage = _lineage_tags(inputs, options)
    common = {
        "layout": prep.layout,
        "max_tokens": prep.features.max_tokens,
        "training_partition": inputs.partition,
    }
    inputs.scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="omnisage-model-", dir=str(inputs.scratch_dir)) as tmp:
        extra = {
            "preset": prep.preset_name,
            "steps": step,
            "mlflow_run_id": run_id,
            "example_config": prep.data.manifest.get("config", {}),
            "tasks": list(prep.model_config.tasks),
            "eval": {"k": config.eval_k, "pool_size": config.pool_size, "seed": config.eval_seed},
        }
        local = save_model_dir(model, Path(tmp) / MODEL_ARTIFACT_PATH, extra, **common)
        # at the run's last step: the eval/* and gate/* metrics logged there are linked to the LoggedModel
        info = log_pyfunc_model(
            gate["registry"].tracking_uri, run_id, local, name=MODEL_ARTIFACT_PATH, step=step, tags=lineage
        )
        if pinsage is not None:
            extra = {
                "steps": step,
                "mlflow_run_id": run_id,
                "baseline": "pinsage",
                "tasks": ["entity_entity"],
            }
            baseline_dir = save_model_dir(pinsage, Path(tmp) / PINSAGE_ARTIFACT_PATH, extra, **common)
            client.log_artifacts(run_id, str(baseline_dir), artifact_path=PINSAGE_ARTIFACT_PATH)
    if register:  # the champion may have moved since the gate read it (another host's training)
        gate.update(compare_and_set(gate["registry"], gate))
    fmt = lambda x: "null" if x is None else f"{x:.6f}"
    gate_tags = {
        "gate.decision": gate["decision"],
        "gate.alias": gate["alias"],
        "gate.new_mean_recall": fmt(gate["new_mean"]),
        "gate.champion_mean_recall": fmt(gate["champion_mean"]),
        "gate.previous_champion": gate["previous"] or "",
        "gate.tasks": ",".join(gate["tasks"]),
        "gate.split": gate["split"],
    }
    version = ""
    if register:
        version = gate["registry"].register(
            run_id, MODEL_ARTIFACT_PATH, tags={**gate_tags, **lineage}, model_id=info.model_id
        )
        gate["registry"].set_alias(gate["alias"], version)
    run_tags = {**gate_tags, "model_version": version, "model_id": info.model_id}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags.items()])
    return version, info.model_id


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
