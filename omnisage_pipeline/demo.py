"""The README's demo: synthetic data -> every asset for a few days, on a persistent Dagster instance so the
runs show up in `dagster dev` afterwards."""

from __future__ import annotations

import os
import time
from datetime import date, timedelta

from omnisage_pipeline.settings import Settings


def demo_partitions(start_date: str, days: int) -> list[str]:
    first = date.fromisoformat(start_date)
    return [(first + timedelta(days=i)).isoformat() for i in range(days)]


def run_demo(days: int, scale: str, seed: int, echo=print) -> dict[str, float]:
    """Materialize the daily pipeline for ``days`` partitions (generating synthetic input when the default
    data root is empty). Returns wall seconds per stage."""
    settings = Settings.from_env()
    timings: dict[str, float] = {}
    os.environ.setdefault("DAGSTER_HOME", str(settings.dagster_home))
    settings.dagster_home.mkdir(parents=True, exist_ok=True)

    if settings.data_root_is_default and not settings.data_root.is_dir():
        from omnisage_pipeline.synthetic import generate

        t0 = time.perf_counter()
        echo(f"generating {days} days of synthetic '{scale}' data into {settings.data_root}")
        generate(settings.data_root, start_date=settings.start_date, days=days, scale=scale, seed=seed)
        timings["generate"] = time.perf_counter() - t0

    import dagster as dg

    from omnisage_pipeline.definitions import defs

    instance = dg.DagsterInstance.get()
    job = defs.resolve_job_def("daily_pipeline")
    for key in demo_partitions(settings.start_date, days):
        t0 = time.perf_counter()
        echo(f"materializing daily_pipeline for {key} (engine={settings.engine})")
        result = job.execute_in_process(partition_key=key, instance=instance)
        if not result.success:
            raise RuntimeError(f"daily_pipeline failed for partition {key}")
        timings[f"daily_pipeline[{key}]"] = time.perf_counter() - t0
    return timings


def where_to_look(settings: Settings) -> str:
    return "\n".join(
        [
            f"outputs under OMNISAGE_HOME={settings.home}:",
            f"  warehouse:   {settings.warehouse}",
            f"  graph:       {settings.graph_dir}",
            f"  features:    {settings.features_dir}",
            f"  embeddings:  {settings.embeddings_dir}",
            f"  reports:     {settings.reports_dir}",
            "open the Dagster UI (runs of this demo included):",
            f"  DAGSTER_HOME={settings.dagster_home} OMNISAGE_HOME={settings.home} dagster dev -h 127.0.0.1 -p 3000",
            "open the MLflow UI:",
            f"  mlflow ui --backend-store-uri {settings.mlflow_tracking_uri} --host 127.0.0.1 --port 5000",
        ]
    )
