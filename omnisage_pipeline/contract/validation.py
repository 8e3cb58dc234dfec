"""The input data contract (README, "Data contract", "Input"): schemas, accepted widenings, row rules, quarantine.

Plain pyarrow / numpy library (no Dagster): the ingest assets call it and publish what it returns; the
benchmarks and the fuzz tests call it directly.

Reading (one file at a time, files in sorted name order; names starting with ``.`` or ``_`` are hidden
files of Hadoop/Spark writers and are skipped):

* A file that is not Parquet, has zero bytes, is truncated, or whose data cannot be decoded raises
  :class:`ContractError` naming the file (and the column when one column's data is the culprit).
* A *required column* missing (logs: event_ts, user_id, action, surface, pin_id; pins: pin_id; boards:
  board_id) raises :class:`ContractError` naming file and column. The other contract columns are optional
  columns: absent means all null (logs: board_id, query_pin_id - then every save is quarantined as
  ``save_without_board_id``; pins: title, description, image_embedding, segment; boards: name,
  description). A data set with no image vectors at all is valid.
* A column whose type is not the contract type or an accepted widening raises :class:`ContractError`
  naming file, column and type. Accepted widenings (normalised to the warehouse schema):

  - ids: any signed integer (int8/16/32/64) and uint8/16/32 (all lossless) -> int64;
  - timestamps: any unit, any time zone or none (tz-naive is read as UTC; a zoned timestamp is an instant,
    so converting it to UTC is exact) -> timestamp[us, UTC]. ns values are floored to us; an s/ms value
    too large for us is stored as null (it is far outside the day and quarantined for that);
  - strings: string, large_string, string_view, dictionary<int, string-like> -> string;
  - image vectors: list / large_list / fixed_size_list of float32 or float64 -> list<float32>;
  - a column of Arrow type ``null`` (all values null, e.g. written by pandas) for any contract column.

  Binary (non-UTF-8-annotated) text columns, float ids, string timestamps, uint64 ids are rejected.
  Extra columns are ignored (never read). Files of one folder may have different (accepted) schemas.

Row rules. A row gets the reason of the FIRST rule it fails, in the order the tuples below list them
(the precedence); a quarantined row is stored with its normalised values plus ``reason``,
``source_file`` (path relative to the data root) and ``source_row`` (0-based row in that file).

* engagement logs (:data:`LOG_REASONS`): null_event_ts, null_user_id, null_action, null_surface,
  null_pin_id (a null required field, in column order), unknown_action, unknown_surface,
  save_without_board_id, event_ts_outside_day (outside [D 00:00, D+1 00:00) UTC). A non-UTF-8 or huge
  action/surface is simply unknown. board_id of a non-save row and query_pin_id are not checked.
* pins (:data:`PIN_REASONS`) and boards (:data:`BOARD_REASONS`): null id; invalid_utf8_<column> (text
  that is not valid UTF-8); text_too_long_<column> (more than :data:`MAX_TEXT_BYTES` bytes); for pins
  wrong_length_image_embedding then nonfinite_image_embedding (NaN, +-inf, a null element, or a float64
  value that overflows float32); last duplicate_<entity>_id.

  Non-UTF-8 and huge text are quarantined rather than repaired: repairing would silently change a row,
  and a 1 MiB title is a broken export, not a title. (In the quarantine table itself, invalid bytes are
  replaced by U+FFFD so that the quarantine stays readable by every engine.)

  The fixed vector length of a data set (:func:`vector_length`) is the most common length among its
  non-null, non-empty vectors (ties: the shorter length); an empty list is always wrong-length (a pin
  without an image has a null vector). With no vectors at all the image dimension is 0 and every
  image_embedding is null.

  Duplicates: the rules above run first; among the rows that pass them, for each id the row kept is the
  last one in file-name then row order, the earlier ones are quarantined as duplicate_<entity>_id. (So a
  corrupt newer row does not erase a valid older one: it is quarantined for its own reason and the last
  valid row is kept.)

Row accounting is exact and checked here: rows read (from the Parquet footers) == rows kept + rows
quarantined, else :class:`AccountingError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ACTIONS = ("save", "click", "closeup")
SURFACES = ("homefeed", "related_pins", "search", "board")

#: Text values longer than this (bytes) are quarantined as text_too_long_<column>.
MAX_TEXT_BYTES = 1 << 20

TS_TYPE = pa.timestamp("us", tz="UTC")
VECTOR_TYPE = pa.list_(pa.float32())

#: Warehouse schemas (helpers_spec "Warehouse layouts").
LOG_SCHEMA = pa.schema(
    [
        pa.field("event_ts", TS_TYPE),
        pa.field("user_id", pa.int64()),
        pa.field("action", pa.string()),
        pa.field("surface", pa.string()),
        pa.field("pin_id", pa.int64()),
        pa.field("board_id", pa.int64()),
        pa.field("query_pin_id", pa.int64()),
    ]
)
PIN_SCHEMA = pa.schema(
    [
        pa.field("pin_id", pa.int64()),
        pa.field("title", pa.string()),
        pa.field("description", pa.string()),
        pa.field("image_embedding", VECTOR_TYPE),
        pa.field("segment", pa.string()),
    ]
)
BOARD_SCHEMA = pa.schema(
    [
        pa.field("board_id", pa.int64()),
        pa.field("name", pa.string()),
        pa.field("description", pa.string()),
    ]
)

_PROVENANCE = [
    pa.field("reason", pa.string()),
    pa.field("source_file", pa.string()),
    pa.field("source_row", pa.int64()),
]


def quarantine_schema(schema: pa.Schema) -> pa.Schema:
    """A quarantine table: the warehouse columns plus reason, source_file, source_row."""
    return pa.schema(list(schema) + _PROVENANCE)


LOG_QUARANTINE_SCHEMA = quarantine_schema(LOG_SCHEMA)
PIN_QUARANTINE_SCHEMA = quarantine_schema(PIN_SCHEMA)
BOARD_QUARANTINE_SCHEMA = quarantine_schema(BOARD_SCHEMA)

LOG_REQUIRED = ("event_ts", "user_id", "action", "surface", "pin_id")

#: Quarantine reasons in precedence order (a row gets the first one it fails).
LOG_REASONS: tuple[str, ...] = (
    *(f"null_{c}" for c in LOG_REQUIRED),
    "unknown_action",
    "unknown_surface",
    "save_without_board_id",
    "event_ts_outside_day",
)


def _entity_reasons(entity: str, text_columns: Sequence[str], vectors: bool) -> tuple[str, ...]:
    reasons = [f"null_{entity}_id"]
    reasons += [f"invalid_utf8_{c}" for c in text_columns]
    reasons += [f"text_too_long_{c}" for c in text_columns]
    if vectors:
        reasons += ["wrong_length_image_embedding", "nonfinite_image_embedding"]
    reasons.append(f"duplicate_{entity}_id")
    return tuple(reasons)


PIN_TEXT = ("title", "description", "segment")
BOARD_TEXT = ("name", "description")
PIN_REASONS = _entity_reasons("pin", PIN_TEXT, vectors=True)
BOARD_REASONS = _entity_reasons("board", BOARD_TEXT, vectors=False)


class ContractError(ValueError):
    """Structurally unreadable input: the message names the file (and the column when there is one)."""

    def __init__(self, path: Path | str, message: str, column: str | None = None):
        self.path = str(path)
        self.column = column
        where = f"{self.path}" + (f", column '{column}'" if column else "")
        super().__init__(f"{where}: {message}")


class AccountingError(RuntimeError):
    """rows read != rows kept + rows quarantined: a bug, never bad input."""


# --------------------------------------------------------------------------------------------------
# Column kinds: what each contract column accepts and how it is normalised.


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "id" | "timestamp" | "string" | "vector"
    required: bool  # required column: its absence is a ContractError


LOG_COLUMNS = (
    Column("event_ts", "timestamp", True),
    Column("user_id", "id", True),
    Column("action", "string", True),
    Column("surface", "string", True),
    Column("pin_id", "id", True),
    Column("board_id", "id", False),
    Column("query_pin_id", "id", False),
)
PIN_COLUMNS = (
    Column("pin_id", "id", True),
    Column("title", "string", False),
    Column("description", "string", False),
    Column("image_embedding", "vector", False),
    Column("segment", "string", False),
)
BOARD_COLUMNS = (
    Column("board_id", "id", True),
    Column("name", "string", False),
    Column("description", "string", False),
)

_ID_TYPES = (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32())
_EXPECTED = {
    "id": "int64 (or int8/int16/int32/uint8/uint16/uint32)",
    "timestamp": "timestamp of any unit, with or without time zone",
    "string": "string (or large_string/string_view/dictionary of strings)",
    "vector": "list<float32> (or list/large_list/fixed_size_list of float32/float64)",
}


def _is_string_like(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _accepts(kind: str, t: pa.DataType) -> bool:
    if pa.types.is_null(t):
        return True
    if kind == "id":
        return any(t == x for x in _ID_TYPES)
    if kind == "timestamp":
        return pa.types.is_timestamp(t)
    if kind == "string":
        if pa.types.is_dictionary(t):
            return _is_string_like(t.value_type)
        return _is_string_like(t)
    if kind == "vector":
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return pa.types.is_float32(t.value_type) or pa.types.is_float64(t.value_type)
        return False
    raise AssertionError(kind)


_TARGET = {"id": pa.int64(), "timestamp": TS_TYPE, "string": pa.string(), "vector": VECTOR_TYPE}
_UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass
class _Timestamps:
    """event_ts normalised to us/UTC, plus what the day rule needs, computed in the source unit so that
    a value too large for microseconds is still judged exactly."""

    values: pa.Array
    in_day: np.ndarray  # bool; False for nulls
    null: np.ndarray  # bool; null in the source (not: too large for microseconds)


def _normalise_timestamps(arr: pa.Array, day: date | None) -> _Timestamps:
    n = len(arr)
    if pa.types.is_null(arr.type):
        return _Timestamps(pa.nulls(n, TS_TYPE), np.zeros(n, dtype=bool), np.ones(n, dtype=bool))
    unit = arr.type.unit
    per_s = _UNIT_PER_SECOND[unit]
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    # Arrow stores zoned timestamps as UTC instants: the int64 view is the UTC time in `unit`.
    raw = arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if per_s >= 1_000_000:
        us = np.floor_divide(raw, per_s // 1_000_000)
        overflow = np.zeros(n, dtype=bool)
    else:
        factor = 1_000_000 // per_s
        limit = np.iinfo(np.int64).max // factor
        overflow = np.abs(raw) > limit
        us = np.where(overflow, 0, raw) * factor
    values = pa.array(us, type=TS_TYPE, mask=~valid | overflow)
    if day is None:
        in_day = valid.copy()
    else:
        start_s = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
        lo, hi = start_s * per_s, (start_s + 86_400) * per_s
        in_day = valid & (raw >= lo) & (raw < hi)
    return _Timestamps(values, in_day, ~valid)


def _normalise(column: Column, arr: pa.Array) -> pa.Array:
    target = _TARGET[column.kind]
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), target)
    if column.kind == "string" and pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if column.kind == "vector":
        # list<float64> -> list<float32> may overflow to inf: caught by the finiteness rule afterwards.
        return pc.cast(arr, target, safe=False)
    return pc.cast(arr, target)


# --------------------------------------------------------------------------------------------------
# Reading


def list_parquet_files(folder: Path) -> list[Path]:
    """The contract's ``*.parquet`` files of a folder, sorted by name; hidden (``.``/``_``) names skipped.
    A missing folder has no files (for a day folder: a valid empty partition); a folder (or one of its
    parents) that exists but is not a directory, e.g. a day written as one file named ``dt=D``, raises
    :class:`ContractError`."""
    folder = Path(folder)
    if not folder.is_dir():
        # A file (or dangling link) where a folder belongs - the folder itself, e.g. a day written as one file
        # named dt=D, or a parent such as engagement_logs/ - is not a missing folder: never an empty partition.
        for p in (folder, *folder.parents):
            if (p.exists() or p.is_symlink()) and not p.is_dir():
                raise ContractError(p, "is not a directory (expected a folder of Parquet files)")
        return []
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise ContractError(folder, f"cannot be listed: {exc.strerror or exc}") from None
    files = sorted(
        (p for p in entries if p.name.endswith(".parquet") and not p.name.startswith((".", "_"))),
        key=lambda p: p.name,
    )
    for p in files:
        if not p.is_file():
            raise ContractError(p, "is not a regular file (expected one Parquet file)")
    return files


def _open(path: Path) -> pq.ParquetFile:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ContractError(path, f"cannot be read: {exc.strerror or exc}") from None
    if size == 0:
        raise ContractError(path, "is empty (zero bytes), not a Parquet file")
    try:
        return pq.ParquetFile(path, memory_map=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ContractError(
            path, f"cannot be opened as Parquet (not Parquet, truncated or unreadable): {exc}"
        ) from None


@dataclass
class _FileTable:
    columns: dict[str, pa.Array]  # normalised, one per contract column
    timestamps: _Timestamps | None
    num_rows: int


def _read_file(path: Path, spec: Sequence[Column], day: date | None) -> _FileTable:
    pf = _open(path)
    schema = pf.schema_arrow
    names = set(schema.names)
    for col in spec:
        if schema.names.count(col.name) > 1:
            raise ContractError(path, "column appears more than once", col.name)
    for col in spec:
        if col.required and col.name not in names:
            present = ", ".join(schema.names) or "none"
            raise ContractError(path, f"required column is missing (columns present: {present})", col.name)
    for col in spec:
        if col.name in names:
            t = schema.field(col.name).type
            if not _accepts(col.kind, t):
                raise ContractError(path, f"has type {t}, which is not {_EXPECTED[col.kind]}", col.name)
    wanted = [c.name for c in spec if c.name in names]
    dict_text = [
        c.name
        for c in spec
        if c.kind == "string" and c.name in names and pa.types.is_dictionary(schema.field(c.name).type)
    ]
    if dict_text:
        # Without read_dictionary, Arrow validates UTF-8 while decoding a dictionary<string> column and fails
        # the whole file; with it, invalid values come through and are quarantined like plain strings.
        pf = pq.ParquetFile(path, memory_map=False, read_dictionary=dict_text)
    footer_rows = pf.metadata.num_rows
    try:
        table = pf.read(columns=wanted, use_threads=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        # Name the column whose data is broken: retry one column at a time.
        for name in wanted:
            try:
                pf.read(columns=[name], use_threads=False)
            except (pa.ArrowException, OSError, ValueError) as col_exc:
                raise ContractError(path, f"data cannot be decoded: {col_exc}", name) from None
        raise ContractError(path, f"data cannot be decoded: {exc}") from None
    if table.num_rows != footer_rows:
        raise ContractError(path, f"footer says {footer_rows} rows but {table.num_rows} were decoded")
    n = table.num_rows
    columns: dict[str, pa.Array] = {}
    timestamps = None
    for col in spec:
        if col.name not in names:
            columns[col.name] = pa.nulls(n, _TARGET[col.kind])
            if col.kind == "timestamp":
                timestamps = _Timestamps(columns[col.name], np.zeros(n, dtype=bool), np.ones(n, dtype=bool))
            continue
        arr = table.column(col.name).combine_chunks()
        try:
            if col.kind == "timestamp":
                timestamps = _normalise_timestamps(arr, day)
                columns[col.name] = timestamps.values
            else:
                columns[col.name] = _normalise(col, arr)
        except (pa.ArrowException, ValueError) as exc:
            raise ContractError(
                path, f"cannot be converted to {_TARGET[col.kind]}: {exc}", col.name
            ) from None
    return _FileTable(columns, timestamps, n)


@dataclass
class _Input:
    """All files of one input table, normalised and concatenated in file-name then row order."""

    table: pa.Table
    in_day: np.ndarray | None  # timestamp inside the day (tables with a timestamp column)
    ts_null: np.ndarray | None  # timestamp null in the source
    file_index: np.ndarray  # int32 per row
    source_row: np.ndarray  # int64 per row
    files: list[str]  # relative names
    rows_read: int  # sum of the footers' row counts


def _read_all(
    files: Sequence[Path], spec: Sequence[Column], schema: pa.Schema, root: Path | None, day: date | None
) -> _Input:
    parts: list[pa.Table] = []
    in_day: list[np.ndarray] = []
    ts_null: list[np.ndarray] = []
    file_index: list[np.ndarray] = []
    source_row: list[np.ndarray] = []
    names: list[str] = []
    rows_read = 0
    for i, path in enumerate(files):
        ft = _read_file(Path(path), spec, day)
        parts.append(pa.table([ft.columns[f.name] for f in schema], schema=schema))
        if ft.timestamps is not None:
            in_day.append(ft.timestamps.in_day)
            ts_null.append(ft.timestamps.null)
        file_index.append(np.full(ft.num_rows, i, dtype=np.int32))
        source_row.append(np.arange(ft.num_rows, dtype=np.int64))
        names.append(_relative(Path(path), root))
        rows_read += ft.num_rows
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    return _Input(
        table=table,
        in_day=np.concatenate(in_day) if in_day else (np.zeros(0, dtype=bool) if day is not None else None),
        ts_null=np.concatenate(ts_null)
        if ts_null
        else (np.zeros(0, dtype=bool) if day is not None else None),
        file_index=np.concatenate(file_index) if file_index else np.zeros(0, dtype=np.int32),
        source_row=np.concatenate(source_row) if source_row else np.zeros(0, dtype=np.int64),
        files=names,
        rows_read=rows_read,
    )


def _relative(path: Path, root: Path | None) -> str:
    if root is not None:
        # Lexical first: a symlinked file is named as it was listed, not by its target.
        for p, r in ((Path(path).absolute(), Path(root).absolute()), (path.resolve(), Path(root).resolve())):
            try:
                return p.relative_to(r).as_posix()
            except ValueError:
                pass
    return str(path)


# --------------------------------------------------------------------------------------------------
# Vectorised row checks


def _np_mask(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean Arrow result as numpy, nulls counted as False."""
    return pc.fill_null(arr, False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


def _null_mask(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return _np_mask(pc.is_null(arr))


def invalid_utf8_rows(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Rows of a string column whose bytes are not valid UTF-8 (the Parquet reader does not check).

    Fast path: Arrow's own full validation per chunk. Only a chunk that fails is classified byte by byte
    (vectorised numpy, RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF)."""
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    out = []
    for chunk in chunks:
        try:
            chunk.validate(full=True)
            out.append(np.zeros(len(chunk), dtype=bool))
        except pa.ArrowInvalid:
            out.append(_invalid_utf8_chunk(chunk))
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def _invalid_utf8_chunk(chunk: pa.Array) -> np.ndarray:
    n = len(chunk)
    if n == 0:
        return np.zeros(0, dtype=bool)
    chunk = chunk.cast(pa.large_string()) if not pa.types.is_large_string(chunk.type) else chunk
    bufs = chunk.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[chunk.offset : chunk.offset + n + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    start = int(offsets[0])
    b = data[start : int(offsets[-1])]
    m = len(b)
    lengths = np.diff(offsets)
    row_of = np.repeat(np.arange(n), lengths)
    row_end = (offsets[1:] - start)[row_of]  # exclusive end of each byte's row
    pos = np.arange(m, dtype=np.int64)

    is_cont = (b & 0xC0) == 0x80
    seq = np.zeros(m, dtype=np.int64)  # sequence length announced by a lead byte; 0 = continuation
    seq[b < 0x80] = 1
    seq[(b >= 0xC2) & (b <= 0xDF)] = 2
    seq[(b >= 0xE0) & (b <= 0xEF)] = 3
    seq[(b >= 0xF0) & (b <= 0xF4)] = 4
    bad = (~is_cont) & (seq == 0)  # C0, C1, F5..FF never appear in UTF-8
    lead = seq >= 2
    bad |= lead & (pos + seq > row_end)  # sequence runs past the end of its value
    ok_lead = lead & ~bad
    covered = np.zeros(m, dtype=bool)
    for k in (1, 2, 3):
        has_k = ok_lead & (seq > k)
        idx = pos[has_k] + k
        not_cont = ~is_cont[idx]
        bad[pos[has_k][not_cont]] = True
        covered[idx] = True
    # Second-byte ranges that exclude overlongs (E0, F0), surrogates (ED) and > U+10FFFF (F4).
    nxt = np.zeros(m, dtype=np.uint8)
    nxt[:-1] = b[1:]
    bad |= ok_lead & (b == 0xE0) & (nxt < 0xA0)
    bad |= ok_lead & (b == 0xED) & (nxt > 0x9F)
    bad |= ok_lead & (b == 0xF0) & (nxt < 0x90)
    bad |= ok_lead & (b == 0xF4) & (nxt > 0x8F)
    bad |= is_cont & ~covered  # a stray continuation byte
    rows = np.zeros(n, dtype=bool)
    rows[row_of[bad]] = True
    return rows & chunk.is_valid().to_numpy(zero_copy_only=False)


def repair_utf8(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Replace invalid UTF-8 by U+FFFD (only for the quarantine table, so every engine can read it).
    Python decoding touches only the invalid rows."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    bad = invalid_utf8_rows(arr)
    if not bad.any():
        return arr
    raw = arr.cast(pa.large_string()).view(pa.large_binary()).filter(pa.array(bad)).to_pylist()
    fixed = pa.array([r.decode("utf-8", "replace") for r in raw], type=arr.type)
    return pc.replace_with_mask(arr, pa.array(bad), fixed)


def vector_length(vectors: pa.ChunkedArray | pa.Array) -> int:
    """The data set's fixed image-vector length: the most common length among non-null, non-empty
    vectors (ties: the shorter); 0 when there are none."""
    lengths = pc.list_value_length(vectors).drop_null().to_numpy(zero_copy_only=False)
    lengths = lengths[lengths > 0]
    if lengths.size == 0:
        return 0
    values, counts = np.unique(lengths, return_counts=True)
    return int(values[np.argmax(counts)])  # argmax takes the first (shortest) of tied maxima


def _nonfinite_vectors(vectors: pa.ChunkedArray) -> np.ndarray:
    """Rows whose vector holds a NaN, an inf or a null element (per-row any() via list_parent_indices).

    A null vector is never non-finite, even when its slot spans child values (a fixed_size_list null slot
    cast to a list keeps them; list_flatten would skip them but list_parent_indices does not)."""
    out = []
    for chunk in vectors.chunks:
        n = len(chunk)
        offsets = chunk.offsets.to_numpy(zero_copy_only=False)
        flat = chunk.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))  # aligned with parent
        parent = pc.list_parent_indices(chunk).to_numpy(zero_copy_only=False)
        bad_value = ~_np_mask(pc.is_finite(flat))  # NaN, inf and null elements are all not-finite
        rows = np.zeros(n, dtype=bool)
        rows[parent[bad_value]] = True
        out.append(rows & chunk.is_valid().to_numpy(zero_copy_only=False))
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def _assign_reasons(n: int, rules: Iterable[tuple[str, np.ndarray]], reasons: Sequence[str]) -> np.ndarray:
    """Reason code per row (0 = valid, i = reasons[i-1]): first failing rule wins."""
    code = np.zeros(n, dtype=np.int16)
    for name, mask in rules:
        i = reasons.index(name) + 1
        code[(code == 0) & mask] = i
    return code


def _last_occurrence_duplicates(ids: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Among candidate rows, every row whose id appears again later (the last occurrence is kept)."""
    idx = np.flatnonzero(candidate)
    dup = np.zeros(len(ids), dtype=bool)
    if idx.size == 0:
        return dup
    rev = ids[idx][::-1]
    _, first_in_rev = np.unique(rev, return_index=True)
    keep = np.zeros(idx.size, dtype=bool)
    keep[idx.size - 1 - first_in_rev] = True
    dup[idx[~keep]] = True
    return dup


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class ValidationResult:
    """Validated rows (warehouse schema) and quarantined rows (+ reason, source_file, source_row)."""

    name: str
    valid: pa.Table
    quarantine: pa.Table
    rows_read: int
    files: list[str]
    reasons: tuple[str, ...]
    reason_counts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def rows_kept(self) -> int:
        return self.valid.num_rows

    @property
    def rows_quarantined(self) -> int:
        return self.quarantine.num_rows

    def summary(self) -> dict[str, object]:
        return {
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_quarantined": self.rows_quarantined,
            "reason_counts": dict(self.reason_counts),
            "files": list(self.files),
            **self.extra,
        }


def _split(
    name: str,
    inp: _Input,
    code: np.ndarray,
    reasons: Sequence[str],
    qschema: pa.Schema,
    extra: dict[str, object] | None = None,
) -> ValidationResult:
    table = inp.table
    keep = code == 0
    valid = table.filter(pa.array(keep))
    qidx = np.flatnonzero(~keep)
    quarantined = table.take(pa.array(qidx, type=pa.int64()))
    reason_names = pa.array(["", *reasons], type=pa.string())
    files = pa.array(inp.files, type=pa.string())
    qcols = []
    for f in table.schema:
        col = quarantined.column(f.name)
        if pa.types.is_string(f.type):
            col = repair_utf8(col)
        qcols.append(col)
    qcols += [
        reason_names.take(pa.array(code[qidx].astype(np.int32))),
        files.take(pa.array(inp.file_index[qidx])) if len(files) else pa.array([], pa.string()),
        pa.array(inp.source_row[qidx], type=pa.int64()),
    ]
    quarantine = pa.table(qcols, schema=qschema)
    counts = np.bincount(code, minlength=len(reasons) + 1)
    result = ValidationResult(
        name=name,
        valid=valid.combine_chunks(),
        quarantine=quarantine,
        rows_read=inp.rows_read,
        files=inp.files,
        reasons=tuple(reasons),
        reason_counts={r: int(counts[i + 1]) for i, r in enumerate(reasons)},
        extra=extra or {},
    )
    check_accounting(result)
    return result


def check_accounting(result: ValidationResult) -> None:
    if result.rows_read != result.rows_kept + result.rows_quarantined:
        raise AccountingError(
            f"{result.name}: rows read {result.rows_read} != kept {result.rows_kept} + "
            f"quarantined {result.rows_quarantined}"
        )
    if sum(result.reason_counts.values()) != result.rows_quarantined:
        raise AccountingError(f"{result.name}: per-reason counts do not add up to the quarantined rows")


# --------------------------------------------------------------------------------------------------
# Public validators


def _as_date(day: date | str) -> date:
    return day if isinstance(day, date) else date.fromisoformat(day)


def validate_engagement_logs(
    files: Sequence[Path], day: date | str, root: Path | None = None
) -> ValidationResult:
    """Validate one day folder's files (already sorted) against the contract's log rules."""
    day = _as_date(day)
    inp = _read_all(files, LOG_COLUMNS, LOG_SCHEMA, root, day)
    t = inp.table
    action, surface = t.column("action"), t.column("surface")
    is_save = _np_mask(pc.equal(action, "save"))
    # event_ts: null in the source (a value too large for microseconds is stored null but is not "null").
    rules = [("null_event_ts", inp.ts_null)]
    rules += [(f"null_{c}", _null_mask(t.column(c))) for c in LOG_REQUIRED if c != "event_ts"]
    rules += [
        ("unknown_action", ~_np_mask(pc.is_in(action, value_set=pa.array(ACTIONS)))),
        ("unknown_surface", ~_np_mask(pc.is_in(surface, value_set=pa.array(SURFACES)))),
        ("save_without_board_id", is_save & _null_mask(t.column("board_id"))),
        ("event_ts_outside_day", ~inp.in_day),
    ]
    code = _assign_reasons(t.num_rows, rules, LOG_REASONS)
    return _split("engagement_logs", inp, code, LOG_REASONS, LOG_QUARANTINE_SCHEMA, {"day": day.isoformat()})


def _validate_entities(
    entity: str,
    files: Sequence[Path],
    root: Path | None,
    spec: Sequence[Column],
    schema: pa.Schema,
    qschema: pa.Schema,
    text_columns: Sequence[str],
    reasons: Sequence[str],
) -> ValidationResult:
    inp = _read_all(files, spec, schema, root, None)
    t = inp.table
    n = t.num_rows
    id_col = f"{entity}_id"
    rules: list[tuple[str, np.ndarray]] = [(f"null_{id_col}", _null_mask(t.column(id_col)))]
    rules += [(f"invalid_utf8_{c}", invalid_utf8_rows(t.column(c))) for c in text_columns]
    rules += [
        (f"text_too_long_{c}", _np_mask(pc.greater(pc.binary_length(t.column(c)), MAX_TEXT_BYTES)))
        for c in text_columns
    ]
    extra: dict[str, object] = {}
    if "image_embedding" in schema.names:
        vectors = t.column("image_embedding")
        dim = vector_length(vectors)
        lengths = pc.list_value_length(vectors)
        # An empty list is never a vector (a pin without an image has a null one), even when dim == 0.
        wrong = _np_mask(pc.not_equal(lengths, dim)) | _np_mask(pc.equal(lengths, 0))
        rules.append(("wrong_length_image_embedding", wrong))
        rules.append(("nonfinite_image_embedding", _nonfinite_vectors(vectors)))
        extra["image_dim"] = dim
    code = _assign_reasons(n, rules, reasons)
    ids = t.column(id_col).fill_null(0).to_numpy(zero_copy_only=False)
    dup = _last_occurrence_duplicates(ids, code == 0)
    code[dup] = reasons.index(f"duplicate_{id_col}") + 1
    return _split(entity + "s", inp, code, reasons, qschema, extra)


def validate_pins(files: Sequence[Path], root: Path | None = None) -> ValidationResult:
    return _validate_entities(
        "pin", files, root, PIN_COLUMNS, PIN_SCHEMA, PIN_QUARANTINE_SCHEMA, PIN_TEXT, PIN_REASONS
    )


def validate_boards(files: Sequence[Path], root: Path | None = None) -> ValidationResult:
    return _validate_entities(
        "board", files, root, BOARD_COLUMNS, BOARD_SCHEMA, BOARD_QUARANTINE_SCHEMA, BOARD_TEXT, BOARD_REASONS
    )


# --------------------------------------------------------------------------------------------------
# Writing (into a directory the caller gives: the assets wrap these in publish_partition)

PART_NAME = "part-00000.parquet"


def write_table(table: pa.Table, out_dir: Path, name: str = PART_NAME) -> Path:
    """One Parquet file, written even when the table is empty (readers get a typed, empty table)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    pq.write_table(table, path, compression="zstd", row_group_size=256 * 1024)
    return path


def count_rows(folder: Path) -> int:
    """Rows of the Parquet files in a published folder, from their footers (an independent recount)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in list_parquet_files(folder))


def summary_json(result: ValidationResult) -> str:
    return json.dumps(result.summary(), sort_keys=True)
