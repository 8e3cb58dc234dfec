"""``omnisage tune`` against a pipeline home (Dagster-free): the study of ``ml.tuning`` on one published
``training_examples`` partition, under reader leases on its examples, graph and feature store (the study
reads the versions they hold: ``leased_training_inputs``), each trial in a scratch checkpoint folder removed
afterwards; the best settings go to a JSON file of ``omnisage_model`` config fields (``omnisage train
--config FILE``, or the asset's run config), its study summary beside it."""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from ml.run_config import TrainingRunConfig
from ml.tracking import MlflowTarget
from ml.tuning import StudyResult, TuneConfig, run_study
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.training.runner import leased_training_inputs, resolve_training_partition


def summary_path(config_path: Path) -> Path:
    """Where the study's summary goes beside the best config: ``best.json`` -> ``best.study.json``."""
    return config_path.with_name(config_path.stem + ".study.json")


def tune_partition(
    settings: Settings,
    target: MlflowTarget | None,
    base: TrainingRunConfig,
    tune: TuneConfig,
    out: Path,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Run the study on ``base.training_partition`` (default the newest published) and write ``out``."""
    partition = resolve_training_partition(settings, base.training_partition)
    scratch = settings.scratch_dir / f"tuning-{uuid.uuid4().hex[:12]}"
    try:
        with leased_training_inputs(settings, partition) as leased:
            inputs = dataclasses.replace(leased, checkpoint_root=scratch)
            result = run_study(inputs, base.replace(training_partition=partition), tune, log, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # The file is a config for another day too: it names no partition.
    result.write(out, summary_path(out))
    return result
