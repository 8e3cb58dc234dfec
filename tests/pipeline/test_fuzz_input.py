"""Fuzzed input: every kind of bad input the data contract (README, "Data contract", "Input")
defines, one table-driven case each, with the outcome the contract prescribes for it.

A case writes files under a fresh ``$OMNISAGE_DATA_ROOT`` and expects one of:

* :class:`Quarantined` - the exact quarantine: which (source_file, source_row) gets which reason; rows in =
  rows kept + rows quarantined; the kept rows obey every contract rule (checked independently of the
  validator, see ``_assert_valid_rows_obey_the_contract``). ``Quarantined(n, {})`` is an accepted input.
* :class:`Rejected` - a ``ContractError`` whose message names the file (absolute path) and the column
  (where the contract has one: a zero-byte or non-Parquet file has no column).

Every case runs the library validator (``omnisage_pipeline.contract.validation``, as the ingest assets call it: list
the folder, validate). Cases marked ``asset=True`` also materialize the real ingest asset in-process
(``engagement_logs`` or ``entity_metadata``) and check what it published under ``$OMNISAGE_HOME``
(contract "Outputs"): valid and quarantine partitions, their row counts, the reasons, the materialization
metadata and the blocking ``rows_accounted`` check; a rejected input fails the run and publishes nothing.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pyarrow import feather

from assets.ingest import engagement_logs, entity_metadata
from omnisage_pipeline.contract import validation as C
from omnisage_pipeline.contract.validation import ContractError
from omnisage_pipeline.partitions import daily_partitions
from omnisage_pipeline.resources import StorageResource
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import published_path

pytestmark = pytest.mark.slow

DAY = daily_partitions.get_first_partition_key()
D0 = datetime.fromisoformat(DAY).replace(tzinfo=UTC)
LOGS = f"engagement_logs/dt={DAY}"
BIG = C.MAX_TEXT_BYTES
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
NAN, INF = float("nan"), float("inf")
F32 = pa.list_(pa.float32())
F64 = pa.list_(pa.float64())


# --------------------------------------------------------------------------------------- table builders


def log_rows(n: int, start: int = 0) -> dict[str, list]:
    """n valid events; user_id = 100 + i is unique per row; rows 0, 3, 6... are saves (with a board)."""
    actions, surfaces = ["save", "click", "closeup"], ["homefeed", "related_pins", "search", "board"]
    rows: dict[str, list] = {c: [] for c in C.LOG_SCHEMA.names}
    for i in range(start, start + n):
        rows["event_ts"].append(D0 + timedelta(minutes=7 * i + 1))
        rows["user_id"].append(100 + i)
        rows["action"].append(actions[i % 3])
        rows["surface"].append(surfaces[i % 4])
        rows["pin_id"].append(1000 + i)
        rows["board_id"].append(500 + i if i % 3 == 0 else None)
        rows["query_pin_id"].append(2000 + i if i % 4 == 1 else None)
    return rows


def pin_rows(n: int, start: int = 0) -> dict[str, list]:
    return {
        "pin_id": list(range(1 + start, 1 + start + n)),
        "title": [f"title {i}" for i in range(start, start + n)],
        "description": [f"desc {i}" for i in range(start, start + n)],
        "image_embedding": [[0.5, 1.5, 2.5]] * n,
        "segment": ["organic"] * n,
    }


def board_rows(n: int, start: int = 0) -> dict[str, list]:
    return {
        "board_id": list(range(50 + start, 50 + start + n)),
        "name": [f"board {i}" for i in range(start, start + n)],
        "description": [f"about {i}" for i in range(start, start + n)],
    }


def arrow(values: list, t: pa.DataType) -> pa.Array:
    """values as an Arrow array of type t; bytes in a text column stay raw (non-UTF-8 allowed)."""
    if pa.types.is_dictionary(t):
        return arrow(values, t.value_type).dictionary_encode().cast(t)
    if pa.types.is_timestamp(t):
        return pa.array(values, pa.timestamp("us", tz="UTC")).cast(t)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        raw = [v.encode() if isinstance(v, str) else v for v in values]
        binary = pa.large_binary() if pa.types.is_large_string(t) else pa.binary()
        return pa.array(raw, binary).view(t)
    return pa.array(values, t)


def make(
    schema: pa.Schema,
    rows: dict[str, list],
    set: dict[tuple[str, int], object] | None = None,
    types: dict[str, pa.DataType | pa.Array] | None = None,
    drop: tuple[str, ...] = (),
    extra: dict[str, pa.Array] | None = None,
) -> pa.Table:
    """A table of the contract columns: ``set`` edits single cells, ``types`` gives a column another type
    (or an explicit array), ``drop`` removes columns, ``extra`` appends columns."""
    rows = {c: list(v) for c, v in rows.items()}
    for (col, i), value in (set or {}).items():
        rows[col][i] = value
    columns: dict[str, pa.Array] = {}
    for f in schema:
        if f.name in drop:
            continue
        t = (types or {}).get(f.name, f.type)
        columns[f.name] = t if isinstance(t, pa.Array) else arrow(rows[f.name], t)
    columns.update(extra or {})
    return pa.table(columns)


def logs(n: int = 8, start: int = 0, **kw) -> pa.Table:
    return make(C.LOG_SCHEMA, log_rows(n, start), **kw)


def pins(n: int = 5, start: int = 0, **kw) -> pa.Table:
    return make(C.PIN_SCHEMA, pin_rows(n, start), **kw)


def boards(n: int = 4, start: int = 0, **kw) -> pa.Table:
    return make(C.BOARD_SCHEMA, board_rows(n, start), **kw)


# ------------------------------------------------------------------------------- file-level fuzz objects


@dataclass(frozen=True)
class Folder:
    """A directory where a file is expected."""


@dataclass(frozen=True)
class Link:
    """A symlink to ``target`` (relative to the data root; may not exist)."""

    target: str


@dataclass(frozen=True)
class Cut:
    """A valid Parquet file of ``table`` with its bytes cut to ``keep`` (negative: drop that many)."""

    table: pa.Table
    keep: int


@dataclass(frozen=True)
class Feather:
    """An Arrow IPC (Feather) file wearing a .parquet name."""

    table: pa.Table


@dataclass(frozen=True)
class CorruptColumn:
    """A Parquet file whose column chunk ``column`` has its page bytes overwritten (footer intact)."""

    table: pa.Table
    column: int


def _write(root: Path, rel: str, obj) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, pa.Table):
        pq.write_table(obj, path)
    elif isinstance(obj, bytes):
        path.write_bytes(obj)
    elif isinstance(obj, Folder):
        path.mkdir()
    elif isinstance(obj, Link):
        path.symlink_to(root / obj.target)
    elif isinstance(obj, Feather):
        feather.write_feather(obj.table, str(path))
    elif isinstance(obj, Cut):
        pq.write_table(obj.table, path)
        raw = path.read_bytes()
        path.write_bytes(raw[: obj.keep] if obj.keep > 0 else raw[: len(raw) + obj.keep])
    elif isinstance(obj, CorruptColumn):
        pq.write_table(obj.table, path, compression="snappy", use_dictionary=False)
        chunk = pq.ParquetFile(path).metadata.row_group(0).column(obj.column)
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        raw = bytearray(path.read_bytes())
        size = chunk.total_compressed_size
        raw[start + 16 : start + size - 4] = b"\xab" * (size - 20)
        path.write_bytes(bytes(raw))
    else:
        raise TypeError(type(obj))


# ------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Quarantined:
    """rows_in rows read; exactly these (source_file, source_row) -> reason quarantined; the rest kept."""

    rows_in: int
    reasons: dict[tuple[str, int], str]
    image_dim: int | None = None


@dataclass(frozen=True)
class Rejected:
    """The input fails with ``error`` whose message names ``file`` (relative to the data root) and
    ``column`` (None: the kind has no column) and contains ``says``."""

    file: str
    column: str | None
    says: str
    error: type[Exception] = ContractError


@dataclass(frozen=True)
class Case:
    id: str
    table: str  # logs | pins | boards
    example: str  # for the table in docs/reliability.md
    files: Callable[[], dict[str, object]]  # relative path -> Table | bytes | fuzz object
    expect: Quarantined | Rejected
    asset: bool = False  # also materialize the ingest asset in-process
    library: bool = True  # run the library validator (False: the kind exists only at asset level)
    no_root: bool = False  # OMNISAGE_DATA_ROOT points at nothing


def q(rows_in: int, *entries: tuple[str, int, str], image_dim: int | None = None) -> Quarantined:
    return Quarantined(rows_in, {(f, r): reason for f, r, reason in entries}, image_dim)


def rej(file: str, column: str | None, says: str, error: type[Exception] = ContractError) -> Rejected:
    return Rejected(file, column, says, error)


A, B, Z = f"{LOGS}/a.parquet", f"{LOGS}/b.parquet", f"{LOGS}/z.parquet"
P, P2, BD = "pins/p.parquet", "pins/q.parquet", "boards/b.parquet"
NY = pa.timestamp("us", tz="America/New_York")
DICT8, DICT16 = pa.dictionary(pa.int8(), pa.string()), pa.dictionary(pa.int16(), pa.string())
EMB = "image_embedding"


def _dt(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


CASES: list[Case] = []


def case(*args, **kw) -> None:
    CASES.append(Case(*args, **kw))


# fmt: off
# ---- engagement logs: wrong column types (not an accepted widening) -> rejected naming file and column
case("logs/type/user_id_string", "logs", "user_id as string `'101'`",
     lambda: {A: logs(types={"user_id": pa.array([str(i) for i in range(8)])})},
     rej(A, "user_id", "has type string"))
case("logs/type/pin_id_float64", "logs", "pin_id as float64 `1000.0`",
     lambda: {A: logs(types={"pin_id": pa.array([1000.0 + i for i in range(8)])})},
     rej(A, "pin_id", "has type double"))
case("logs/type/user_id_uint64", "logs", "user_id as uint64 (not lossless into int64)",
     lambda: {A: logs(types={"user_id": pa.uint64()})},
     rej(A, "user_id", "has type uint64"))
case("logs/type/event_ts_string", "logs", "event_ts as ISO string",
     lambda: {A: logs(types={"event_ts": pa.array([D0.isoformat()] * 8)})},
     rej(A, "event_ts", "has type string"))
case("logs/type/event_ts_epoch_int64", "logs", "event_ts as int64 epoch microseconds",
     lambda: {A: logs(types={"event_ts": pa.array([int(D0.timestamp() * 1e6)] * 8)})},
     rej(A, "event_ts", "has type int64"))
case("logs/type/event_ts_date32", "logs", "event_ts as date32",
     lambda: {A: logs(types={"event_ts": pa.array([D0.date()] * 8)})},
     rej(A, "event_ts", "has type date32"))
case("logs/type/action_binary", "logs", "action as binary (no UTF-8 annotation)",
     lambda: {A: logs(types={"action": pa.array([b"click"] * 8, pa.binary())})},
     rej(A, "action", "has type binary"))
case("logs/type/surface_int", "logs", "surface as int64 code",
     lambda: {A: logs(types={"surface": pa.array([1] * 8)})},
     rej(A, "surface", "has type int64"))
case("logs/type/board_id_string", "logs", "optional board_id as string",
     lambda: {A: logs(types={"board_id": pa.array(["b"] * 8)})},
     rej(A, "board_id", "has type string"))
case("logs/type/query_pin_id_float", "logs", "optional query_pin_id as float64",
     lambda: {A: logs(types={"query_pin_id": pa.array([1.5] * 8)})},
     rej(A, "query_pin_id", "has type double"))
case("logs/type/zero_row_file_wrong_type", "logs", "0-row file whose pin_id is string",
     lambda: {A: logs(), B: logs(0, types={"pin_id": pa.array([], pa.string())})},
     rej(B, "pin_id", "has type string"))

# ---- engagement logs: required columns missing / misnamed / duplicated -> rejected naming file and column
for _col in C.LOG_REQUIRED:
    case(f"logs/missing_column/{_col}", "logs", f"no `{_col}` column",
         lambda _col=_col: {A: logs(drop=(_col,))},
         rej(A, _col, "required column is missing"), asset=_col == "surface")
case("logs/missing_column/wrong_case", "logs", "`User_ID` instead of `user_id`",
     lambda: {A: logs(drop=("user_id",), extra={"User_ID": pa.array(range(8))})},
     rej(A, "user_id", "required column is missing"))
case("logs/duplicate_column", "logs", "two `user_id` columns",
     lambda: {A: logs().append_column("user_id", pa.array(range(8)))},
     rej(A, "user_id", "appears more than once"))

# ---- engagement logs: bad rows -> quarantined with the reason (row 3 of 8 unless stated)
for _col in C.LOG_REQUIRED:
    case(f"logs/null/{_col}", "logs", f"row 3: `{_col}` = null",
         lambda _col=_col: {A: logs(set={(_col, 3): None})},
         q(8, (A, 3, f"null_{_col}")))
case("logs/null/all_null_typed_column", "logs", "`action` of Arrow type null (pandas all-None column)",
     lambda: {A: logs(4, types={"action": pa.nulls(4)})},
     q(4, *((A, i, "null_action") for i in range(4))))
case("logs/unknown_action", "logs", "action `like`",
     lambda: {A: logs(set={("action", 3): "like"})},
     q(8, (A, 3, "unknown_action")))
case("logs/unknown_action/near_misses", "logs", "actions `Save`, ` click`, `click\\0`, `` (empty)",
     lambda: {A: logs(set={("action", 1): "Save", ("action", 2): " click", ("action", 4): "click\x00",
                           ("action", 5): ""})},
     q(8, (A, 1, "unknown_action"), (A, 2, "unknown_action"), (A, 4, "unknown_action"),
       (A, 5, "unknown_action")))
case("logs/unknown_action/non_utf8", "logs", "action bytes `cl\\xffick`",
     lambda: {A: logs(set={("action", 3): b"cl\xffick"})},
     q(8, (A, 3, "unknown_action")), asset=True)
# int8/int16 dictionary indices (pandas categoricals): Arrow's reader validated UTF-8 there, failing the file
case("logs/unknown_action/non_utf8_dictionary", "logs", "dictionary<int8> action with bytes `sa\\xc3ve`",
     lambda: {A: logs(set={("action", 3): b"sa\xc3ve"}, types={"action": DICT8})},
     q(8, (A, 3, "unknown_action")))
case("logs/unknown_action/huge", "logs", "a 2 MiB action string",
     lambda: {A: logs(set={("action", 3): "s" * (2 * BIG)})},
     q(8, (A, 3, "unknown_action")))
case("logs/unknown_surface", "logs", "surface `notifications`",
     lambda: {A: logs(set={("surface", 3): "notifications"})},
     q(8, (A, 3, "unknown_surface")))
case("logs/unknown_surface/dictionary", "logs", "dictionary-encoded surface `Search`",
     lambda: {A: logs(set={("surface", 3): "Search"}, types={"surface": DICT8})},
     q(8, (A, 3, "unknown_surface")))
case("logs/save_without_board", "logs", "action `save`, board_id null",
     lambda: {A: logs(set={("board_id", 3): None})},
     q(8, (A, 3, "save_without_board_id")))
case("logs/save_without_board/column_absent", "logs", "no board_id column at all: every save",
     lambda: {A: logs(drop=("board_id", "query_pin_id"))},
     q(8, (A, 0, "save_without_board_id"), (A, 3, "save_without_board_id"), (A, 6, "save_without_board_id")))
case("logs/event_outside_day", "logs", "1 us before the day, next midnight, 2999, 1970",
     lambda: {A: logs(set={("event_ts", 1): D0 - timedelta(microseconds=1),
                           ("event_ts", 2): D0 + timedelta(days=1),
                           ("event_ts", 4): _dt(2999, 1, 1), ("event_ts", 5): _dt(1970, 1, 1)})},
     q(8, (A, 1, "event_ts_outside_day"), (A, 2, "event_ts_outside_day"), (A, 4, "event_ts_outside_day"),
       (A, 5, "event_ts_outside_day")))
case("logs/event_outside_day/zoned", "logs", "America/New_York 20:00 on the day (= next UTC day)",
     lambda: {A: logs(4, types={"event_ts": NY}, set={
         ("event_ts", 0): D0 + timedelta(hours=25),  # 20:00 local on the day: next UTC day
         ("event_ts", 1): D0 + timedelta(hours=23, minutes=59),
         ("event_ts", 2): D0,
         ("event_ts", 3): D0 - timedelta(hours=1)})},  # 19:00 local the evening before = 23:00 UTC before
     q(4, (A, 0, "event_ts_outside_day"), (A, 3, "event_ts_outside_day")))
case("logs/event_outside_day/overflows_us", "logs", "ms timestamps of +-2^62 (too large for us)",
     lambda: {A: logs(3, types={"event_ts": pa.array(
         [2**62, -(2**62), int(D0.timestamp()) * 1000 + 5], pa.timestamp("ms"))})},
     q(3, (A, 0, "event_ts_outside_day"), (A, 1, "event_ts_outside_day")))
case("logs/precedence", "logs", "row 3: user_id null AND action `like` AND outside the day",
     lambda: {A: logs(set={("user_id", 3): None, ("action", 3): "like", ("event_ts", 3): _dt(2000, 1, 1)})},
     q(8, (A, 3, "null_user_id")))

# ---- engagement logs: accepted shapes (nothing quarantined, exact counts)
case("logs/extra_columns", "logs", "extra struct, non-UTF-8 binary and `reason` columns",
     lambda: {A: logs(extra={"extra": pa.array([{"a": 1}] * 8), "blob": pa.array([b"\xff"] * 8),
                             "reason": pa.array(["x"] * 8)})},
     q(8))
case("logs/empty_file", "logs", "a 0-row file next to an 8-row file",
     lambda: {A: logs(), B: logs(0)},
     q(8))
case("logs/only_empty_file", "logs", "the day's only file has 0 rows",
     lambda: {A: logs(0)},
     q(0), asset=True)
case("logs/markers_and_stray_files", "logs", "`_SUCCESS`, `.crc`, `_tmp.parquet` junk, `README.txt`",
     lambda: {A: logs(), f"{LOGS}/_SUCCESS": b"", f"{LOGS}/.a.parquet.crc": b"junk",
              f"{LOGS}/_tmp.parquet": b"not parquet", f"{LOGS}/README.txt": b"hello"},
     q(8))
case("logs/empty_day_folder", "logs", "the `dt=D` folder exists and holds no file",
     lambda: {LOGS: Folder()},
     q(0), asset=True)
# The library lists a missing folder as no files; the asset refuses the day (opt-in: allow_missing_day).
case("logs/missing_day_folder", "logs", "no `dt=D` folder (engagement_logs/ exists)",
     lambda: {"engagement_logs/dt=2000-01-01/a.parquet": logs()},
     rej(LOGS, None, "does not exist", dg.Failure), asset=True, library=False)

# ---- engagement logs: any int64 id is an id (negative, 0, the extremes)
case("logs/ids/extreme_and_negative", "logs", "ids of int64 min/max, -1, 0 in every id column",
     lambda: {A: logs(set={("user_id", 0): I64_MIN, ("pin_id", 0): I64_MAX, ("board_id", 0): -1,
                           ("query_pin_id", 1): I64_MIN, ("user_id", 1): -1, ("pin_id", 1): 0,
                           ("board_id", 3): I64_MAX, ("pin_id", 3): -(2**40), ("query_pin_id", 5): -7})},
     q(8), asset=True)
case("logs/ids/uint32_max", "logs", "uint32 ids up to 2^32 - 1 (widened to int64)",
     lambda: {A: logs(types={"pin_id": pa.uint32()}, set={("pin_id", 2): 2**32 - 1})},
     q(8))

# ---- engagement logs: mixed schemas in one day folder
case("logs/mixed_schemas", "logs", "files with int16/int32/uint32 ids, ns/ms/naive ts, large_string, "
     "dictionary, null-typed and absent optional columns, extra columns; 3 bad rows",
     lambda: {
         A: logs(5, types={"user_id": pa.int32(), "pin_id": pa.int16(), "board_id": pa.uint32(),
                           "event_ts": pa.timestamp("ns", tz="UTC"), "action": pa.large_string()},
                 set={("surface", 2): "feed"}),
         B: logs(4, 5, types={"event_ts": pa.timestamp("ms"), "surface": DICT16,
                              "query_pin_id": pa.nulls(4)},
                 drop=("board_id",), extra={"country": pa.array(["fr"] * 4)}),  # row 1 (i=6) is a save
         Z: logs(3, 9, types={"event_ts": pa.timestamp("s", tz="+05:30")}, set={("pin_id", 0): None}),
     },
     q(12, (A, 2, "unknown_surface"), (B, 1, "save_without_board_id"), (Z, 0, "null_pin_id")), asset=True)
case("logs/mixed_schemas/one_file_wrong_type", "logs", "a.parquet fine, b.parquet has user_id as float64",
     lambda: {A: logs(), B: logs(types={"user_id": pa.array([1.0] * 8)})},
     rej(B, "user_id", "has type double"))

# ---- engagement logs: structurally unreadable files -> rejected naming the file (and column if any)
case("logs/zero_byte_file", "logs", "`b.parquet` of 0 bytes",
     lambda: {A: logs(), B: b""},
     rej(B, None, "zero bytes"), asset=True)
case("logs/truncated_file", "logs", "first half of a valid file",
     lambda: {A: logs(), B: Cut(logs(300), 3000)},
     rej(B, None, "cannot be opened as Parquet"), asset=True)
case("logs/footer_cut", "logs", "valid file minus its last 3 bytes",
     lambda: {B: Cut(logs(50), -3)},
     rej(B, None, "cannot be opened as Parquet"))
case("logs/magic_only", "logs", "just `PAR1`",
     lambda: {B: b"PAR1"},
     rej(B, None, "cannot be opened as Parquet"))
case("logs/not_parquet_csv", "logs", "a CSV file named .parquet",
     lambda: {B: b"event_ts,user_id,action\n2026-01-01T00:00:00,1,save\n"},
     rej(B, None, "cannot be opened as Parquet"))
case("logs/not_parquet_feather", "logs", "an Arrow IPC (Feather) file named .parquet",
     lambda: {B: Feather(logs())},
     rej(B, None, "cannot be opened as Parquet"))
case("logs/corrupt_column_data", "logs", "user_id pages overwritten, footer intact",
     lambda: {B: CorruptColumn(logs(400), 1)},
     rej(B, "user_id", "data cannot be decoded"))
case("logs/directory_named_parquet", "logs", "a folder `b.parquet/` (Spark-style output dir)",
     lambda: {A: logs(), B: Folder()},
     rej(B, None, "is not a regular file"))
case("logs/dangling_symlink", "logs", "`b.parquet` -> missing target",
     lambda: {A: logs(), B: Link("nowhere.parquet")},
     rej(B, None, "is not a regular file"))
case("logs/symlinked_file", "logs", "`b.parquet` -> a file outside the data root with 1 bad row",
     lambda: {"../outside.parquet": logs(set={("surface", 3): "x"}), B: Link("../outside.parquet")},
     q(8, (B, 3, "unknown_surface")))
case("logs/day_folder_is_a_file", "logs", "`dt=D` written as one Parquet file, not a folder",
     lambda: {LOGS: logs()},
     rej(LOGS, None, "is not a directory"), asset=True)
case("logs/engagement_logs_is_a_file", "logs", "`engagement_logs` is a file",
     lambda: {"engagement_logs": b"oops"},
     rej("engagement_logs", None, "is not a directory"), asset=True)
case("logs/missing_data_root", "logs", "OMNISAGE_DATA_ROOT does not exist",
     dict,
     rej("", None, "does not exist", FileNotFoundError), asset=True, library=False, no_root=True)

# ---- pins: bad rows -> quarantined
case("pins/null_id", "pins", "pin_id null",
     lambda: {P: pins(set={("pin_id", 2): None})},
     q(5, (P, 2, "null_pin_id")))
case("pins/nonfinite_vector", "pins", "vectors with NaN, +inf, -inf, a null element",
     lambda: {P: pins(7, set={(EMB, 1): [NAN, 1.0, 1.0], (EMB, 2): [1.0, INF, 1.0],
                             (EMB, 3): [1.0, 1.0, -INF], (EMB, 5): [1.0, None, 1.0]})},
     q(7, *((P, r, "nonfinite_image_embedding") for r in (1, 2, 3, 5)), image_dim=3), asset=True)
case("pins/nonfinite_vector/float64_overflow", "pins", "float64 vector with 1e300 (inf as float32)",
     lambda: {P: pins(types={"image_embedding": F64}, set={("image_embedding", 4): [1e300, 0.0, 0.0]})},
     q(5, (P, 4, "nonfinite_image_embedding"), image_dim=3))
case("pins/wrong_length_vector", "pins", "vectors of length 2, 4 and 0 (dim 3)",
     lambda: {P: pins(6, set={("image_embedding", 0): [1.0, 2.0], ("image_embedding", 2): [1.0] * 4,
                             ("image_embedding", 4): []})},
     q(6, *((P, r, "wrong_length_image_embedding") for r in (0, 2, 4)), image_dim=3))
case("pins/wrong_length_vector/per_file_dims", "pins", "p.parquet: dim 3 (2 rows), q.parquet: dim 4 (3 rows)",
     lambda: {P: pins(2), P2: pins(3, 2, set={("image_embedding", i): [1.0] * 4 for i in range(3)})},
     q(5, (P, 0, "wrong_length_image_embedding"), (P, 1, "wrong_length_image_embedding"), image_dim=4))
case("pins/wrong_length_wins_over_nan", "pins", "a NaN vector that is also too short",
     lambda: {P: pins(set={("image_embedding", 1): [NAN]})},
     q(5, (P, 1, "wrong_length_image_embedding")))
case("pins/duplicate_ids", "pins", "pin 1 three times across p/q.parquet, pin 2 twice",
     lambda: {P: pins(4, set={("pin_id", 2): 1, ("pin_id", 3): 2}), P2: pins(2, set={("pin_id", 0): 1,
                                                                                     ("pin_id", 1): 9})},
     q(6, (P, 0, "duplicate_pin_id"), (P, 1, "duplicate_pin_id"), (P, 2, "duplicate_pin_id")), asset=True)
case("pins/duplicate_ids/corrupt_last", "pins", "last copy of pin 1 has a NaN vector",
     lambda: {P: pins(3), P2: pins(1, set={("image_embedding", 0): [NAN, 0.0, 0.0]})},
     q(4, (P2, 0, "nonfinite_image_embedding")))
for _col in C.PIN_TEXT:
    case(f"pins/non_utf8/{_col}", "pins", f"{_col} bytes `caf\\xe9`",
         lambda _col=_col: {P: pins(set={(_col, 3): b"caf\xe9"})},
         q(5, (P, 3, f"invalid_utf8_{_col}")), asset=_col == "title")
case("pins/non_utf8/dictionary_title", "pins", "dictionary<int16, large_string> title, bytes `\\xff\\xfe`",
     lambda: {P: pins(set={("title", 3): b"\xff\xfe"},
                      types={"title": pa.dictionary(pa.int16(), pa.large_string())})},
     q(5, (P, 3, "invalid_utf8_title")))
case("pins/huge_text", "pins", "title of 1 MiB + 1 byte (exactly 1 MiB of `é` is kept)",
     lambda: {P: pins(set={("title", 1): "x" * (BIG + 1), ("title", 2): "é" * (BIG // 2)})},
     q(5, (P, 1, "text_too_long_title")))
case("pins/huge_text/non_utf8_wins", "pins", "a 2 MiB description that is also non-UTF-8",
     lambda: {P: pins(set={("description", 0): b"\xff" * (2 * BIG)})},
     q(5, (P, 0, "invalid_utf8_description")))
case("pins/huge_text/repeated_dictionary", "pins", "100 titles of 2 MiB from one dictionary entry (a file of a few KB)",
     lambda: {P: pins(100, types={"title": pa.DictionaryArray.from_arrays(
         pa.array(np.zeros(100, np.int32)), pa.array(["t" * (2 * BIG)]))})},
     q(100, *((P, i, "text_too_long_title") for i in range(100))), asset=True)
case("pins/ids/extreme_and_negative", "pins", "pin ids int64 min/max, -1, 0, -2^40",
     lambda: {P: pins(set={("pin_id", 0): I64_MIN, ("pin_id", 1): I64_MAX, ("pin_id", 2): -1,
                           ("pin_id", 3): 0, ("pin_id", 4): -(2**40)})},
     q(5), asset=True)
case("pins/ids/duplicate_extremes", "pins", "int64 min twice and -1 twice: the last copy kept",
     lambda: {P: pins(set={("pin_id", 0): I64_MIN, ("pin_id", 1): -1, ("pin_id", 2): I64_MIN,
                           ("pin_id", 3): -1})},
     q(5, (P, 0, "duplicate_pin_id"), (P, 1, "duplicate_pin_id")))
case("pins/no_vectors_at_all", "pins", "no image_embedding column in one file, all-null in another",
     lambda: {P: pins(drop=("image_embedding",)), P2: pins(2, 5, set={("image_embedding", 0): None,
                                                                      ("image_embedding", 1): None})},
     q(7, image_dim=0))
case("pins/missing_pins_folder", "pins", "no pins/ folder (boards/ present)",
     lambda: {BD: boards()},
     q(0), asset=True)

# ---- pins: structural -> rejected
case("pins/type/pin_id_string", "pins", "pin_id as string",
     lambda: {P: pins(types={"pin_id": pa.array([str(i) for i in range(5)])})},
     rej(P, "pin_id", "has type string"), asset=True)
case("pins/type/title_binary", "pins", "title as binary",
     lambda: {P: pins(types={"title": pa.array([b"t"] * 5, pa.binary())})},
     rej(P, "title", "has type binary"))
case("pins/type/vector_of_strings", "pins", "image_embedding as list<string>",
     lambda: {P: pins(types={"image_embedding": pa.array([["a"]] * 5)})},
     rej(P, "image_embedding", "has type list<element: string>"))
case("pins/type/vector_of_int", "pins", "image_embedding as list<int32>",
     lambda: {P: pins(types={"image_embedding": pa.array([[1, 2, 3]] * 5, pa.list_(pa.int32()))})},
     rej(P, "image_embedding", "has type list<element: int32>"))
case("pins/type/vector_float16", "pins", "image_embedding as list<float16>",
     lambda: {P: pins(types={"image_embedding": pa.array([[np.float16(1)]] * 5, pa.list_(pa.float16()))})},
     rej(P, "image_embedding", "halffloat"))
case("pins/type/vector_nested", "pins", "image_embedding as list<list<double>>",
     lambda: {P: pins(types={"image_embedding": pa.array([[[1.0]]] * 5)})},
     rej(P, "image_embedding", "list<element: list"))
# pyarrow >= 26 reads back a fixed_size_list with a null slot (apache/arrow#35692; the constraints file pins
# it): the null vector is a pin without an image, kept (contract._nonfinite_vectors, test below).
case("pins/type/fixed_size_vector_with_null", "pins", "fixed_size_list<float64, 3> with a null vector",
     lambda: {P: pins(types={"image_embedding": pa.FixedSizeListArray.from_arrays(
         pa.array([0.5] * 15), 3, mask=pa.array([False, True, False, False, False]))})},
     q(5, image_dim=3), asset=True)
case("pins/missing_id_column", "pins", "no pin_id column",
     lambda: {P: pins(drop=("pin_id",))},
     rej(P, "pin_id", "required column is missing"))
case("pins/pins_is_a_file", "pins", "`pins` is a file, not a folder",
     lambda: {"pins": b"PAR1", BD: boards()},
     rej("pins", None, "is not a directory"))

# ---- boards
case("boards/bad_rows", "boards", "null board_id, non-UTF-8 name, 1 MiB + 1 description, duplicate id",
     lambda: {BD: boards(6, set={("board_id", 1): None, ("name", 2): b"\xc3\x28",
                                 ("description", 3): "d" * (BIG + 1), ("board_id", 4): 50})},
     q(6, (BD, 1, "null_board_id"), (BD, 2, "invalid_utf8_name"), (BD, 3, "text_too_long_description"),
       (BD, 0, "duplicate_board_id")), asset=True)
case("boards/ids/extreme_and_negative", "boards", "board ids int64 min/max, -1, 0",
     lambda: {BD: boards(set={("board_id", 0): I64_MIN, ("board_id", 1): I64_MAX, ("board_id", 2): -1,
                              ("board_id", 3): 0})},
     q(4), asset=True)
case("boards/type/board_id_float", "boards", "board_id as float64",
     lambda: {BD: boards(types={"board_id": pa.array([1.0, 2.0, 3.0, 4.0])})},
     rej(BD, "board_id", "has type double"))
case("boards/missing_id_column", "boards", "no board_id column",
     lambda: {BD: boards(drop=("board_id",))},
     rej(BD, "board_id", "required column is missing"))


# fmt: on


# ------------------------------------------------------------------------------------------- harness


def _folder(root: Path, table: str) -> Path:
    return root / LOGS if table == "logs" else root / table


def _validate(root: Path, table: str) -> C.ValidationResult:
    files = C.list_parquet_files(_folder(root, table))
    if table == "logs":
        return C.validate_engagement_logs(files, DAY, root)
    return (C.validate_pins if table == "pins" else C.validate_boards)(files, root)


def _schemas(table: str) -> tuple[pa.Schema, pa.Schema]:
    return {
        "logs": (C.LOG_SCHEMA, C.LOG_QUARANTINE_SCHEMA),
        "pins": (C.PIN_SCHEMA, C.PIN_QUARANTINE_SCHEMA),
        "boards": (C.BOARD_SCHEMA, C.BOARD_QUARANTINE_SCHEMA),
    }[table]


def _assert_valid_rows_obey_the_contract(table: str, valid: pa.Table, image_dim: int | None) -> None:
    """Independent of the validator: every kept row satisfies every row rule of the contract."""
    assert valid.schema == _schemas(table)[0]
    valid.validate(full=True)  # includes UTF-8 validity of every kept string
    rows = valid.to_pylist()
    if table == "logs":
        lo, hi = D0, D0 + timedelta(days=1)
        for r in rows:
            assert all(r[c] is not None for c in C.LOG_REQUIRED), r
            assert r["action"] in C.ACTIONS and r["surface"] in C.SURFACES, r
            assert r["action"] != "save" or r["board_id"] is not None, r
            assert lo <= r["event_ts"] < hi, r
        return
    id_col = "pin_id" if table == "pins" else "board_id"
    ids = [r[id_col] for r in rows]
    assert None not in ids and len(set(ids)) == len(ids)
    for r in rows:
        for c in C.PIN_TEXT if table == "pins" else C.BOARD_TEXT:
            assert r[c] is None or len(r[c].encode()) <= C.MAX_TEXT_BYTES
        if table == "pins" and r["image_embedding"] is not None:
            v = np.asarray(r["image_embedding"], dtype=np.float64)
            assert len(v) == image_dim and len(v) > 0 and np.isfinite(v).all(), r["pin_id"]


def _assert_quarantine(table: str, quarantine: pa.Table, expect: Quarantined) -> None:
    assert quarantine.schema == _schemas(table)[1]
    quarantine.validate(full=True)  # invalid bytes were replaced: readable by every engine
    got = {
        (f, r): reason
        for f, r, reason in zip(
            quarantine.column("source_file").to_pylist(),
            quarantine.column("source_row").to_pylist(),
            quarantine.column("reason").to_pylist(),
            strict=True,
        )
    }
    assert len(got) == quarantine.num_rows  # one row per source row
    assert got == expect.reasons
    # A text value over MAX_TEXT_BYTES is stored cut, its length before the cut in original_bytes (the cut is
    # CUT_TEXT_BYTES bytes; U+FFFD for each invalid byte makes it at most 3 times that).
    original = quarantine.column("original_bytes").to_pylist()
    for f in quarantine.schema:
        if pa.types.is_string(f.type) and f.name not in ("reason", "source_file"):
            for value, cut in zip(quarantine.column(f.name).to_pylist(), original, strict=True):
                assert value is None or len(value.encode()) <= C.MAX_TEXT_BYTES
                was = dict(cut or {}).get(f.name)
                assert was is None or (was > C.MAX_TEXT_BYTES and len(value.encode()) <= 3 * C.CUT_TEXT_BYTES)


def _assert_rejected(exc: BaseException, root: Path, expect: Rejected) -> None:
    msg = str(exc)
    assert isinstance(exc, expect.error), repr(exc)
    path = root / expect.file if expect.file else root
    assert str(path) in msg, msg
    assert expect.says in msg, msg
    if expect.column is not None:
        assert f"'{expect.column}'" in msg, msg
        assert exc.column == expect.column
    elif isinstance(exc, ContractError):
        assert exc.column is None and exc.path == str(path)


@pytest.fixture
def data_root(omnisage_env, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(root))
    return root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fuzzed_input(case: Case, data_root: Path):
    if not case.no_root:
        data_root.mkdir()
        for rel, obj in case.files().items():
            _write(data_root, rel, obj)
    if case.library:
        _check_library(case, data_root)
    if case.asset:
        _check_asset(case, data_root)


def _check_library(case: Case, root: Path) -> None:
    expect = case.expect
    if isinstance(expect, Rejected):
        with pytest.raises(Exception) as err:
            _validate(root, case.table)
        _assert_rejected(err.value, root, expect)
        return
    result = _validate(root, case.table)
    n_bad = len(expect.reasons)
    assert (result.rows_read, result.rows_kept, result.rows_quarantined) == (
        expect.rows_in,
        expect.rows_in - n_bad,
        n_bad,
    )
    assert result.rows_read == result.rows_kept + result.rows_quarantined
    expected_counts = collections.Counter(expect.reasons.values())
    assert result.reason_counts == {r: expected_counts.get(r, 0) for r in result.reasons}
    assert set(expected_counts) <= set(result.reasons)
    _assert_quarantine(case.table, result.quarantine, expect)
    dim = result.extra.get("image_dim")
    if expect.image_dim is not None:
        assert dim == expect.image_dim
    _assert_valid_rows_obey_the_contract(case.table, result.valid, dim)


# ------------------------------------------------------------------------------------------ asset level


def _materialize(asset) -> dg.ExecuteInProcessResult:
    # Many cases are days made mostly of bad rows on purpose (they test the quarantine rules), so the
    # quarantine_share check is opened up here; tests/test_ingest.py tests the check itself.
    config = {"max_quarantine_fraction": 1.0} if asset.key == dg.AssetKey("engagement_logs") else None
    return dg.materialize(
        [asset],
        partition_key=DAY,
        resources={"storage": StorageResource.from_settings(Settings.from_env())},
        raise_on_error=False,
        run_config={"ops": {asset.key.to_user_string(): {"config": config}}} if config else None,
    )


def _failure(result) -> tuple[str, str]:
    """(class name, message incl. causes) of the failed step."""
    for event in result.all_events:
        if event.is_step_failure:
            err = event.step_failure_data.error
            names, texts = [], []
            while err is not None:
                names.append(err.cls_name or "")
                texts.append(err.message)
                err = err.cause
            return " ".join(names), "\n".join(texts)
    raise AssertionError("no step failure")


def _metadata(result, asset: str) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(asset)]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def _check_asset(case: Case, root: Path) -> None:
    asset_name = "engagement_logs" if case.table == "logs" else "entity_metadata"
    asset = engagement_logs if case.table == "logs" else entity_metadata
    settings = Settings.from_env()
    valid_ds, quarantine_ds = settings.warehouse_dataset(asset_name), settings.quarantine_dataset(asset_name)
    result = _materialize(asset)
    expect = case.expect
    if isinstance(expect, Rejected):
        assert not result.success
        cls, msg = _failure(result)
        assert expect.error.__name__ in cls, cls
        path = root / expect.file if expect.file else root
        assert str(path) in msg and expect.says in msg, msg
        if expect.column is not None:
            assert f"'{expect.column}'" in msg, msg
        assert published_path(valid_ds, DAY) is None and published_path(quarantine_ds, DAY) is None
        return

    assert result.success
    meta = _metadata(result, asset_name)
    n_bad = len(expect.reasons)
    prefix = "" if case.table == "logs" else f"{case.table}."
    assert (meta[f"{prefix}rows_read"], meta[f"{prefix}rows_kept"], meta[f"{prefix}rows_quarantined"]) == (
        expect.rows_in,
        expect.rows_in - n_bad,
        n_bad,
    )
    assert meta["rows_read"] == meta["rows_kept"] + meta["rows_quarantined"]
    for reason, count in collections.Counter(expect.reasons.values()).items():
        assert meta[f"{prefix}quarantined.{reason}"] == count
    check = {c.check_name: c for c in result.get_asset_check_evaluations()}["rows_accounted"]
    assert check.passed
    assert check.metadata["rows_published"].value == meta["rows_read"]

    valid_dir, quarantine_dir = published_path(valid_ds, DAY), published_path(quarantine_ds, DAY)
    sub = "" if case.table == "logs" else case.table
    valid = pq.read_table(valid_dir / sub)
    quarantine = pq.read_table(quarantine_dir / sub)
    assert valid.num_rows == expect.rows_in - n_bad
    _assert_quarantine(case.table, quarantine, expect)
    _assert_valid_rows_obey_the_contract(case.table, valid, meta.get("image_dim"))
    # The published quarantine is readable by the other engine too (invalid UTF-8 was replaced).
    files = [str(p) for p in C.list_parquet_files(quarantine_dir / sub)]
    reasons = duckdb.sql(f"SELECT reason FROM read_parquet({files!r})").fetchall()
    assert sorted(r for (r,) in reasons) == sorted(expect.reasons.values())
    if case.id == "logs/empty_day_folder":
        assert meta["day_folder_present"] is True
    if case.id == "pins/missing_pins_folder":
        assert meta["pins_folder_present"] is False and meta["boards.rows_read"] == 4


# --------------------------------------------------------------------------------- library-level extras


def test_the_table_covers_every_quarantine_reason_of_the_contract():
    """Every reason the validator can give is produced by at least one fuzz case."""
    produced = {r for c in CASES if isinstance(c.expect, Quarantined) for r in c.expect.reasons.values()}
    all_reasons = set(C.LOG_REASONS) | set(C.PIN_REASONS) | set(C.BOARD_REASONS)
    # invalid_utf8/text_too_long of the other text columns follow the same code path as the ones listed
    sampled_text = {r for r in all_reasons if r.startswith(("invalid_utf8_", "text_too_long_"))}
    assert all_reasons - sampled_text <= produced, sorted(all_reasons - sampled_text - produced)
    assert produced <= all_reasons
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [c for c in CASES if "/ids/" in c.id], ids=lambda c: c.id)
def test_any_int64_id_is_kept_exactly(case: Case, data_root: Path):
    """The contract allows any int64 id (negative, 0, the extremes): kept rows keep their ids bit for bit."""
    data_root.mkdir()
    (table,) = case.files().values()
    _write(data_root, next(iter(case.files())), table)
    result = _validate(data_root, case.table)
    dropped = {row for _, row in case.expect.reasons}
    for f in _schemas(case.table)[0]:
        if f.name.endswith("_id"):
            written = table.column(f.name).cast(pa.int64()).to_pylist()
            assert result.valid.column(f.name).to_pylist() == [v for i, v in enumerate(written) if i not in dropped]


def test_nonfinite_check_ignores_null_vectors_that_span_child_values():
    """A fixed_size_list null slot cast to a list keeps its child values (here a NaN); once pyarrow can read
    such files (apache/arrow#35692) they reach this check, which must neither crash nor flag the null."""
    fsl = pa.FixedSizeListArray.from_arrays(
        pa.array([1.0, 2.0, 3.0, NAN, 5.0, 6.0, 7.0, INF, 9.0, 1.0, 1.0, 1.0]),
        3,
        mask=pa.array([False, True, False, False]),
    )
    vectors = fsl.cast(F32)
    assert pc.list_value_length(vectors).to_pylist() == [3, None, 3, 3]
    chunked = pa.chunked_array([vectors.slice(0, 3), vectors.slice(3), vectors.slice(1, 2)])
    assert C._nonfinite_vectors(chunked).tolist() == [False, False, True, False, False, True]


def test_outcome_counts_for_the_readme():
    """The counts of the table in docs/reliability.md ("Fuzzed input") come from this table: keep them in step."""
    outcomes = collections.Counter(_outcome(c)[0] for c in CASES)
    assert outcomes["quarantined"] >= 20 and outcomes["rejected"] >= 20
    assert sum(outcomes.values()) == len(CASES)


def _outcome(c: Case) -> tuple[str, str]:
    e = c.expect
    if isinstance(e, Rejected):
        where = "the file" if e.file else "the data root"
        what = f"`{e.error.__name__}` naming {where}" + (f" and column `{e.column}`" if e.column else "")
        return "rejected", f"rejected: {what} ({e.says})"
    if not e.reasons:
        return "accepted", f"accepted: {e.rows_in} rows kept, 0 quarantined"
    reasons = ", ".join(f"`{r}` x{n}" for r, n in sorted(collections.Counter(e.reasons.values()).items()))
    kept = e.rows_in - len(e.reasons)
    return "quarantined", f"quarantined with {reasons} ({e.rows_in} in = {kept} kept + {len(e.reasons)})"


if __name__ == "__main__" and os.environ.get("FUZZ_README"):
    # FUZZ_README=1 python tests/pipeline/test_fuzz_input.py  -> the table of docs/reliability.md, "Fuzzed input"
    print("| kind | example | outcome |\n| --- | --- | --- |")
    for c in CASES:
        print(f"| `{c.id}`{' (asset)' if c.asset else ''} | {c.example} | {_outcome(c)[1]} |")
    print(dict(collections.Counter(_outcome(c)[0] for c in CASES)))
