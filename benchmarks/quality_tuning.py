"""The quality benchmark's validation protocol: the test protocol one period earlier, so that every setting
is chosen without the test pairs.

The test scores pairs of the period after the training logs. Validation does the same inside the training
logs: the last ``validation_days`` partitions become the validation period (``cutoff``); the pipeline runs
again on the days before it (``validation_input``: the same contract input, the later day folders left
out), and

- the model and the PinSage-like baseline are tuned by ``ml.tuning.run_study`` on that run's training
  partition, each trial scored by entity-entity recall@k on the validation pairs (``time_validation_scorer``:
  the directed engagement pairs of the validation period, ``ml.item_baselines.time_validation_pairs``);
- the counting and factorisation baselines are tuned on the same pairs, fitted on the events before the
  cutoff (``ml.item_baselines.TrainingSplit.by_time``).

A validation pair can have been engaged before the cutoff, as about half the test pairs were before theirs:
a hashed carve that removes a pair's every event would only ask for unseen pairs and punish memorising
systems (window w = 1 scored 0.0005 there and 0.105 on the test).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

#: Validation period, in partitions (MovieLens's 30 compressed days hold ~186 real days: 4 days are about the
#: test's 28 real days; the synthetic data has 7 days).
VALIDATION_DAYS = {"movielens-100k": 4, "synthetic": 1}
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
#: The benchmark's declared search space (``ml.tuning.SearchSpace``), narrower than the CLI's default so that a
#: study of a few trials on a 2-core CPU explores what matters: batch and random negatives fixed at sizes that
#: let the softmax see most of a small catalogue (1,682 movies), the rest searched.
BENCHMARK_SPACE = {
    "lr": (2e-3, 2e-2),
    "batch_size": [512],
    "num_random_negatives": [1024],
    "lambda_aux": (0.03, 0.3),
    "id_buckets": [0, 1 << 16],
    "width": [32, 64],
    "pair_sampling": ["uniform", "count"],
    "source_profile": ["all", "engagement", "pin_pin"],
}


def day_start_us(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1_000_000)


def validation_input(data_root: Path, days: list[str], n_val: int, work: Path) -> tuple[list[str], Path, int]:
    """The contract input of the days before the validation period (links into ``data_root``).
    -> (its days, its folder, the cutoff in microseconds: the first validation day's start)."""
    if not 0 < n_val < len(days):
        raise ValueError(f"validation period of {n_val} days in a range of {len(days)}")
    kept, root = days[:-n_val], work / "val_input"
    (root / "engagement_logs").mkdir(parents=True, exist_ok=True)
    for entry in data_root.iterdir():
        if entry.name != "engagement_logs" and not (root / entry.name).exists():
            os.symlink(entry, root / entry.name)
    for day in kept:
        src, dst = data_root / "engagement_logs" / f"dt={day}", root / "engagement_logs" / f"dt={day}"
        if src.exists() and not dst.exists():
            os.symlink(src, dst)
    return kept, root, day_start_us(days[-n_val])


def time_validation_scorer(split, k: int):
    """``ml.tuning.run_study``'s objective on the split's time validation pairs: (factory, pair count)."""
    import numpy as np

    from ml.evaluator import model_embedders
    from ml.pair_scoring import pair_hits

    v = split.validation
    cols = [np.asarray(v.column(c).to_numpy(zero_copy_only=False)) for c in ("query_type", "query_id")]
    cols += [np.asarray(v.column(c).to_numpy(zero_copy_only=False)) for c in ("pos_type", "pos_id")]

    def factory(prep, config):
        pools = {t: np.asarray(prep.universe[t], dtype=np.int64) for t in ("pin", "board") if t in prep.universe}

        def score(model) -> float | None:
            return pair_hits(model_embedders(model.eval(), prep.builder), *cols, pools, k).recall

        return score

    return factory, v.num_rows


def tune_models(home_val: Path, day: str, base, split, trials: int, steps: int, k: int, log) -> dict:
    """Optuna studies of the model and the PinSage-like baseline on the validation run, the same budget each.
    -> {"model": config fields, "pinsage": config fields, "studies": {system: summary}}."""
    from ml.training_run import TrainingInputs
    from ml.tuning import SearchSpace, TuneConfig, run_study

    inputs = TrainingInputs(
        day,
        home_val / f"warehouse/training_examples/dt={day}",
        home_val / f"graph/dt={day}",
        home_val / f"features/dt={day}",
        home_val / "checkpoints" / "tuning",
        home_val / "scratch",
    )
    scorer = time_validation_scorer(split, k)
    out: dict = {"studies": {}}
    for system in ("model", "pinsage"):
        tune = TuneConfig(
            system=system,
            trials=trials,
            steps=steps,
            checks=3,
            startup_trials=min(3, trials),
            space=SearchSpace(**BENCHMARK_SPACE),
        )
        log(f"tuning {system}: {trials} trials of {steps} steps on {scorer[1]} time-split validation pairs")
        result = run_study(inputs, base, tune, log, scorer=scorer)
        summary = dict(
            result.summary,
            validation="time split: the engagement pairs of the last validation days, model trained on the days before",
        )
        summary.pop("validation_sources", None)
        out[system], out["studies"][system] = result.best_config, summary
        log(f"{system}: best validation recall {result.best_value} with {result.best_config}")
    return out


def profile_path(dataset: str) -> Path:
    return PROFILE_DIR / f"{dataset}.json"


def read_profile(dataset: str) -> dict | None:
    path = profile_path(dataset)
    return json.loads(path.read_text()) if path.is_file() else None


def write_profile(dataset: str, profile: dict) -> Path:
    """The tuner's output, committed: the settings the test run uses, and each study's summary."""
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    path = profile_path(dataset)
    path.write_text(json.dumps(profile, indent=2, sort_keys=True) + "\n")
    return path
