"""Ingest benchmark: one day of ~1M events (contract-shaped) plus a large metadata snapshot.

    python benchmarks/ingest.py [--events 1000000] [--pins 200000] [--boards 100000] [--image-dim 64]
                                [--source inline|synthetic] [--bad-fraction 0.005]

``inline`` (default) writes a contract-shaped day with numpy (4 files, mixed accepted widenings, a small
fraction of bad rows of every kind) so the figure measures validation, not generation; ``synthetic``
uses ``omnisage generate --scale large`` for one day instead. Timings: the pure library
(``omnisage_pipeline.contract.validation``) and the whole Dagster asset (read + validate + write + atomic publish).
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DAY = "2026-01-01"


def write_inline_day(root: Path, events: int, bad_fraction: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    start_us = int(datetime.fromisoformat(DAY).replace(tzinfo=UTC).timestamp()) * 1_000_000
    ts = start_us + np.sort(rng.integers(0, 86_400_000_000, events))
    actions = np.array(["save", "click", "closeup"])[rng.choice(3, events, p=[0.2, 0.3, 0.5])]
    surfaces = np.array(["homefeed", "related_pins", "search", "board"])[rng.choice(4, events)]
    user = rng.integers(3_000_000_000, 3_000_050_000, events)
    pin = rng.integers(1, 200_001, events)
    board = np.where(actions == "save", rng.integers(2_000_000_000, 2_000_100_000, events), -1)
    query = np.where(surfaces == "related_pins", rng.integers(1, 200_001, events), -1)
    # plant bad rows of every kind
    bad = rng.random(events) < bad_fraction
    kind = rng.integers(0, 5, events)
    user_mask = bad & (kind == 0)
    actions = np.where(bad & (kind == 1), "like", actions)
    surfaces = np.where(bad & (kind == 2), "notifications", surfaces)
    board = np.where(bad & (kind == 3), -1, board)
    actions = np.where(bad & (kind == 3), "save", actions)
    ts = np.where(bad & (kind == 4), ts + 86_400_000_000, ts)
    table = pa.table(
        {
            "event_ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "user_id": pa.array(user, pa.int64(), mask=user_mask),
            "action": pa.array(actions),
            "surface": pa.array(surfaces).dictionary_encode(),
            "pin_id": pa.array(pin, pa.int64()),
            "board_id": pa.array(board, pa.int64(), mask=board < 0),
            "query_pin_id": pa.array(query, pa.int64(), mask=query < 0),
        }
    )
    out = root / "engagement_logs" / f"dt={DAY}"
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, events, 5).astype(int)
    for i in range(4):
        part = table.slice(bounds[i], bounds[i + 1] - bounds[i])
        if i == 1:  # an accepted widening in one file: int32 pin ids, ms timestamps
            part = part.set_column(4, "pin_id", part.column("pin_id").cast(pa.int32()))
            part = part.set_column(0, "event_ts", part.column("event_ts").cast(pa.timestamp("ms"), safe=False))
        pq.write_table(part, out / f"part-{i:05d}.parquet")


def write_inline_metadata(root: Path, pins: int, boards: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    vec = rng.standard_normal((pins, dim), dtype=np.float32)
    has_image = rng.random(pins) < 0.9
    offsets = np.arange(pins + 1, dtype=np.int32) * dim
    vectors = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vec.ravel()), mask=pa.array(~has_image))
    words = np.array(["red", "blue", "garden", "recipe", "travel", "wood", "summer", "dress", "lamp", "cake"])
    titles = pa.array([" ".join(words[rng.integers(0, 10, 4)]) for _ in range(1000)]).take(
        pa.array(rng.integers(0, 1000, pins))
    )
    segments = pa.array(np.array(["organic", "promoted", "shopping", "video"])[rng.integers(0, 4, pins)])
    pin_ids = np.arange(1, pins + 1, dtype=np.int64)
    pin_ids[rng.integers(0, pins, pins // 1000)] = 7  # some duplicates
    (root / "pins").mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "pin_id": pin_ids,
                "title": titles,
                "description": titles,
                "image_embedding": vectors,
                "segment": segments,
            }
        ),
        root / "pins" / "part-00000.parquet",
    )
    (root / "boards").mkdir(parents=True, exist_ok=True)
    btitles = titles.slice(0, boards) if boards <= pins else pa.array(["b"] * boards)
    pq.write_table(
        pa.table(
            {
                "board_id": np.arange(2_000_000_000, 2_000_000_000 + boards, dtype=np.int64),
                "name": btitles,
                "description": btitles,
            }
        ),
        root / "boards" / "part-00000.parquet",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--pins", type=int, default=200_000)
    ap.add_argument("--boards", type=int, default=100_000)
    ap.add_argument("--image-dim", type=int, default=64)
    ap.add_argument("--bad-fraction", type=float, default=0.005)
    ap.add_argument("--source", choices=["inline", "synthetic"], default="inline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temporary data root and home")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="omnisage-bench-ingest-"))
    root, home = work / "data", work / "home"
    os.environ["OMNISAGE_HOME"] = str(home)
    os.environ["OMNISAGE_DATA_ROOT"] = str(root)
    os.environ.setdefault("OMNISAGE_START_DATE", DAY)

    t0 = time.perf_counter()
    if args.source == "synthetic":
        from omnisage_pipeline.tools.synthetic import generate

        generate(root, DAY, 1, scale="large", seed=args.seed)
    else:
        write_inline_day(root, args.events, args.bad_fraction, args.seed)
        write_inline_metadata(root, args.pins, args.boards, args.image_dim, args.seed)
    gen_s = time.perf_counter() - t0

    import dagster as dg

    from assets.ingest import engagement_logs, entity_metadata
    from omnisage_pipeline.contract import validation as C
    from omnisage_pipeline.resources import StorageResource
    from omnisage_pipeline.settings import Settings

    files = C.list_parquet_files(root / "engagement_logs" / f"dt={DAY}")
    lib_logs, lib_meta = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        logs = C.validate_engagement_logs(files, DAY, root)
        lib_logs.append(time.perf_counter() - t)
        t = time.perf_counter()
        pins = C.validate_pins(C.list_parquet_files(root / "pins"), root)
        boards = C.validate_boards(C.list_parquet_files(root / "boards"), root)
        lib_meta.append(time.perf_counter() - t)

    resources = {"storage": StorageResource.from_settings(Settings.from_env())}
    dg.materialize([engagement_logs], partition_key=DAY, resources=resources)  # warm Dagster up
    asset_logs, asset_meta = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        dg.materialize([engagement_logs], partition_key=DAY, resources=resources)
        asset_logs.append(time.perf_counter() - t)
        t = time.perf_counter()
        dg.materialize([entity_metadata], partition_key=DAY, resources=resources)
        asset_meta.append(time.perf_counter() - t)

    figures = {
        "benchmark": "ingest",
        "source": args.source,
        "machine": f"{platform.node()} {os.cpu_count()} cpu",
        "events": logs.rows_read,
        "events_kept": logs.rows_kept,
        "events_quarantined": logs.rows_quarantined,
        "pins": pins.rows_read,
        "boards": boards.rows_read,
        "image_dim": pins.extra.get("image_dim"),
        "generate_s": round(gen_s, 3),
        "validate_logs_s": round(min(lib_logs), 3),
        "validate_metadata_s": round(min(lib_meta), 3),
        "asset_engagement_logs_s": round(min(asset_logs), 3),
        "asset_entity_metadata_s": round(min(asset_meta), 3),
        "events_per_s_library": round(logs.rows_read / min(lib_logs)),
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
