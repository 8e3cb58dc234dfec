"""One daily partition end to end on generated data: wall time and peak memory per asset, how each asset's
cost grows with the data, and inference on its own, at several scales.

    python benchmarks/pipeline.py                                   # scales tiny,small; 3 days; 50 steps
    python benchmarks/pipeline.py --scales small,medium,large --days 3 --steps 50 --engine both

For each scale and engine, a child process (the partitions and the graph window are read from the
environment when the definitions load) gets a private OMNISAGE_HOME, generates ``--days`` days of synthetic
input (omnisage_pipeline.tools.synthetic; ``large`` = 1M events a day, 200K pins + 100K boards), then materializes
the assets one at a time with ``dagster.materialize``, in dependency order: engagement_logs and daily_edges
of every day (the graph window), then for the last day D entity_metadata, pruned_edges, graph_snapshot,
feature_store, training_examples, omnisage_model (``--steps`` optimizer steps; the preset is the CPU/GPU
default) and entity_embeddings.

Figures per asset: wall time of its materialization (Dagster run overhead included; engagement_logs and
daily_edges summed over the days) and peak RSS of the child's process tree while it ran (the child plus its
children, e.g. Spark's JVM and data-loader workers; psutil sampling every 50 ms; without psutil, the
child's lifetime peak so far from getrusage). Growth ratio between consecutive scales: (time ratio) /
(event ratio) per asset, so 1.0 is linear in the events and > 1 grows faster. Inference (entity_embeddings)
is also reported on its own: the asset's wall time and the model's embedding seconds and rates.

``--engine duckdb`` (default) or ``spark`` runs the pipeline on that edge engine (Spark ``local[2]``);
``both`` runs the DuckDB pipeline and, per scale, a second child with Spark ``local[2]`` for the engine's
assets only (engagement_logs, daily_edges, pruned_edges: the rest does not depend on the engine); its times
are reported, not held to a goal, and its pruned edges are compared with DuckDB's (``engines_agree``). The
last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, timedelta
from pathlib import Path

START_DATE = "2026-01-01"


class PeakRss:
    """Peak RSS (MB) of this process and its children between ``start`` and ``stop``."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None

    def _tree_rss(self) -> int:
        import psutil

        total = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a child that exited since the listing
                total += p.memory_info().rss
        return total

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._tree_rss())

    def start(self) -> None:
        self._stop.clear()
        if self._proc is not None:
            self._peak = self._tree_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def stop(self) -> float:
        if self._proc is None:  # lifetime peaks (KB on Linux), self and waited-for children
            kb = max(resource.getrusage(k).ru_maxrss for k in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
            return round(kb / 1024, 1)
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._tree_rss())
        return round(self._peak / 2**20, 1)


def _pruned_edges_digest(home: Path, day: str) -> str:
    """sha256 of the day's pruned edges as sorted rows (file layout and row order do not matter)."""
    import duckdb

    rows = duckdb.sql(
        f"SELECT src_type, src_id, dst_type, dst_id, edge_type, weight "
        f"FROM read_parquet('{home}/warehouse/pruned_edges/dt={day}/*.parquet') ORDER BY ALL"
    ).fetchall()
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def _environment(work: Path, days: int, engine: str) -> None:
    # Environment first: the partitions and settings are read when the asset modules are imported.
    os.environ.update(
        {
            "OMNISAGE_HOME": str(work / "home"),
            "OMNISAGE_DATA_ROOT": str(work / "input"),
            "OMNISAGE_START_DATE": START_DATE,
            "OMNISAGE_WINDOW_DAYS": str(days),
            "OMNISAGE_ENGINE": engine,
            "OMNISAGE_SPARK_MASTER": "local[2]",
            "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'home' / 'mlflow.db'}",
        }
    )


