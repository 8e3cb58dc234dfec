"""The ablation runner: the paper's offline ablations (4.2.3-4.2.5, appendix A.2) re-run on our data.

    omnisage ablate --studies graph_sources,pruning_alpha --scale tiny --steps 80

A **study** is one of the paper's ablation tables; its **variants** are the table's rows. Every variant is
trained with ``assets.training.train_from_asset_config(register=False)`` into ONE MLflow experiment (default
``omnisage-ablations``) of the production tracking store (``MLFLOW_TRACKING_URI``), as a child of one parent
run that carries the resulting tables (``ablations.md``, ``ablations.json``) as artifacts. The registry is
never touched: no registered version, no alias.

Where things go (never the production ``warehouse/``, ``graph/``, ``features/``, ``embeddings/``,
``reports/``)::

    <root>/                          default $OMNISAGE_HOME/ablations/<UTC timestamp>/
      input/                         synthetic input (omnisage_pipeline.tools.synthetic.generate), unless --data-root
      _base/                         scratch OMNISAGE_HOME of the default data: every daily data asset
      <study>/<variant>/             scratch OMNISAGE_HOME of one trained variant:
                                       data variants: their own pruned_edges / graph / features /
                                       training_examples (engagement_logs, entity_metadata, daily_edges are
                                       read from _base through symlinks: they do not depend on the variant)
                                       model-only variants: warehouse/graph/features symlinked to _base
                                       (read-only), their own checkpoints/ and scratch/
      ablations.md, ablations.json   the tables (also printed and logged to the parent run)

Data variants change run config of the daily data assets (``assets.graph.PruningConfig.alpha``;
``assets.snapshot.GraphSnapshotConfig`` ``budget`` / ``subsets`` / ``blocks``) and are materialized in
process with ``dagster.materialize`` (ephemeral instance) and ``definitions.build_resources`` of the
variant's scratch settings. Model-only variants (tasks, aggregator, random negatives) change
``OmniSageModelConfig`` only and train on the default data.

``--blocks`` replaces the neighbourhood layout of the run's default data (every variant builds on it; the
asset default 25/75/50 is sized for billions of nodes and learns slowly on a tiny graph).

Variants with the same data and the same model config (every study's reference row: the default
configuration) are trained ONCE; the run is tagged ``ablation.member.<study> = <variant>`` for every row it
stands for, and the table says so.

Held-out sets: the hash-based holdout (graph_engine.holdout) picks the same engagement pairs and users
whatever the graph, so every variant of a study is evaluated on the same engagement pairs, users and
negative pool. Graph-neighbourhood pairs (part of "EE") are drawn from the variant's own graph, so for the
graph studies the comparable entity-entity number is "EE eng." (engagement pairs only) - the paper does the
same (4.2.3: graph-dependent evaluations are excluded from the graph-construction ablations). The table
shows n of every number and flags a study whose compared n differ.

Layering: the ablation modules sit above the assets and the definitions (``omnisage_pipeline.tools``;
nothing below imports them): ``ablation_studies`` (the catalogue, from the asset configs' defaults: the
reference rows), ``ablation_data`` (scratch homes; materialization through ``omnisage_pipeline.definitions``,
the only use of Dagster), ``ablation_report`` (rows, directions, tables) and this runner, which trains
through the asset's ``train_from_asset_config``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from assets.training import OmniSageModelConfig, train_from_asset_config
from graph_engine.batch import parse_blocks
from omnisage_pipeline.resources import MlflowResource
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.tools.ablation_data import (
    build_base_data,
    build_variant_data,
    check_root,
    graph_entries,
    link_base_data,
    merge_overrides,
    scratch_settings,
    universe_sizes,
)
from omnisage_pipeline.tools.ablation_report import (
    Row,
    directions,
    fmt_recall,
    metric_label,
    recall_by_metric,
    report_markdown,
    study_sections,
)
from omnisage_pipeline.tools.ablation_studies import (
    AblationError,
    Study,
    Variant,
    build_studies,
    default_blocks,
    parse_selection,
)

#: The runner's API (with the CLI's error); the catalogue, data and tables live in the ablation_* modules.
__all__ = ["EXPERIMENT", "AblationConfig", "AblationError", "AblationResult", "run_ablations"]

EXPERIMENT = "omnisage-ablations"


@dataclass
class AblationResult:
    """What ``run_ablations`` returns: the tables, where they were written, the summary and every row."""

    root: Path
    markdown_path: Path
    json_path: Path
    markdown: str
    summary: dict[str, Any]
    rows: list[Row]
    parent_run_id: str


@dataclass(frozen=True)
class AblationConfig:
    """What one ablation run does (the ``omnisage ablate`` flags; the module docstring explains each)."""

    studies: list[str] | None = None  # study ids in catalogue order; None = every study
    variants: list[str] | None = None  # "study:variant" rows to keep (the reference row is always kept)
    scale: str = "tiny"  # synthetic scale when no data_root is given
    days: int = 3
    steps: int = 300
    seed: int = 0
    batch_size: int = 64
    negatives: int = 64  # random negatives outside the negatives study
    preset: str = "auto"
    device: str = "auto"
    data_root: Path | None = None  # contract input; None = generate synthetic input under the root
    root: Path | None = None  # None = $OMNISAGE_HOME/ablations/<UTC timestamp>
    experiment: str = EXPERIMENT
    engine: str | None = None  # None = the production engine
    torch_threads: int | None = None
    blocks: list[str] | None = None  # the run's neighbourhood layout ('subset:node_type:k' per block)

    def model_config(self, day: str) -> dict[str, Any]:
        """The OmniSageModelConfig of a variant before its own overrides."""
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "num_random_negatives": self.negatives,
            "seed": self.seed,
            "preset": self.preset,
            "device": self.device,
            "pinsage_baseline": False,
            "training_partition": day,
        }

    def base_overrides(self) -> dict[str, dict]:
        """Run config of the default data: the --blocks layout, when given."""
        if not self.blocks:
            return {}
        try:
            parse_blocks(list(self.blocks))
        except ValueError as exc:
            raise AblationError(f"--blocks: {exc}") from exc
        return {"graph_snapshot": {"blocks": list(self.blocks)}}


@dataclass
class _Run:
    """The state every variant of one ablation run shares."""

    config: AblationConfig
    production: Settings
    stamp: str
    data_root: Path
    day: str
    base: Settings  # scratch settings of the default data (_base)
    base_overrides: dict[str, dict]
    mlflow: MlflowResource
    client: Any  # the MLflow client of the parent run
    parent_id: str
    echo: Callable[[str], None]


def _train_variant(row: Row, study: Study, v: Variant, home: Path, cfg: dict, model_over: dict, run: _Run) -> None:
    """Materialize the variant's data (or link the default data) in its own scratch home and train it."""
    echo = run.echo
    home.mkdir(parents=True, exist_ok=False)
    row.home = str(home)
    vs = scratch_settings(run.production, home, run.data_root, run.config.engine)
    t0 = time.perf_counter()
    if v.data:
        echo(f"[{study.id}/{v.id}] materializing its data ({json.dumps(v.data)}) in {home}")
        build_variant_data(run.base, vs, run.day, merge_overrides(run.base_overrides, v.data))
        row.data_seconds = time.perf_counter() - t0
    else:
        link_base_data(run.base, home)
    what = json.dumps(model_over) if model_over else "default model"
    echo(f"[{study.id}/{v.id}] training {cfg['steps']} steps ({what})")
    tags = {
        "ablation.study": study.id,
        "ablation.variant": v.id,
        "ablation.stamp": run.stamp,
        f"ablation.member.{study.id}": v.id,
        "mlflow.parentRunId": run.parent_id,
        "ablation.home": str(home),
    }
    outcome = train_from_asset_config(
        vs,
        run.mlflow,
        OmniSageModelConfig(**cfg),
        log=lambda m: None,
        register=False,
        experiment_name=run.config.experiment,
        run_tags=tags,
    )
    run.mlflow.client().set_tag(outcome.run_id, "mlflow.runName", f"{study.id}/{v.id}")
    row.run_id = outcome.run_id
    row.graph_entries = graph_entries(vs, run.day)
    row.recall = recall_by_metric(outcome)
    row.train_seconds = float(outcome.train_seconds)
    numbers = (f"{metric_label(m)} {fmt_recall(r['recall'])} (n={r['n']})" for m, r in row.recall.items())
    echo(f"[{study.id}/{v.id}] " + ", ".join(numbers))


