"""The recall report of day D, Dagster-free: the champion's recall@10 on the day's held-out sets (paper
4.2.1) beside its baselines - random, popularity, item co-occurrence, windowed co-occurrence and EASE
(``ml.item_baselines``), ALS (implicit) - the last three fitted on the window's logs less the scored pairs
and users and tuned on ONE validation split carved from them - the PinSage-like model trained with it (Table
2) and, on generator input, the oracle - all scored by one evaluator's sets and rule (``ml.recall_report``).
The same systems are scored again on the time split (``ml.time_split``: pairs first engaged in the window's
last days; ``report["time_split"]``, entity-entity), what predicts the next engagement. Published as
``reports/dt=D/{recall.json, recall.md, recall.png}`` and logged to the champion's MLflow run. EASE inverts a
dense items x items matrix: above ``REPORT_EASE_MAX_ITEMS`` (pins and boards with an interaction) it is
skipped, its row null with the reason. ``config`` is the ``recall_report`` asset's config (k, pool_size,
seed, max_queries, baselines, als_grid)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from ml.layout import MARKDOWN_FILE, PLOT_FILE, REPORT_FILE
from omnisage_pipeline.embedding.champion import champion_builder, champion_version
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import (
    list_published,
    publish_partition,
    published_path,
    require_published,
)


def previous_report(settings: Settings, day: str) -> dict | None:
    """The newest published report before ``day`` (the regression check's reference)."""
    earlier = [d for d in list_published(settings.reports_dir) if d < day]
    return read_report(settings, earlier[-1]) if earlier else None


def read_report(settings: Settings, day: str) -> dict | None:
    path = published_path(settings.reports_dir, day)
    return json.loads((path / REPORT_FILE).read_text()) if path and (path / REPORT_FILE).is_file() else None


def build_day_report(settings: Settings, day: str, config, loaded, pinsage, log) -> dict:
    """Score the champion and the baselines on day D's held-out sets. Dagster-free."""
    from omnisage_pipeline.storage.retention import read_lease

    # Reader leases: retention never removes the graph or the feature store while they are scored.
    with (
        read_lease(settings.graph_dir, day) as graph_dir,
        read_lease(settings.features_dir, day) as features_dir,
    ):
        return _score_day(settings, day, config, loaded, pinsage, log, graph_dir, features_dir)


def _score_day(
    settings: Settings,
    day: str,
    config,
    loaded,
    pinsage,
    log,
    graph_dir: Path,
    features_dir: Path,
) -> dict:
    from ml.evaluator import Evaluator, model_embedders
    from ml.recall_report import Candidate, build_report
    from ml.training_examples_reader import load_training_examples

    examples_dir = require_published(settings.warehouse_dataset("training_examples"), day)
    data = champions_time_split(load_training_examples(examples_dir), loaded)
    universe = data.universe()
    limits = {"k": config.k, "pool_size": config.pool_size, "seed": config.seed, "max_queries": config.max_queries}
    evaluator = Evaluator(data, universe, **limits)
    model = Candidate(
        *model_embedders(loaded.model, champion_builder(loaded, graph_dir, features_dir, log)),
        tasks=tuple(loaded.config.tasks),
    )
    day_data = _ScoredDay(settings, day, config, data, universe, graph_dir, features_dir, log)
    baselines = {}
    for name in config.baselines:
        candidate = _baseline(name, day_data, pinsage)
        if candidate is not None:
            baselines[name] = candidate
    version = champion_version(loaded)
    extra = {"model_run_id": loaded.run_id, "training_partition": loaded.training_partition}
    report = build_report(day, version, evaluator, model, baselines, extra=extra)
    if data.future_pairs.num_rows:
        on_future = Evaluator(future_pairs_only(data), universe, **limits)
        report["time_split"] = time_split_section(build_report(day, version, on_future, model, baselines), data)
        split = loaded.extra.get("validation_split", "hash")
        report["time_split"]["champion_validation_split"] = split
        # the champion's validation pairs are these only when it was trained on this day's examples
        report["time_split"]["champion_held_out"] = split == "time" and loaded.training_partition == day
    return report


def champions_time_split(data, loaded):
    """``data`` whose ``future_pairs`` are the ones the champion's run would validate on for this day
    (``ml.validation.time_split_pairs`` with its ``validation_fraction`` and seed): the pairs scored."""
    import dataclasses

    from ml.validation import time_split_pairs

    fraction = float(loaded.extra.get("validation_fraction", 0.0))
    if fraction <= 0:
        return data
    seed = int(loaded.extra.get("eval", {}).get("seed", 0))
    return dataclasses.replace(data, future_pairs=time_split_pairs(data, fraction, seed))


def future_pairs_only(data):
    """``data`` with the time split's pairs (``ml.time_split``) as its only evaluation set."""
    import dataclasses

    empty = lambda t: t.slice(0, 0)
    return dataclasses.replace(
        data,
        eval_pairs=data.future_pairs,
        eval_sequences=empty(data.eval_sequences),
        eval_feature_nodes=empty(data.eval_feature_nodes),
    )


def time_split_section(scored: dict, data) -> dict:
    """The entity-entity rows of a report scored on the time split, and what the split is."""
    return {
        "cutoff": data.manifest.get("user_eval_cutoff"),
        "pairs": data.future_pairs.num_rows,
        "pool_sizes": scored["pool_sizes"],
        "entity_entity": {
            "model": scored["tasks"]["entity_entity"],
            **{name: tasks["entity_entity"] for name, tasks in scored["baselines"].items()},
        },
    }


@dataclass
class _ScoredDay:
    """What a baseline of day D is built from."""

    settings: Settings
    day: str
    config: Any
    data: Any  # ml.training_examples_reader.TrainingData
    universe: Any
    graph_dir: Path
    features_dir: Path
    log: Callable[[str], None]
    _split: Any = None

    def split(self):
        """The item baselines' ``ml.item_baselines.TrainingSplit`` of the window's logs (carved once, with
        ALS's ``AlsFitConfig``: the split ``als_candidate`` tunes on); None without logs."""
        if self._split is None:
            from ml.baselines import AlsFitConfig
            from ml.item_baselines import TrainingSplit

            logs = window_logs(self.settings, self.day)
            if logs is None:
                return None
            users = self.data.eval_sequences["user_id"].to_numpy()
            config = AlsFitConfig(k=self.config.k, seed=self.config.seed)
            self._split = TrainingSplit.carve(logs, scored_pairs(self.data), users, config)
        return self._split


def _baseline(name: str, d: _ScoredDay, pinsage):
    """One baseline as a ``Candidate`` (None: skipped, and logged why)."""
    from graph_engine.snapshot import GraphSnapshot
    from ml.baselines import CooccurrenceEmbedder, PopularityEmbedder, oracle_baseline, random_baseline
    from ml.evaluator import model_embedders
    from ml.recall_report import Candidate
    from ml.truth import load_truth

    if name == "random":
        return Candidate(*random_baseline(d.universe, seed=d.config.seed))
    if name in ("popularity", "cooccurrence"):
        embedder = (PopularityEmbedder if name == "popularity" else CooccurrenceEmbedder)(
            GraphSnapshot.open(d.graph_dir)
        )
        return Candidate(embedder, embedder)
    if name == "als":
        return als_candidate(d.settings, d.day, d.data, d.universe, d.config, d.log)
    if name in ("window_cooccurrence", "ease"):
        return item_candidate(name, d)
    if name == "pinsage":
        if pinsage is None:
            return Candidate(None, unavailable="the champion's run has no PinSage-like baseline")
        entity, _ = model_embedders(pinsage.model, champion_builder(pinsage, d.graph_dir, d.features_dir, d.log))
        return Candidate(entity, tasks=("entity_entity",))
    if name == "oracle":
        if (d.settings.data_root / "_truth" / "meta.json").is_file():
            return Candidate(*oracle_baseline(load_truth(d.settings.data_root), d.day))
        d.log("oracle skipped: the input has no _truth/ (not generator output)")
        return None
    raise ValueError(f"recall_report config field 'baselines': unknown baseline {name!r}")


def scored_pairs(data):
    """Every pair the report scores (the held-out pairs and the time split's): the baselines fitted on the
    window's logs never see their events."""
    import pyarrow as pa

    return pa.concat_tables([data.eval_pairs, data.future_pairs.cast(data.eval_pairs.schema)])


def window_logs(settings: Settings, day: str):
    """The validated engagement logs of day D's window as one table (None when there are none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from omnisage_pipeline.partitions import window_keys

    logs_ds = settings.warehouse_dataset("engagement_logs")
    tables = [
        pq.read_table(f)
        for key in window_keys(day)
        if (path := published_path(logs_ds, key)) is not None
        for f in sorted(path.glob("*.parquet"))
    ]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def item_candidate(name: str, d: _ScoredDay):
    """Window co-occurrence or EASE on the window's training logs (``_ScoredDay.split``), tuned on its
    validation split with the report's grids (window: all of ``DEFAULT_WINDOW_GRID``, one counting pass;
    EASE: ``REPORT_EASE_GRID``, skipped above ``REPORT_EASE_MAX_ITEMS`` items)."""
    from ml.item_baselines import (
        DEFAULT_WINDOW_GRID,
        REPORT_EASE_GRID,
        REPORT_EASE_MAX_ITEMS,
        ease_item_count,
        fit_ease_baseline,
        fit_window_baseline,
    )
    from ml.recall_report import Candidate

    split = d.split()
    if split is None:
        return Candidate(None, unavailable="no validated engagement logs in the window")
    k = d.config.k
    if name == "window_cooccurrence":
        scorer, tuning = fit_window_baseline(split, d.universe, DEFAULT_WINDOW_GRID, k)
    else:
        items = ease_item_count(split)
        if items > REPORT_EASE_MAX_ITEMS:
            reason = f"ease skipped: {items} items > {REPORT_EASE_MAX_ITEMS} (a dense items x items inverse)"
            d.log(reason)
            return Candidate(None, unavailable=reason)
        scorer, tuning = fit_ease_baseline(split, d.universe, REPORT_EASE_GRID, k)
    d.log(
        f"{name}: tuned on {tuning.validation_pairs} validation pairs: {tuning.param} = {tuning.best} "
        f"(recall@{k} {tuning.best_recall})"
    )
    return Candidate(scorer, scorer, tasks=("entity_entity", "user_entity"))


def als_candidate(settings: Settings, day: str, data, universe, config, log):
    """ALS on the validated logs of day D's window, the evaluation pairs' events and the evaluation users left
    out (they are embedded from their histories), tuned on a validation split of the rest (ml.baselines)."""
    from ml.baselines import DEFAULT_ALS_GRID, REPORT_ALS_GRID, AlsFitConfig, fit_als_baseline
    from ml.recall_report import Candidate

    logs = window_logs(settings, day)
    if logs is None:
        return Candidate(None, unavailable="no validated engagement logs in the window")
    grid = DEFAULT_ALS_GRID if config.als_grid == "full" else REPORT_ALS_GRID
    als, tuning = fit_als_baseline(
        logs,
        exclude_pairs=scored_pairs(data),
        exclude_users=data.eval_sequences["user_id"].to_numpy(),
        universe=universe,
        config=AlsFitConfig(grid=grid, k=config.k, seed=config.seed),
    )
    log(
        f"als: {als.index.matrix.shape[0]} users x {als.index.matrix.shape[1]} items, {als.index.matrix.nnz} "
        f"interactions; tuned on {tuning.validation_pairs} validation pairs: {tuning.best} "
        f"(recall@{config.k} {tuning.best_recall})"
    )
    return Candidate(als, als, tasks=("entity_entity", "user_entity"))


def publish_report(settings: Settings, day: str, report: dict, history_days: int) -> tuple[str, bytes]:
    """Write recall.json / recall.md / recall.png atomically; returns (markdown, png)."""
    from ml.recall_report import markdown, plot_png

    previous = previous_report(settings, day)
    earlier = [d for d in list_published(settings.reports_dir) if d < day][-max(history_days - 1, 0) :]
    history = [r for r in (read_report(settings, d) for d in earlier) if r] + [report]
    md = markdown(report, previous)
    png = plot_png(history)
    with publish_partition(settings.reports_dir, day) as staging:
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=1, sort_keys=False))
        (staging / MARKDOWN_FILE).write_text(md + "\n")
        (staging / PLOT_FILE).write_bytes(png)
    return md, png


def log_to_mlflow(
    client,
    experiment_id: str,
    model_name: str,
    report: dict,
    day: str,
    published: Path,
    inputs: dict,
    tags=None,
) -> str:
    """The day's report as an MLflow evaluation run of its own (experiment ``<experiment>-evaluation``; the
    champion's training run is left as it finished): the recalls as metrics (step = the day) linked to the
    champion's LoggedModel and to the evaluated dataset, the day's inputs as ``log_inputs`` datasets (the
    published versions read), the model as a model input, recall.json and the plot as artifacts.
    -> the run id."""
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, Metric

    model_id = champion_model_id(client, model_name, report.get("model_version"))
    run_tags = {"omnisage.kind": "evaluation", "partition": day, **(tags or {})}
    run_tags["model_version"] = str(report.get("model_version"))
    run_tags["model_run_id"] = str(report.get("model_run_id") or "")
    if model_id:
        run_tags["model_id"] = model_id
    run_id = client.create_run(experiment_id, run_name=f"recall_report dt={day}", tags=run_tags).info.run_id
    datasets = [_dataset(name, day, path) for name, path in inputs.items()]
    client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(d._to_mlflow_entity(), [InputTag("mlflow.data.context", "evaluation")]) for d in datasets
        ],
        models=[LoggedModelInput(model_id)] if model_id else None,
    )
    evaluated = next((d for d, name in zip(datasets, inputs) if name == "training_examples"), None)
    link = (
        {"model_id": model_id, "dataset_name": evaluated.name, "dataset_digest": evaluated.digest} if evaluated else {}
    )
    k, step, ts = (
        report.get("k", 10),
        (date.fromisoformat(day) - date(1970, 1, 1)).days,
        int(time.time() * 1000),
    )
    metrics = [Metric(name, value, ts, step, **link) for name, value in _report_metrics(report, k)]
    client.log_batch(run_id, metrics=metrics)
    client.log_artifact(run_id, str(published / REPORT_FILE), artifact_path=f"reports/dt={day}")
    client.log_artifact(run_id, str(published / PLOT_FILE), artifact_path=f"reports/dt={day}")
    client.set_terminated(run_id)
    return run_id


def report_inputs(settings, day: str) -> dict[str, Path]:
    """The published versions of the day's datasets a report reads (the evaluation run's inputs)."""
    from omnisage_pipeline.storage.publish import published_path

    datasets = {"training_examples": settings.warehouse_dataset("training_examples")}
    datasets.update(graph=settings.graph_dir, features=settings.features_dir, embeddings=settings.embeddings_dir)
    paths = {name: published_path(ds, day) for name, ds in datasets.items()}
    return {name: path.resolve() for name, path in paths.items() if path is not None}


def _report_metrics(report: dict, k: int) -> list[tuple[str, float]]:
    rows = [
        (system, task, entry)
        for system, tasks in [("model", report["tasks"]), *report.get("baselines", {}).items()]
        for task, entry in tasks.items()
    ]
    time_split = (report.get("time_split") or {}).get("entity_entity", {})
    rows += [(system, "time_split/entity_entity", entry) for system, entry in time_split.items()]
    out = []
    for system, task, entry in rows:
        value = entry.get(f"recall@{k}")
        if value is not None:
            prefix = "report" if system == "model" else f"report/{system}"
            out.append((f"{prefix}/recall_at_{k}/{task}", float(value)))
    return out


def _dataset(name: str, day: str, path: Path):
    """An MLflow dataset for a published version folder: its source the folder, its digest the version's name
    (a new publish is a new version)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    return MetaDataset(resolve_dataset_source(str(path)), name=f"{name} dt={day}", digest=Path(path).name[-16:])


def champion_model_id(client, name: str, version) -> str | None:
    """The LoggedModel id of registered version ``version`` of ``name`` (MLflow 3: the version's ``model_id``,
    or its ``models:/<model_id>`` source where the store does not return the field); None for an older one."""
    from mlflow.exceptions import MlflowException

    if not name or version in (None, ""):
        return None
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:  # an unregistered or removed version: the run is still logged, unlinked
        return None
    source = mv.source or ""
    return mv.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)


def baselines_markdown(report: dict, k: int) -> str:
    """recall@k of the model and every baseline per task, as a markdown table (null -> n/a)."""
    from ml.recall_report import recall_of

    systems = [("model", report["tasks"]), *report.get("baselines", {}).items()]
    tasks = sorted({t for _, per_task in systems for t in per_task})
    lines = [f"| system | {' | '.join(tasks)} |", "| --- |" + " ---: |" * len(tasks)]
    for name, per_task in systems:
        cells = [recall_of(per_task[t], k) if t in per_task else None for t in tasks]
        lines.append(f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines)