def _one_scale(scale: str, days: int, steps: int, work: Path, engine: str, engine_only: bool) -> dict:
    _environment(work, days, engine)
    import dagster as dg

    from assets import features, graph, inference, ingest, snapshot, training
    from omnisage_pipeline.definitions import build_resources
    from omnisage_pipeline.settings import Settings
    from omnisage_pipeline.tools.synthetic import generate

    t0 = time.perf_counter()
    generate(work / "input", START_DATE, days, scale=scale, seed=0)
    generate_s = time.perf_counter() - t0
    resources = build_resources(Settings.from_env())
    all_assets = [
        ingest.engagement_logs,
        ingest.entity_metadata,
        graph.daily_edges,
        graph.pruned_edges,
        snapshot.graph_snapshot,
        features.feature_store,
        training.training_examples,
        training.omnisage_model,
        inference.entity_embeddings,
    ]
    keys = [(date.fromisoformat(START_DATE) + timedelta(days=i)).isoformat() for i in range(days)]
    day = keys[-1]
    wall: dict[str, float] = {}
    rss: dict[str, float] = {}
    meta: dict[str, dict] = {}
    events = 0
    sampler = PeakRss()

    def run(asset, partition: str | None, run_config: dict | None = None) -> None:
        name = asset.key.to_user_string()
        sampler.start()
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
        rss[name] = max(rss.get(name, 0.0), sampler.stop())
        mats = result.asset_materializations_for_node(name)
        if mats:
            meta[name] = {k: getattr(v, "value", v) for k, v in mats[-1].metadata.items()}
        print(
            f"[{scale}/{engine}] {name} dt={partition}: {wall[name]:.1f}s (cumulative), peak RSS {rss[name]:.0f} MB",
            file=sys.stderr,
            flush=True,
        )

    total0 = time.perf_counter()
    for key in keys:
        run(ingest.engagement_logs, key)
        events += int(meta["engagement_logs"].get("rows_kept", 0))
        run(graph.daily_edges, key)
    run(graph.pruned_edges, day)
    if not engine_only:
        run(ingest.entity_metadata, day)
        run(snapshot.graph_snapshot, day)
        run(features.feature_store, day)
        run(training.training_examples, day)
        run(training.omnisage_model, None, {"ops": {"omnisage_model": {"config": {"steps": steps}}}})
        run(inference.entity_embeddings, day)
    total_s = time.perf_counter() - total0

    emb = meta.get("entity_embeddings", {})
    return {
        "scale": scale,
        "engine": engine,
        "engine_assets_only": engine_only,
        "days": days,
        "events": events,
        "graph_nodes": meta.get("graph_snapshot", {}).get("num_nodes"),
        "train_steps": None if engine_only else steps,
        "generate_s": round(generate_s, 2),
        "asset_s": {k: round(v, 2) for k, v in wall.items()},
        "asset_peak_rss_mb": rss,
        "inference": None
        if engine_only
        else {
            "asset_s": round(wall.get("entity_embeddings", 0.0), 2),
            "entity_seconds": emb.get("entity_seconds"),
            "user_seconds": emb.get("user_seconds"),
            "entities": emb.get("entities"),
            "users": emb.get("users"),
            "embeddings_per_s": emb.get("entities_per_second"),
            "user_embeddings_per_s": emb.get("users_per_second"),
        },
        "graph_snapshot": {  # the asset's two parts: CSR build, then forward push from every node
            k: meta.get("graph_snapshot", {}).get(k)
            for k in ("num_entries", "build_seconds", "sampling_seconds", "nodes_per_second")
        },
        "pruned_edges_sha256": _pruned_edges_digest(work / "home", day),
        "total_s": round(total_s, 2),
    }


def growth(results: list[dict]) -> list[dict]:
    """Per asset, (time ratio) / (event ratio) between consecutive scales of one engine."""
    out = []
    for a, b in itertools.pairwise(results):
        if a["engine"] != b["engine"] or not a["events"] or not b["events"]:
            continue
        event_ratio = b["events"] / a["events"]
        out.append(
            {
                "engine": a["engine"],
                "from": a["scale"],
                "to": b["scale"],
                "event_ratio": round(event_ratio, 2),
                "asset_growth": {
                    k: round((b["asset_s"][k] / a["asset_s"][k]) / event_ratio, 2)
                    for k in b["asset_s"]
                    if a["asset_s"].get(k)
                },
            }
        )
    return out


def _child(scale: str, args, engine: str, engine_only: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"omnisage-bench-{scale}-{engine}-"))
    cmd = [
        sys.executable,
        __file__,
        "--one-scale",
        scale,
        "--work",
        str(work),
        "--days",
        str(args.days),
        "--steps",
        str(args.steps),
        "--engine",
        engine,
    ] + (["--engine-only"] if engine_only else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNISAGE_") and k != "DAGSTER_HOME"}
    try:
        proc = subprocess.run(
            cmd, check=False, env=env, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
        )
        if proc.returncode != 0:
            raise SystemExit(f"scale {scale} ({engine}): child failed with exit code {proc.returncode}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="tiny,small", help="comma-separated synthetic scales")
    ap.add_argument("--days", type=int, default=3, help="generated days (= the graph window)")
    ap.add_argument("--steps", type=int, default=50, help="omnisage_model optimizer steps")
    ap.add_argument(
        "--engine",
        choices=("duckdb", "spark", "both"),
        default="duckdb",
        help="edge engine; both = the DuckDB pipeline plus a Spark local[2] pass of the engine's assets",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    ap.add_argument("--one-scale", help=argparse.SUPPRESS)
    ap.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one_scale:  # child process: one scale, one JSON line
        result = _one_scale(args.one_scale, args.days, args.steps, Path(args.work), args.engine, args.engine_only)
        print(json.dumps(result))
        return

    results, spark_pass = [], []
    for scale in args.scales.split(","):
        main_engine = "duckdb" if args.engine == "both" else args.engine
        results.append(_child(scale, args, main_engine, engine_only=False))
        if args.engine == "both":
            spark_pass.append(_child(scale, args, "spark", engine_only=True))
    summary = {
        "benchmark": "pipeline",
        "machine": f"{platform.node()} {os.cpu_count()} cpu",
        "engine": args.engine,
        "scales": results,
        "growth": growth(results),
        "inference": {r["scale"]: r["inference"] for r in results},
    }
    if spark_pass:
        summary["spark_local2"] = {
            r["scale"]: {"asset_s": r["asset_s"], "asset_peak_rss_mb": r["asset_peak_rss_mb"]} for r in spark_pass
        }
        summary["spark_growth"] = growth(spark_pass)
        summary["engines_agree"] = {
            a["scale"]: a["pruned_edges_sha256"] == b["pruned_edges_sha256"] for a, b in zip(results, spark_pass)
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
