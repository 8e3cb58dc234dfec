"""The README's demo: synthetic data -> every asset for a few days, on a persistent Dagster instance so the
runs show up in `dagster dev` afterwards."""

from __future__ import annotations

import os
import time
from datetime import date, timedelta
from pathlib import Path

from omnisage_pipeline.settings import Settings, prepare_dagster_home


def demo_partitions(start_date: str, days: int) -> list[str]:
    first = date.fromisoformat(start_date)
    return [(first + timedelta(days=i)).isoformat() for i in range(days)]


def run_demo(days: int, scale: str, seed: int, train_steps: int, echo=print) -> dict:
    """The whole chain on a persistent Dagster instance: synthetic input (when the default data root is
    empty) -> the daily data assets for ``days`` partitions -> omnisage_model -> entity_embeddings.
    Returns wall seconds per stage and the model's held-out recall@10 per task."""
    settings = Settings.from_env()
    timings: dict[str, float] = {}
    if not os.environ.get("DAGSTER_HOME"):
        # The project's instance: telemetry off (nothing written to ~/.dagster), one run at a time.
        os.environ["DAGSTER_HOME"] = str(prepare_dagster_home(settings.dagster_home))
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)

    if settings.data_root_is_default and not settings.data_root.is_dir():
        from omnisage_pipeline.tools.synthetic import generate

        t0 = time.perf_counter()
        echo(f"generating {days} days of synthetic '{scale}' data into {settings.data_root}")
        generate(settings.data_root, start_date=settings.start_date, days=days, scale=scale, seed=seed)
        timings["generate"] = time.perf_counter() - t0

    import dagster as dg

    from omnisage_pipeline.definitions import defs

    instance = dg.DagsterInstance.get()
    daily = defs.resolve_job_def("daily_pipeline")
    daily_keys = list(daily.asset_layer.executable_asset_keys)
    needs_model = [k for k in daily_keys if k.to_user_string() in MODEL_CONSUMERS]
    data_keys = [k for k in daily_keys if k not in needs_model]
    keys = demo_partitions(settings.start_date, days)

    def run(job, label: str, **kwargs):
        t0 = time.perf_counter()
        echo(f"materializing {label}")
        result = job.execute_in_process(instance=instance, **kwargs)
        if not result.success:
            raise RuntimeError(f"{label} failed")
        timings[label] = time.perf_counter() - t0
        return result

    for key in keys:
        run(
            daily,
            f"data assets [{key}] (engine={settings.engine})",
            partition_key=key,
            asset_selection=data_keys,
        )
    trained = run(
        defs.resolve_job_def("train_omnisage_model"),
        "omnisage_model",
        # A CPU-sized run: the small preset's full 500 steps at batch 128 take ~30 min on 2 cores.
        run_config={
            "ops": {"omnisage_model": {"config": {"steps": train_steps, "batch_size": 64, "num_random_negatives": 64}}}
        },
    )
    for key in keys:
        if needs_model:
            run(daily, f"embeddings [{key}]", partition_key=key, asset_selection=needs_model)
    materialization = trained.asset_materializations_for_node("omnisage_model")[-1]
    report_md = settings.reports_dir / f"dt={keys[-1]}" / "recall.md"
    return {
        "timings": timings,
        "model": {k: v.value for k, v in materialization.metadata.items()},
        "report": report_md.read_text() if report_md.is_file() else None,
    }


#: Daily assets that read the champion model (or its embeddings), so they run after omnisage_model in the demo.
MODEL_CONSUMERS = ("entity_embeddings", "recall_report", "ann_index")


def recall_table(model_metadata: dict) -> str:
    recalls = model_metadata.get("new_recall") or {}
    lines = ["| task | recall@10 | n |", "| --- | --- | --- |"]
    for task, r in recalls.items():
        value = "null" if r.get("recall") is None else f"{r['recall']:.4f}"
        lines.append(f"| {task} | {value} | {r.get('n', 0)} |")
    lines.append(
        f"model version {model_metadata.get('model_version')} ({model_metadata.get('alias')}), "
        f"trained on {model_metadata.get('training_partition')}, {model_metadata.get('steps')} steps"
    )
    return "\n".join(lines)


def where_to_look(settings: Settings) -> str:
    return "\n".join(
        [
            f"outputs under OMNISAGE_HOME={settings.home}:",
            f"  warehouse:   {settings.warehouse}",
            f"  graph:       {settings.graph_dir}",
            f"  features:    {settings.features_dir}",
            f"  embeddings:  {settings.embeddings_dir}",
            f"  reports:     {settings.reports_dir}",
            f"  indexes:     {settings.indexes_dir}   (omnisage neighbors --type pin --id ID; omnisage serve)",
            "open the Dagster UI (runs of this demo included):",
            f"  OMNISAGE_HOME={settings.home} make dev   # = omnisage dagster dev -h 127.0.0.1 -p 3000",
            "open the MLflow UI:",
            f"  mlflow ui --backend-store-uri {settings.mlflow_tracking_uri} --host 127.0.0.1 --port 5000",
        ]
    )