def _input_days(config: AblationConfig, production: Settings, root: Path, echo) -> tuple[Path, list[str]]:
    """The run's contract input (generated under the root unless --data-root) and its last ``days`` days."""
    if config.data_root is None:
        from omnisage_pipeline.tools.synthetic import generate

        data_root = root / "input"
        echo(
            f"generating {config.days} days of '{config.scale}' synthetic data from {production.start_date} "
            f"into {data_root}"
        )
        summary = generate(
            data_root,
            start_date=production.start_date,
            days=config.days,
            scale=config.scale,
            seed=config.seed,
        )
        return data_root, list(summary["days"])
    data_root = Path(config.data_root).absolute()
    found = sorted(p.name[3:] for p in (data_root / "engagement_logs").glob("dt=*") if p.is_dir())
    day_keys = [d for d in found if d >= production.start_date][-config.days :]
    if not day_keys:
        raise AblationError(
            f"{data_root}/engagement_logs holds no dt=YYYY-MM-DD folder on or after "
            f"OMNISAGE_START_DATE={production.start_date}"
        )
    return data_root, day_keys


def _open_parent_run(mlflow_res: MlflowResource, client, config: AblationConfig, stamp: str, params: dict):
    """(experiment id, parent run id): the parent run that carries the tables, with the run's parameters."""
    experiment_id = mlflow_res.experiment_id(config.experiment)
    tags = {"ablation.role": "parent", "ablation.stamp": stamp}
    parent = client.create_run(experiment_id, run_name=f"ablations {stamp}", tags=tags)
    for k, v in params.items():
        client.log_param(parent.info.run_id, k, str(v))
    return experiment_id, parent.info.run_id


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` for the block (unchanged when None), restored after."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _variant_row(study: Study, v: Variant, run: _Run, negative_cap: int) -> tuple[Row, dict, dict]:
    """The row of a variant (notes, paper value), its model config and its own model overrides (random
    negatives capped at the universe)."""
    model_over = dict(v.model)
    notes = [v.note] if v.note else []
    asked = model_over.get("num_random_negatives", 0)
    if asked > negative_cap:
        notes.append(f"{asked:,} random negatives capped at the universe size {negative_cap}")
        model_over["num_random_negatives"] = negative_cap
    cfg = run.config.model_config(run.day)
    cfg.update(model_over)
    config = {"data": v.data, "model": cfg}
    paper = v.paper.describe() if v.paper else ""
    row = Row(study.id, v.id, v.label, json.dumps(config, sort_keys=True), config=config, paper=paper, notes=notes)
    return row, cfg, model_over


def _reuse(row: Row, first: Row) -> None:
    """``row`` stands for the same configuration as ``first``: it shares its run and numbers."""
    row.run_id, row.home, row.recall = first.run_id, first.home, first.recall
    row.train_seconds, row.data_seconds = first.train_seconds, first.data_seconds
    row.graph_entries = first.graph_entries
    row.shared_with, row.error = f"{first.study}/{first.variant}", first.error


def _run_studies(run: _Run, selection, root: Path, negative_cap: int) -> tuple[dict[str, Row], list]:
    """Train every selected variant once per distinct configuration; returns (runs by key, rows by study)."""
    runs: dict[str, Row] = {}  # run key -> the row that trained it
    rows_by_study: list[tuple[Study, list[Row]]] = []
    for study, chosen in selection:
        rows = []
        for v in chosen:
            row, cfg, model_over = _variant_row(study, v, run, negative_cap)
            rows.append(row)
            if row.run_key in runs:
                _reuse(row, runs[row.run_key])
                run.client.set_tag(row.run_id, f"ablation.member.{study.id}", v.id)
                run.echo(f"[{study.id}/{v.id}] same configuration as {row.shared_with}: reusing run {row.run_id}")
                continue
            try:
                _train_variant(row, study, v, root / study.id / v.id, cfg, model_over, run)
            except Exception as exc:  # noqa: BLE001 (one broken variant must not lose the others' hours of training)
                row.error = f"{type(exc).__name__}: {exc}"
                run.echo(f"[{study.id}/{v.id}] FAILED: {row.error}")
            runs[row.run_key] = row
        directions(study, rows)
        rows_by_study.append((study, rows))
    return runs, rows_by_study


def _write_report(run: _Run, root: Path, summary: dict, rows_by_study) -> tuple[str, Path, Path]:
    """ablations.md / ablations.json in the root and as artifacts of the parent run, which is then closed."""
    sections, studies_json = study_sections(rows_by_study)
    markdown = report_markdown(summary, sections)
    md_path, json_path = root / "ablations.md", root / "ablations.json"
    md_path.write_text(markdown)
    json_path.write_text(json.dumps({"summary": summary, "studies": studies_json}, indent=2, default=str))
    client = run.client
    client.log_artifact(run.parent_id, str(md_path))
    client.log_artifact(run.parent_id, str(json_path))
    client.log_metric(run.parent_id, "wall_seconds", summary["wall_seconds"])
    client.set_terminated(run.parent_id, status="FINISHED")
    return markdown, md_path, json_path


def _summary(
    run: _Run,
    root: Path,
    day_keys: list[str],
    experiment_id: str,
    rows_by_study,
    *,
    universe: dict[str, int],
    negative_cap: int,
    unique_runs: int,
    base_seconds: float,
    t_start: float,
) -> dict[str, Any]:
    """The run's summary (the head of the tables and of ablations.json): what ran, on what, how long."""
    c = run.config
    rows = [r for _, study_rows in rows_by_study for r in study_rows]
    return {
        "stamp": run.stamp,
        "root": str(root),
        "data_root": str(run.data_root),
        "scale": c.scale,
        "days": day_keys,
        "training_partition": run.day,
        "steps": c.steps,
        "batch_size": c.batch_size,
        "negatives": c.negatives,
        "seed": c.seed,
        "preset": c.preset,
        "device": c.device,
        "engine": run.base.engine,
        "universe": universe,
        "negative_cap": negative_cap,
        "experiment": c.experiment,
        "experiment_id": experiment_id,
        "blocks": list(c.blocks) if c.blocks else None,
        "base_overrides": run.base_overrides,
        "layout": list(c.blocks) if c.blocks else default_blocks(),
        "parent_run_id": run.parent_id,
        "tracking_uri": run.production.mlflow_tracking_uri,
        "unique_runs": unique_runs,
        "rows": len(rows),
        "failed": [f"{r.study}/{r.variant}: {r.error}" for r in rows if r.error],
        "base_data_seconds": base_seconds,
        "wall_seconds": time.perf_counter() - t_start,
    }


def run_ablations(
    config: AblationConfig | None = None,
    *,
    settings: Settings | None = None,
    echo: Callable[[str], None] = print,
) -> AblationResult:
    """Run the selected studies (module docstring) and return the tables."""
    config = config or AblationConfig()
    t_start = time.perf_counter()
    production = settings or Settings.from_env()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    root = check_root(production, config.root or production.home / "ablations" / stamp)
    root.mkdir(parents=True, exist_ok=True)
    base_overrides = config.base_overrides()
    selection = parse_selection(config.studies, config.variants, build_studies(blocks=config.blocks))
    data_root, day_keys = _input_days(config, production, root, echo)
    day = day_keys[-1]

    base = scratch_settings(production, root / "_base", data_root, config.engine)
    t0 = time.perf_counter()
    echo(f"materializing the default data for {day_keys[0]} .. {day} in {base.home}")
    build_base_data(base, day_keys, base_overrides)
    base_seconds = time.perf_counter() - t0
    universe = universe_sizes(base, day)
    negative_cap = max(universe.values()) if universe else 0

    artifact_root = str(production.home / "mlflow-artifacts")
    mlflow_res = MlflowResource(tracking_uri=production.mlflow_tracking_uri, artifact_root=artifact_root)
    params = {
        "scale": config.scale,
        "days": ",".join(day_keys),
        "steps": config.steps,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "negatives": config.negatives,
        "preset": config.preset,
        "device": config.device,
        "root": str(root),
        "studies": ",".join(s.id for s, _ in selection),
    }
    client = mlflow_res.client()
    experiment_id, parent_id = _open_parent_run(mlflow_res, client, config, stamp, params)
    run = _Run(config, production, stamp, data_root, day, base, base_overrides, mlflow_res, client, parent_id, echo)
    try:
        with _torch_threads(config.torch_threads):
            runs, rows_by_study = _run_studies(run, selection, root, negative_cap)
            summary = _summary(
                run,
                root,
                day_keys,
                experiment_id,
                rows_by_study,
                universe=universe,
                negative_cap=negative_cap,
                unique_runs=len(runs),
                base_seconds=base_seconds,
                t_start=t_start,
            )
            markdown, md_path, json_path = _write_report(run, root, summary, rows_by_study)
    except BaseException:
        with contextlib.suppress(Exception):  # the run's own failure is what must surface
            client.set_terminated(parent_id, status="FAILED")
        raise
    rows = [r for _, study_rows in rows_by_study for r in study_rows]
    return AblationResult(root, md_path, json_path, markdown, summary, rows, parent_id)
