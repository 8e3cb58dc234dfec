"""Benchmark: windowed degree pruning (paper appendix A.1, Algorithm 2) on Spark and DuckDB, same input.

A synthetic power-law edge set (default 10M undirected edges: 80% pin_board, 20% pin_pin; endpoint
popularity ~ rank^-s) is written as daily_edges partitions of a window (some edges repeat across days,
so the window sum does work), then both engines prune it through the EdgeEngine interface. Reported:
wall time of each, Spark with and without session start, their ratio, and whether the two outputs are
the same rows (EXCEPT ALL both ways) with the same Table 1 stats. Last line: one JSON object.

    python benchmarks/pruning.py --edges 10000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graph_engine.duckdb_engine import DuckDBEdgeEngine
from graph_engine.pruning import PruningParams
from graph_engine.spark_engine import SparkEdgeEngine


def power_law_ids(rng: np.random.Generator, n: int, size: int, s: float) -> np.ndarray:
    """Ranks in [0, n) with P(rank) ~ (rank + 1) ** -s (inverse CDF of the continuous law), mapped through
    a fixed random permutation so popular nodes are not the small ids."""
    u = rng.random(size)
    a = 1.0 - s
    x = (1.0 + u * (float(n) ** a - 1.0)) ** (1.0 / a)  # continuous on [1, n]
    return np.minimum(x.astype(np.int64) - 1, n - 1)


def unique_pairs(rng, target: int, draw) -> tuple[np.ndarray, np.ndarray]:
    """Draw (a, b) pairs until ``target`` distinct ones exist; ``draw(k)`` returns k candidate pairs."""
    keys = np.empty(0, dtype=np.int64)
    a_all, b_all = np.empty(0, np.int64), np.empty(0, np.int64)
    while len(keys) < target:
        a, b = draw(int((target - len(keys)) * 1.3) + 1000)
        a_all, b_all = np.concatenate([a_all, a]), np.concatenate([b_all, b])
        keys, first = np.unique(a_all * (1 << 31) + b_all, return_index=True)
        a_all, b_all = a_all[first], b_all[first]
    pick = rng.permutation(len(keys))[:target]
    return a_all[pick], b_all[pick]


def synthesize(n_edges: int, days: int, out_root: Path, seed: int = 0) -> tuple[list[Path], dict]:
    rng = np.random.default_rng(seed)
    n_pins, n_boards = max(n_edges // 3, 100), max(n_edges // 15, 50)
    pin_perm, board_perm = rng.permutation(n_pins), rng.permutation(n_boards)
    n_pb = int(n_edges * 0.8)
    n_pp = n_edges - n_pb

    def draw_pb(k):
        return (
            pin_perm[power_law_ids(rng, n_pins, k, 1.15)],
            board_perm[power_law_ids(rng, n_boards, k, 1.05)],
        )

    def draw_pp(k):
        a = pin_perm[power_law_ids(rng, n_pins, k, 1.15)]
        b = pin_perm[power_law_ids(rng, n_pins, k, 1.15)]
        keep = a != b
        return np.minimum(a, b)[keep], np.maximum(a, b)[keep]

    pb_pin, pb_board = unique_pairs(rng, n_pb, draw_pb)
    pp_a, pp_b = unique_pairs(rng, n_pp, draw_pp)
    n = n_pb + n_pp
    src_type = np.concatenate([np.full(n_pb, "pin"), np.full(n_pp, "pin")])
    dst_type = np.concatenate([np.full(n_pb, "board"), np.full(n_pp, "pin")])
    edge_type = np.concatenate([np.full(n_pb, "pin_board"), np.full(n_pp, "pin_pin")])
    src_id = np.concatenate([pb_pin, pp_a]).astype(np.int64)
    dst_id = np.concatenate([pb_board, pp_b]).astype(np.int64)
    weight = rng.integers(1, 6, size=n).astype(np.float64)
    # Each edge on one day of the window; 10% also on a second day (summed by the window).
    day = rng.integers(0, days, size=n)
    dirs = []
    for d in range(days):
        rows = np.flatnonzero(day == d)
        if days > 1:
            extra = np.flatnonzero((day == (d + 1) % days) & (rng.random(n) < 0.1))
            rows = np.concatenate([rows, extra])
        directory = out_root / f"dt=day{d}"
        directory.mkdir(parents=True)
        pq.write_table(
            pa.table(
                {
                    "src_type": pa.array(src_type[rows], pa.string()),
                    "src_id": pa.array(src_id[rows], pa.int64()),
                    "dst_type": pa.array(dst_type[rows], pa.string()),
                    "dst_id": pa.array(dst_id[rows], pa.int64()),
                    "edge_type": pa.array(edge_type[rows], pa.string()),
                    "weight": pa.array(weight[rows], pa.float64()),
                }
            ),
            directory / "part-0.parquet",
            row_group_size=1 << 20,
        )
        dirs.append(directory)
    return dirs, {"undirected_edges": n, "pins": n_pins, "boards": n_boards, "days": days}


def same_rows(a: Path, b: Path) -> dict:
    import duckdb

    con = duckdb.connect()
    ra, rb = f"read_parquet('{a}/*.parquet')", f"read_parquet('{b}/*.parquet')"
    cols = "src_type, src_id, dst_type, dst_id, edge_type, weight"
    only_a = con.execute(
        f"SELECT COUNT(*) FROM (SELECT {cols} FROM {ra} EXCEPT ALL SELECT {cols} FROM {rb})"
    ).fetchone()[0]
    only_b = con.execute(
        f"SELECT COUNT(*) FROM (SELECT {cols} FROM {rb} EXCEPT ALL SELECT {cols} FROM {ra})"
    ).fetchone()[0]
    return {"rows_only_duckdb": int(only_a), "rows_only_spark": int(only_b)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edges", type=int, default=10_000_000, help="undirected edges in the window")
    ap.add_argument("--days", type=int, default=3, help="daily partitions the edges are spread over")
    ap.add_argument("--spark-master", default="local[2]")
    ap.add_argument("--driver-memory", default="8g")
    ap.add_argument("--duckdb-threads", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.86)
    ap.add_argument("--d-min", type=int, default=10)
    ap.add_argument("--d-max", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="default: a temporary directory (removed afterwards)")
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="omnisage-prune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    params = PruningParams(alpha=args.alpha, d_min=args.d_min, d_max=args.d_max, seed=args.seed)
    try:
        t = time.perf_counter()
        dirs, synth = synthesize(args.edges, args.days, work / "daily_edges")
        synth["generate_s"] = round(time.perf_counter() - t, 2)
        print(f"synthesized {synth}", flush=True)

        out_duck = work / "pruned_duckdb"
        out_duck.mkdir()
        t = time.perf_counter()
        duck_engine = DuckDBEdgeEngine(scratch_dir=work / "scratch", threads=args.duckdb_threads)
        duck_stats = duck_engine.prune_window(dirs, out_duck, params)
        duck_s = time.perf_counter() - t
        print(f"duckdb: {duck_s:.1f} s, kept_fraction {duck_stats['kept_fraction']}", flush=True)

        out_spark = work / "pruned_spark"
        out_spark.mkdir()
        t0 = time.perf_counter()
        from pyspark.sql import SparkSession

        spark = (
            SparkSession.builder.master(args.spark_master)
            .appName("omnisage-prune-bench")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.driver.memory", args.driver_memory)
            .config("spark.local.dir", str(work / "scratch" / "spark"))
            .config("spark.sql.shuffle.partitions", "8")
            .getOrCreate()
        )
        spark.sparkContext.setLogLevel("ERROR")
        t1 = time.perf_counter()
        spark_stats = SparkEdgeEngine(lambda: spark).prune_window(dirs, out_spark, params)
        t2 = time.perf_counter()
        spark.stop()
        print(f"spark: start {t1 - t0:.1f} s, prune {t2 - t1:.1f} s", flush=True)

        diff = same_rows(out_duck, out_spark)
        identical = diff["rows_only_duckdb"] == 0 and diff["rows_only_spark"] == 0 and duck_stats == spark_stats
        result = {
            "benchmark": "pruning",
            "machine": f"{platform.node()} {os.cpu_count()} cores",
            "spark_master": args.spark_master,
            "duckdb_threads": args.duckdb_threads,
            "params": params.to_dict(),
            **synth,
            "adjacency_entries": duck_stats["before"]["total_entries"],
            "kept_entries": duck_stats["after"]["total_entries"],
            "kept_fraction": duck_stats["kept_fraction"],
            "duckdb_s": round(duck_s, 2),
            "spark_s_without_start": round(t2 - t1, 2),
            "spark_start_s": round(t1 - t0, 2),
            "spark_s_with_start": round(t2 - t0, 2),
            "ratio_spark_over_duckdb": round((t2 - t1) / duck_s, 2),
            "ratio_spark_with_start_over_duckdb": round((t2 - t0) / duck_s, 2),
            "identical_output": bool(identical),
            "stats_identical": duck_stats == spark_stats,
            **diff,
            "table1_before": duck_stats["before"],
            "table1_after": duck_stats["after"],
        }
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
