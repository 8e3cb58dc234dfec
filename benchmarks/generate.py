"""Benchmark: synthetic generation at a scale (default `large`: ~1M events/day, 200K pins, 100K boards,
50K users). Times the universe + metadata (once per data set) and one (or more) days of engagement logs,
each written as Parquet exactly as `omnisage generate` does. Last line of output: one JSON object.

    python benchmarks/generate.py [--scale large] [--days 1] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import pyarrow.parquet as pq

from omnisage_pipeline.tools import synthetic as syn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", default="large", choices=sorted(syn.SCALES))
    ap.add_argument("--days", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="keep the output here (default: a temp dir)")
    args = ap.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="omnisage-genbench-"))
    start = date(2026, 1, 1)
    try:
        # Warm-up outside the timings: pyarrow's first conversion imports pandas (~1-2 s, once per process).
        syn.generate_day(syn.build_universe("tiny", 0), 0, start)

        t0 = time.perf_counter()
        u = syn.build_universe(args.scale, args.seed)
        universe_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pins, boards = syn.metadata_tables(u)
        syn.write_parquet(pins, out / "pins" / "part-00000.parquet")
        syn.write_parquet(boards, out / "boards" / "part-00000.parquet")
        metadata_s = time.perf_counter() - t0

        day_s, gen_s, cpu_s, events, bytes_ = [], [], [], 0, 0
        for i in range(args.days):
            t0, c0 = time.perf_counter(), time.process_time()
            table = syn.generate_day(u, i, start + timedelta(days=i))
            t1 = time.perf_counter()
            path = out / "engagement_logs" / f"dt={(start + timedelta(days=i)).isoformat()}" / "part-00000.parquet"
            syn.write_parquet(table, path)
            day_s.append(time.perf_counter() - t0)
            cpu_s.append(time.process_time() - c0)
            gen_s.append(t1 - t0)
            events += table.num_rows
            bytes_ += path.stat().st_size
        assert pq.read_metadata(path).num_rows == table.num_rows
        per_day = sum(day_s) / len(day_s)
        for i, (d, g) in enumerate(zip(day_s, gen_s, strict=True)):
            print(f"day {i}: {d:.2f}s ({g:.2f}s generating, {d - g:.2f}s writing Parquet)")
        print(f"universe {universe_s:.2f}s, metadata (pins+boards, written) {metadata_s:.2f}s")
        result = {
            "scale": args.scale,
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "events_per_day": events / args.days,
            f"seconds_per_day_{args.scale}": round(per_day, 3),
            "seconds_generate_per_day": round(sum(gen_s) / len(gen_s), 3),
            # CPU time of this process per day: the figure to trust when other jobs share the cores.
            "cpu_seconds_per_day": round(sum(cpu_s) / len(cpu_s), 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "events_per_second": round(events / sum(day_s)),
            "seconds_universe": round(universe_s, 3),
            "seconds_metadata": round(metadata_s, 3),
            "pins": u.config.pins,
            "boards": u.config.boards,
            "users": u.config.users,
            "parquet_mb_per_day": round(bytes_ / args.days / 2**20, 2),
        }
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
