"""Running ``ml.training_run`` against a pipeline home (Dagster-free): the ``omnisage_model`` asset and the
``omnisage train`` command both call ``run_training``, so they train exactly alike.

- the partition: ``training_partition`` (a YYYY-MM-DD daily partition key, ``check_training_partition``) or
  the newest published ``training_examples`` day;
- reader leases on that day's training examples, graph and feature store for the whole run, released when
  it ends (however it ends: a killed run's lease is stale and ignored). The run trains on exactly the
  versions the leases resolved (``leased_training_inputs``): a re-publish of the day meanwhile neither
  changes its inputs nor removes them. Held, not released after an up-front copy, because the
  run reads them until its end - the snapshot and neighbourhood cache memory-mapped, the feature store
  per batch unless it fits ``feature_memory_budget_mb``, every torchrun rank opening them itself, and the
  gate re-opening the feature store for a champion with another ``max_tokens`` - and a copy of the day's
  graph and RocksDB store would cost more disk than the lease keeps. Retention skips a leased day (and the
  day of any running ``omnisage_model`` run), so a long training only delays the removal of an expired day;
  the newest days are never expired anyway;
- ``nproc_per_node == 1`` trains in this process; ``> 1`` (or rendezvous options for several nodes) writes a
  request file and launches torchrun (``ml.launch``), every rank's lines going to ``log``; rank 0's outcome
  comes back through a JSON file.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import date
from pathlib import Path

from ml.launch import launch_training
from ml.layout import NEIGHBORHOODS_DIR
from ml.run_config import TrainingRunConfig
from ml.run_types import TrainingInputs, TrainingOutcome
from ml.tracking import MlflowTarget
from ml.training_run import train_and_register, write_request
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.leases import read_lease
from omnisage_pipeline.storage.publish import list_published, require_published

__all__ = [
    "NEIGHBORHOODS_DIR",
    "check_training_partition",
    "leased_training_inputs",
    "resolve_training_partition",
    "run_training",
]


def check_training_partition(value: str, start_date: str | None = None) -> str:
    """``value`` when it is a daily partition key (YYYY-MM-DD, on or after ``start_date``), else a ValueError
    naming the field: the key becomes a path (``dt=<key>``), so nothing else may pass."""
    try:
        is_day = date.fromisoformat(value).isoformat() == value  # the round trip refuses 20260105, ...
    except (TypeError, ValueError):
        is_day = False
    if not is_day:
        raise ValueError(f"config field 'training_partition' = {value!r}: expected a day YYYY-MM-DD")
    if start_date and value < start_date:
        raise ValueError(
            f"config field 'training_partition' = {value!r}: before the first daily partition {start_date}"
        )
    return value


def resolve_training_partition(settings: Settings, requested: str | None) -> str:
    """``requested`` (checked, and published) or the newest published ``training_examples`` partition."""
    dataset = settings.warehouse_dataset("training_examples")
    if requested:
        require_published(dataset, check_training_partition(requested, settings.start_date))
        return requested
    keys = list_published(dataset)
    if not keys:
        raise FileNotFoundError(
            f"no published training_examples partition under {dataset}: materialize training_examples first"
        )
    return keys[-1]


@contextmanager
def leased_training_inputs(settings: Settings, partition: str) -> Iterator[TrainingInputs]:
    """The inputs of one run on ``partition``, each under a reader lease for the ``with`` block: the paths are
    the versions the leases hold, so a re-publish of the day during the block changes nothing the run reads."""
    datasets = (settings.warehouse_dataset("training_examples"), settings.graph_dir, settings.features_dir)
    with ExitStack() as stack:
        examples, graph, features = (stack.enter_context(read_lease(d, partition)) for d in datasets)
        yield TrainingInputs(
            partition=partition,
            examples_dir=examples,
            graph_dir=graph,
            features_dir=features,
            checkpoint_root=settings.home / "checkpoints" / "omnisage_model",
            scratch_dir=settings.scratch_dir,
        )


def run_training(
    settings: Settings,
    target: MlflowTarget,
    config: TrainingRunConfig,
    *,
    log: Callable[[str], None] = print,
    rdzv: Mapping[str, object] | None = None,
    **kwargs,
) -> TrainingOutcome | None:
    """Trains on the resolved partition (module docstring); ``kwargs`` go to ``ml.training_run.train_and_register``
    (in-process runs only: ``stop_after``, ``register``, ``experiment_name``, ``run_tags``, ``dagster_run_id``)."""
    partition = resolve_training_partition(settings, config.training_partition)
    config = config.replace(training_partition=partition)
    with leased_training_inputs(settings, partition) as inputs:
        if config.nproc_per_node <= 1 and not rdzv:
            return train_and_register(inputs, target, config, log=log, **kwargs)
        unsupported = sorted(set(kwargs) - {"dagster_run_id"})
        if unsupported:
            raise ValueError(f"run_training: {unsupported} are only supported in-process (nproc_per_node=1)")
        settings.scratch_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="omnisage-train-", dir=str(settings.scratch_dir)) as tmp:
            outcome_path = Path(tmp) / "outcome.json"
            request = write_request(
                Path(tmp) / "request.json", inputs, target, config, outcome_path, kwargs.get("dagster_run_id")
            )
            launch_training(request, config.nproc_per_node, rdzv=rdzv, log=log)
            if not outcome_path.is_file():  # a worker node of a multi-node run: rank 0 registers elsewhere
                return None
            return TrainingOutcome(**json.loads(outcome_path.read_text()))
