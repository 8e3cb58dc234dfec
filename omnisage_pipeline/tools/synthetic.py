"""Synthetic input in the data contract's format, from a generative model with planted (known) structure.

The generator has two parts:

* a **universe** built once from ``(scale, seed)``: K topic centroids in a ``latent_dim`` space, each with
  S sub-topic centroids around it; every pin, board and user gets its own latent vector = a mixture of a
  primary (pins: sub-)topic centroid and a secondary topic centroid plus individual Gaussian variation (so
  no two entities tie); pins get a heavy-tailed popularity weight (so the graph has hubs for the paper's
  pruning, appendix A.1, to act on), a segment, an image embedding (a fixed random projection of the
  latent vector plus noise; some pins have none) and a title/description whose words come from the
  vocabularies of the pin's topics mixed with shared noise words; every user owns at least one board,
  created for one of the user's interest topics;
* **days**, each generated from its own RNG ``default_rng([seed, DAY_STREAM, day_index])`` so any day can be
  generated alone and the same seed always gives the same rows. Users' interests drift slowly: the latent
  vector of user u on day d is ``normalize(latent_u + drift_rate * d * centroid[drift_topic_u])``.

Engagement (all vectorised; no dense users x pins matrix at any scale): every event picks a user by
activity, a surface and a topic from the user's day-d topic affinity ``softmax(beta * u_d . centroids)``;
the engaged pin is the Gumbel-max (a sample from ``softmax(tau * affinity)``) of a few candidates drawn by
exposure weight from that topic's pin pool. Related-pins events take a user-affine query pin first and
engage a pin drawn from the query's sub-topic (or secondary topic) pool, scored by latent closeness to
the query, so related pairs are closer than same-topic pairs, which are closer than random pairs. Saves
go to the user's own board that matches the pin best (Gumbel-max over the user's boards by board . pin).
Action rates depend on the pin's segment and the surface.

The truth goes under ``DIR/_truth/`` (the pipeline never reads it): latent vectors and topics of pins,
boards and users plus ``meta.json`` (what ``user_latents_on_day`` needs to recompute the drift).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, replace
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ml.truth import Truth, load_truth
from omnisage_pipeline.tools.synthetic_engagement import generate_day
from omnisage_pipeline.tools.synthetic_metadata import metadata_tables, truth_tables
from omnisage_pipeline.tools.synthetic_universe import (
    BOARD_ID_BASE,
    PIN_ID_BASE,
    SCALES,
    USER_ID_BASE,
    GeneratorError,
    ModelParams,
    Universe,
    build_universe,
)

#: The generator's API: its pieces live in synthetic_universe / _engagement / _metadata; ``Truth`` and
#: ``load_truth`` read back what ``generate`` writes under ``_truth/``.
__all__ = [
    "BOARD_ID_BASE",
    "PIN_ID_BASE",
    "SCALES",
    "USER_ID_BASE",
    "GeneratorError",
    "ModelParams",
    "Truth",
    "Universe",
    "build_universe",
    "generate",
    "generate_day",
    "load_truth",
    "metadata_tables",
    "write_parquet",
]

GENERATOR_VERSION = 1


def write_parquet(table: pa.Table, path: Path) -> None:
    """Deterministic bytes (fixed row order, fixed row groups, no timestamps) and atomic (tmp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd", row_group_size=131_072, write_statistics=True)
    os.replace(tmp, path)


def _meta(u: Universe, start_date: str, days: list[str]) -> dict:
    p, cfg = u.params, u.config
    return {
        "generator_version": GENERATOR_VERSION,
        "scale": u.scale,
        "seed": u.seed,
        "start_date": start_date,
        "days": days,
        "K": cfg.topics,
        "subtopics_per_topic": cfg.subtopics,
        "latent_dim": p.latent_dim,
        "image_dim": p.image_dim if p.images else None,
        "images": p.images,
        "drift_rate": p.drift_rate,
        "params": json.loads(json.dumps(asdict(p))),  # every knob of the generative model (ModelParams)
        "counts": {"pins": cfg.pins, "boards": cfg.boards, "users": cfg.users},
        "id_bases": {"pin": PIN_ID_BASE, "board": BOARD_ID_BASE, "user": USER_ID_BASE},
        "day_index": "days since start_date; user latent on day d = "
        "normalize(latent + drift_rate * d * centroid[drift_topic])",
    }


def _write_meta(meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


_IDENTITY_KEYS = (
    "generator_version",
    "scale",
    "seed",
    "start_date",
    "K",
    "latent_dim",
    "image_dim",
    "images",
    "params",
)


def generate(
    out_dir: str | Path,
    start_date: str,
    days: int,
    scale: str = "small",
    seed: int = 0,
    *,
    images: bool = True,
    force: bool = False,
    params: ModelParams | None = None,
) -> dict:
    """Write ``days`` days of synthetic input (contract layout) plus ``_truth/`` under ``out_dir``.

    Re-running with the same arguments rewrites identical bytes; adding days to a data set generated with
    the same (scale, seed, start_date, images, params) extends it. A directory holding a different synthetic data
    set is an error unless ``force`` (then the generator's own folders are removed first).
    Returns a summary: rows per written file and seconds.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    try:
        first = date.fromisoformat(start_date)
    except (TypeError, ValueError) as exc:
        raise GeneratorError(f"--start-date {start_date!r} is not YYYY-MM-DD") from exc
    if days < 1:
        raise GeneratorError(f"--days {days}: must be >= 1")
    params = params or ModelParams()
    if not images:
        params = replace(params, images=False)
    u = build_universe(scale, seed, params)
    day_keys = [(first + timedelta(days=i)).isoformat() for i in range(days)]
    meta = _meta(u, start_date, day_keys)

    meta_path = out / "_truth" / "meta.json"
    if not meta_path.exists() and any((out / sub).exists() for sub in ("engagement_logs", "pins", "boards")):
        # Never overwrite input that the generator did not write (a real export, a converted data set).
        raise GeneratorError(
            f"{out} already holds input that is not a synthetic data set (no _truth/meta.json); choose another --out"
        )
    done_days: list[str] = []
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        clash = {k: (old.get(k), meta[k]) for k in _IDENTITY_KEYS if old.get(k) != meta[k]}
        if clash and not force:
            detail = ", ".join(f"{k}: {a!r} there vs {b!r} asked" for k, (a, b) in clash.items())
            raise GeneratorError(f"{out} holds another synthetic data set ({detail}); pass --force to replace it")
        if clash:
            for sub in ("engagement_logs", "pins", "boards", "_truth"):
                shutil.rmtree(out / sub, ignore_errors=True)
        else:
            done_days = list(old.get("days", []))
    meta["days"] = sorted(set(done_days) | set(day_keys))
    # Mark the folder as this synthetic data set before writing any data, so that a run killed half-way can
    # be re-run into it; a day is listed in meta.json once it is complete.
    _write_meta({**meta, "days": done_days}, meta_path)

    rows: dict[str, int] = {}
    t_meta = time.perf_counter()
    pins, boards = metadata_tables(u)
    write_parquet(pins, out / "pins" / "part-00000.parquet")
    write_parquet(boards, out / "boards" / "part-00000.parquet")
    rows["pins/part-00000.parquet"], rows["boards/part-00000.parquet"] = pins.num_rows, boards.num_rows
    for name, table in truth_tables(u).items():
        write_parquet(table, out / "_truth" / f"{name}.parquet")
        rows[f"_truth/{name}.parquet"] = table.num_rows
    metadata_seconds = time.perf_counter() - t_meta

    day_seconds = []
    for i, key in enumerate(day_keys):
        t0 = time.perf_counter()
        table = generate_day(u, i, first + timedelta(days=i))
        rel = f"engagement_logs/dt={key}/part-00000.parquet"
        write_parquet(table, out / rel)
        rows[rel] = table.num_rows
        day_seconds.append(time.perf_counter() - t0)
        done_days = sorted(set(done_days) | {key})
        _write_meta({**meta, "days": done_days}, meta_path)

    _write_meta(meta, meta_path)
    return {
        "out_dir": str(out),
        "scale": scale,
        "seed": seed,
        "start_date": start_date,
        "days": day_keys,
        "rows": rows,
        "events": sum(v for k, v in rows.items() if k.startswith("engagement_logs/")),
        "metadata_seconds": metadata_seconds,
        "day_seconds": day_seconds,
        "seconds": time.perf_counter() - t_start,
    }
