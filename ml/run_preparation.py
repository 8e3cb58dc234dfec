"""A training run's inputs turned into everything its trainers need (``ml.training_run``): the graph, its
neighbourhood cache and features, the training data and its validation split, the resolved model and train
configs, the batch loader and the checkpoint fingerprint - the ``PreparedRun``.

torch (``ml.train``, ``ml.loader``, ``ml.warm_start``) and numba (``graph_engine.feature_table``,
``graph_engine.neighbor_sampler``) are imported where used: the Dagster code location and the CLI import this
module without training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from graph_engine.batch_builder import BatchBuilder
from graph_engine.snapshot import GraphSnapshot
from ml.config import ModelConfig, TrainConfig, with_width
from ml.config import preset as make_preset
from ml.layout import NEIGHBORHOODS_DIR
from ml.run_config import TrainingRunConfig
from ml.run_types import TrainingInputs
from ml.tracking import MlflowTarget
from ml.training_examples_reader import TrainingData, load_training_examples
from ml.validation import keep_trained_sources, split_validation

if TYPE_CHECKING:
    import torch

    from graph_engine.batch import NeighborhoodLayout
    from graph_engine.feature_table import FeatureTable
    from graph_engine.featurizer import Featurizer
    from graph_engine.neighbor_sampler import NeighborhoodCache
    from ml.loader import BatchLoader
    from ml.warm_start import WarmStart


@dataclass
class PreparedRun:
    """One run's prepared inputs (module docstring). ``ckpt_dir``/``resume`` start as the trajectory's name
    (``checkpoint_root/<fingerprint>``, nothing to resume); ``train_and_register`` replaces them with the
    folder it claims (``ml.checkpoint_dirs``)."""

    snapshot: GraphSnapshot
    cache: NeighborhoodCache
    layout: NeighborhoodLayout
    features: FeatureTable | Featurizer
    builder: BatchBuilder
    data: TrainingData
    universe: dict
    device: torch.device
    preset_name: str
    model_config: ModelConfig
    train_config: TrainConfig
    loader: BatchLoader
    fingerprint: str
    ckpt_dir: Path
    resume: Path | None
    validation: TrainingData | None = None  # its eval_* tables are the validation split
    warm: WarmStart | None = None
    warm_note: str = ""

    @property
    def validation_split(self) -> str:
        """Which validation split the run carved: "time", "hash" or "none" (``ml.validation``)."""
        return (self.validation.manifest if self.validation else {}).get("validation_split", "none")


def fingerprint(parts: dict) -> str:
    """A short stable hash of ``parts`` (JSON, keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _configs(config: TrainingRunConfig, device, image_dim: int, layout) -> tuple[str, ModelConfig, TrainConfig]:
    preset_name = config.preset if config.preset != "auto" else ("paper" if device.type == "cuda" else "small")
    model_config, train_config = make_preset(preset_name, image_dim=image_dim)
    if config.width is not None:
        model_config = with_width(model_config, config.width)
    model_config = model_config.replace(
        tasks=tuple(config.tasks),
        embedder=dataclasses.replace(
            model_config.embedder,
            aggregator=config.aggregator,
            id_buckets=model_config.embedder.id_buckets if config.id_buckets is None else config.id_buckets,
            id_dropout=config.id_dropout,
        ),
        loss=dataclasses.replace(
            model_config.loss,
            scale=model_config.loss.scale if config.softmax_scale is None else config.softmax_scale,
            learn_scale=config.learn_scale,
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


def make_loader(data, builder, config: TrainingRunConfig, tasks, max_len: int, device) -> BatchLoader:
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


def prepare(inputs: TrainingInputs, config: TrainingRunConfig) -> PreparedRun:
    """Open the run's inputs and resolve its configs, loader and checkpoint fingerprint (module docstring)."""
    from graph_engine.feature_table import open_features
    from graph_engine.neighbor_sampler import NeighborhoodCache
    from ml.train import resolve_device

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
        load_training_examples(inputs.examples_dir),
        config.validation_fraction,
        seed=config.eval_seed,
        split=config.validation_split,
    )
    validation = keep_trained_sources(validation, config.source_weights)
    device = resolve_device(config.device)
    preset_name, model_config, train_config = _configs(config, device, features.image_dim, cache.layout)
    loader = make_loader(data, builder, config, config.tasks, model_config.sequence.max_len, device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # A checkpoint belongs to exactly one training trajectory: the published version of the inputs, every
    # setting that changes the batches or the optimisation, and the world size (ranks shard the steps).
    run_fingerprint = fingerprint(
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
            **({"validation": [config.validation_fraction, config.eval_seed]} if config.validation_fraction else {}),
            **({"validation_split": "time"} if validation.manifest.get("validation_split") == "time" else {}),
        }
    )
    # the trajectory's name: train_and_register claims a folder of its own named after it (ml.checkpoint_dirs)
    return PreparedRun(
        snapshot=snapshot,
        cache=cache,
        layout=cache.layout,
        features=features,
        builder=builder,
        data=data,
        universe=data.universe(),
        device=device,
        preset_name=preset_name,
        model_config=model_config,
        train_config=train_config,
        loader=loader,
        fingerprint=run_fingerprint,
        ckpt_dir=inputs.checkpoint_root / run_fingerprint,
        resume=None,
        validation=validation,
    )


def with_warm_start(
    prep: PreparedRun, config: TrainingRunConfig, target: MlflowTarget, log: Callable[[str], None] | None
) -> PreparedRun:
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
        prep.fingerprint = fingerprint({"run": prep.fingerprint, "warm_start": warm.version})
        prep.ckpt_dir = prep.ckpt_dir.parent / prep.fingerprint
    return prep
