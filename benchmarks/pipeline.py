"""One daily partition end to end on generated data (issue 7 item 7): wall time per asset and in total, and
embeddings/s of inference, at several scales to show how cost grows.

    python benchmarks/pipeline.py                       # scales tiny,small; 3 days; 50 training steps
    python benchmarks/pipeline.py --scales small,medium --days 3 --steps 100

For each scale, a child process (the partitions and the graph window are read from the environment when the
definitions load) gets a private OMNISAGE_HOME, generates ``--days`` days of synthetic input
(omnisage_pipeline.synthetic), then materializes the assets one at a time with ``dagster.materialize``, in
dependency order: engagement_logs and daily_edges of every day (the graph window), then for the last day D
entity_metadata, pruned_edges, graph_snapshot, feature_store, training_examples, omnisage_model (``--steps``
optimizer steps; the preset is the CPU/GPU default) and entity_embeddings. Per-asset figures are the wall
time of that materialization (Dagster run overhead included; engagement_logs and daily_edges summed over
the days). DuckDB engine. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

START_DATE = "2026-01-01"


def _one_scale(scale: str, days: int, steps: int, work: Path) -> dict:
    # Environment first: the partitions and settings are read when the asset modules are imported.
    os.environ.update(
        {
            "OMNISAGE_HOME": str(work / "home"),
            "OMNISAGE_DATA_ROOT": str(work / "input"),
            "OMNISAGE_START_DATE": START_DATE,
            "OMNISAGE_WINDOW_DAYS": str(days),
            "OMNISAGE_ENGINE": "duckdb",
            "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'home' / 'mlflow.db'}",
        }
    )
    import dagster as dg

    from assets import features, graph, inference, ingest, snapshot, training
    from omnisage_pipeline.definitions import build_resources
    from omnisage_pipeline.settings import Settings
    from omnisage_pipeline.synthetic import generate

    t0 = time.perf_counter()
    generate(work / "input", START_DATE, days, scale=scale, seed=0)
    generate_s = time.perf_counter() - t0
    resources = build_resources(Settings.from_env())
    all_assets = [ingest.engagement_logs, ingest.entity_metadata, graph.daily_edges, graph.pruned_edges,
                  snapshot.graph_snapshot, features.feature_store, training.training_examples,
                  training.omnisage_model, inference.entity_embeddings]
    keys = [(date.fromisoformat(START_DATE) + timedelta(days=i)).isoformat() for i in range(days)]
    day = keys[-1]
    wall: dict[str, float] = {}
    meta: dict[str, dict] = {}
    events = 0

    def run(asset, partition: str | None, run_config: dict | None = None) -> None:
        name = asset.key.to_user_string()
        t = time.perf_counter()
        # The whole graph, one asset selected: inputs with partition mappings (pruned_edges' window) resolve.
        result = dg.materialize(
            all_assets,
            selection=[asset.key],
            partition_key=partition,
            resources=resources,
            run_config=run_config,
            raise_on_error=True,
        )
        wall[name] = wall.get(name, 0.0) + time.perf_counter() - t
        mats = result.asset_materializations_for_node(name)
        if mats:
            meta[name] = {k: getattr(v, "value", v) for k, v in mats[-1].metadata.items()}
        print(f"[{scale}] {name} dt={partition}: {wall[name]:.1f}s (cumulative)", file=sys.stderr, flush=True)

    total0 = time.perf_counter()
    for key in keys:
        run(ingest.engagement_logs, key)
        events += int(meta["engagement_logs"].get("rows_kept", 0))
        run(graph.daily_edges, key)
    run(ingest.entity_metadata, day)
    run(graph.pruned_edges, day)
    run(snapshot.graph_snapshot, day)
    run(features.feature_store, day)
    run(training.training_examples, day)
    run(training.omnisage_model, None, {"ops": {"omnisage_model": {"config": {"steps": steps}}}})
    run(inference.entity_embeddings, day)
    total_s = time.perf_counter() - total0

    emb = meta.get("entity_embeddings", {})
    return {
        "scale": scale,
        "days": days,
        "events": events,
        "graph_nodes": meta.get("graph_snapshot", {}).get("num_nodes"),
        "entities_embedded": emb.get("entities"),
        "users_embedded": emb.get("users"),
        "embeddings_per_s": emb.get("entities_per_second"),
        "user_embeddings_per_s": emb.get("users_per_second"),
        "train_steps": steps,
        "generate_s": round(generate_s, 2),
        "asset_s": {k: round(v, 2) for k, v in wall.items()},
        "total_s": round(total_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="tiny,small", help="comma-separated synthetic scales")
    ap.add_argument("--days", type=int, default=3, help="generated days (= the graph window)")
    ap.add_argument("--steps", type=int, default=50, help="omnisage_model optimizer steps")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    ap.add_argument("--one-scale", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one_scale:  # child process: one scale, one JSON line
        print(json.dumps(_one_scale(args.one_scale, args.days, args.steps, Path(args.work))))
        return

    results = []
    for scale in args.scales.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"omnisage-bench-{scale}-"))
        cmd = [sys.executable, __file__, "--one-scale", scale, "--work", str(work), "--days", str(args.days),
               "--steps", str(args.steps)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMNISAGE_") and k != "DAGSTER_HOME"}
        proc = subprocess.run(cmd, check=False, env=env, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
        if proc.returncode != 0:
            raise SystemExit(f"scale {scale}: child failed with exit code {proc.returncode}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "pipeline",
                "machine": f"{platform.node()} {os.cpu_count()} cpu",
                "scales": results,
            }
        )
    )


if __name__ == "__main__":
    main()
