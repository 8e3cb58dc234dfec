"""Reading the contract's input files (README, "Data contract", "Input"; the rules are documented in
``omnisage_pipeline.contract.validation``): folder listing, per-file schema checks, accepted widenings, and the
normalisation of every contract column to the warehouse types. Plain pyarrow / numpy (no Dagster).

A file is read one row group at a time, its text columns as Arrow dictionaries: a dictionary-encoded value is
judged once and a value over MAX_TEXT_BYTES is cut (``omnisage_pipeline.contract.text``) before it is expanded
to the rows that repeat it. What one file may decode to is bounded (:func:`decoded_budget`): the non-text
columns are sized from the footer before anything is read, the text from its (cut) dictionary before it is
decoded, and a file over the bound is refused with a :class:`ContractError` naming the file and the column
(a decompression bomb or a broken export, never an out-of-memory kill).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from omnisage_pipeline.contract.text import Cuts, cut_long_text

TS_TYPE = pa.timestamp("us", tz="UTC")
VECTOR_TYPE = pa.list_(pa.float32())

#: What one input file may decode to: the larger of MIN_DECODED_BYTES and DECODED_BYTES_PER_FILE_BYTE times
#: its size on disk (a real export decodes to a few times its size; a 1 KB file of 100 repeated 2 MiB
#: values decodes to 200 MiB).
MIN_DECODED_BYTES = 1 << 30
DECODED_BYTES_PER_FILE_BYTE = 64


def decoded_budget(file_bytes: int) -> int:
    """The bytes a file of ``file_bytes`` bytes on disk may decode to (see MIN_DECODED_BYTES)."""
    return max(MIN_DECODED_BYTES, DECODED_BYTES_PER_FILE_BYTE * file_bytes)


class ContractError(ValueError):
    """Structurally unreadable input: the message names the file (and the column when there is one)."""

    def __init__(self, path: Path | str, message: str, column: str | None = None):
        self.path = str(path)
        self.column = column
        where = f"{self.path}" + (f", column '{column}'" if column else "")
        super().__init__(f"{where}: {message}")


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
# Files


def list_parquet_files(folder: Path) -> list[Path]:
    """The contract's ``*.parquet`` files of a folder, sorted by name; hidden (``.``/``_``) names skipped.
    A missing folder has no files (whether that is an error is the caller's: the ingest assets refuse a
    missing day folder); a folder (or one of its parents) that exists but is not a directory, e.g. a day
    written as one file named ``dt=D``, raises :class:`ContractError`."""
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


def _open(path: Path) -> tuple[pq.ParquetFile, int]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ContractError(path, f"cannot be read: {exc.strerror or exc}") from None
    if size == 0:
        raise ContractError(path, "is empty (zero bytes), not a Parquet file")
    try:
        return pq.ParquetFile(path, memory_map=False), size
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ContractError(
            path, f"cannot be opened as Parquet (not Parquet, truncated or unreadable): {exc}"
        ) from None


def _check_schema(path: Path, schema: pa.Schema, spec: Sequence[Column]) -> None:
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


class _Budget:
    """The decoded bytes of one file, charged before they are decoded; over decoded_budget -> ContractError."""

    def __init__(self, path: Path, file_bytes: int):
        self.path, self.file_bytes = path, file_bytes
        self.limit, self.spent = decoded_budget(file_bytes), 0

    def charge(self, nbytes: int, column: str) -> None:
        self.spent += nbytes
        if self.spent > self.limit:
            raise ContractError(
                self.path,
                f"decodes to more than {self.limit} bytes, the limit for a file of {self.file_bytes} bytes "
                f"(max({MIN_DECODED_BYTES}, {DECODED_BYTES_PER_FILE_BYTE} x its size)): a compression bomb "
                "or a broken export, not data",
                column,
            )

    def charge_footer(self, md: pq.FileMetaData, columns: Sequence[str]) -> None:
        """8 bytes for every value of these columns (a vector: every element), from the footer alone, the
        largest column first so that the error names it."""
        per_column: dict[str, int] = {}
        for j in range(md.num_columns):
            top = md.schema.column(j).path.split(".")[0]
            if top in columns:
                values = sum(md.row_group(i).column(j).num_values for i in range(md.num_row_groups))
                per_column[top] = per_column.get(top, 0) + 8 * values
        for name, nbytes in sorted(per_column.items(), key=lambda kv: -kv[1]):
            self.charge(nbytes, name)


def _read_row_group(pf: pq.ParquetFile, i: int, wanted: list[str], path: Path) -> pa.Table:
    try:
        return pf.read_row_group(i, columns=wanted, use_threads=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        # Name the column whose data is broken: retry one column at a time.
        for name in wanted:
            try:
                pf.read_row_group(i, columns=[name], use_threads=False)
            except (pa.ArrowException, OSError, ValueError) as col_exc:
                raise ContractError(path, f"data cannot be decoded: {col_exc}", name) from None
        raise ContractError(path, f"data cannot be decoded: {exc}") from None


@dataclass
class _FileTable:
    columns: dict[str, pa.Array]  # normalised, one per contract column
    timestamps: _Timestamps | None
    num_rows: int
    cuts: dict[str, Cuts]  # text values over MAX_TEXT_BYTES that were cut, per text column read


def _read_columns(path: Path, spec: Sequence[Column]) -> tuple[dict[str, pa.ChunkedArray], dict[str, Cuts], int]:
    """The file's contract columns as read (text cut and decoded), row group by row group, within budget."""
    pf, size = _open(path)
    schema = pf.schema_arrow
    _check_schema(path, schema, spec)
    names = set(schema.names)
    wanted = [c.name for c in spec if c.name in names]
    text = [
        c.name
        for c in spec
        if c.kind == "string" and c.name in names and not pa.types.is_null(schema.field(c.name).type)
    ]
    if text:
        # Text as dictionaries: a repeated value is judged and cut once, before it is expanded. (Without this,
        # Arrow also validates UTF-8 while decoding a dictionary<string> column and fails the whole file.)
        pf = pq.ParquetFile(path, memory_map=False, read_dictionary=text)
    budget = _Budget(path, size)
    budget.charge_footer(pf.metadata, wanted)
    pieces: dict[str, list[pa.Array]] = {name: [] for name in wanted}
    cuts: dict[str, list[tuple[int, Cuts]]] = {name: [] for name in text}
    rows = 0
    for i in range(pf.metadata.num_row_groups):
        group = _read_row_group(pf, i, wanted, path)
        for name in wanted:
            offset = rows
            for chunk in group.column(name).chunks:
                if name in cuts:
                    chunk, cut, nbytes = cut_long_text(chunk)
                    budget.charge(nbytes, name)
                    cuts[name].append((offset, cut))
                    chunk = chunk.dictionary_decode() if pa.types.is_dictionary(chunk.type) else chunk
                pieces[name].append(chunk)
                offset += len(chunk)
        rows += group.num_rows
    footer_rows = pf.metadata.num_rows
    if rows != footer_rows:
        raise ContractError(path, f"footer says {footer_rows} rows but {rows} were decoded")
    columns = {
        name: pa.chunked_array(pieces[name], type=None if pieces[name] else schema.field(name).type) for name in wanted
    }
    return columns, {name: Cuts.concat(parts) for name, parts in cuts.items()}, rows


def _read_file(path: Path, spec: Sequence[Column], day: date | None) -> _FileTable:
    read, cuts, n = _read_columns(path, spec)
    columns: dict[str, pa.Array] = {}
    timestamps = None
    for col in spec:
        if col.name not in read:
            columns[col.name] = pa.nulls(n, _TARGET[col.kind])
            if col.kind == "timestamp":
                timestamps = _Timestamps(columns[col.name], np.zeros(n, dtype=bool), np.ones(n, dtype=bool))
            continue
        arr = read[col.name].combine_chunks()
        try:
            if col.kind == "timestamp":
                timestamps = _normalise_timestamps(arr, day)
                columns[col.name] = timestamps.values
            else:
                columns[col.name] = _normalise(col, arr)
        except (pa.ArrowException, ValueError) as exc:
            raise ContractError(path, f"cannot be converted to {_TARGET[col.kind]}: {exc}", col.name) from None
    cuts.update({c.name: Cuts.none() for c in spec if c.kind == "string" and c.name not in cuts})
    return _FileTable(columns, timestamps, n, cuts)


@dataclass
class Input:
    """All files of one input table, normalised and concatenated in file-name then row order."""

    table: pa.Table
    in_day: np.ndarray | None  # timestamp inside the day (tables with a timestamp column)
    ts_null: np.ndarray | None  # timestamp null in the source
    file_index: np.ndarray  # int32 per row
    source_row: np.ndarray  # int64 per row
    files: list[str]  # relative names
    rows_read: int  # sum of the footers' row counts
    cuts: dict[str, Cuts]  # per text column: the values cut (rows of ``table``)


def read_all(
    files: Sequence[Path], spec: Sequence[Column], schema: pa.Schema, root: Path | None, day: date | None
) -> Input:
    """Read every file (in the given order) against ``spec``; ``schema`` is the warehouse schema."""
    parts: list[pa.Table] = []
    in_day: list[np.ndarray] = []
    ts_null: list[np.ndarray] = []
    file_index: list[np.ndarray] = []
    source_row: list[np.ndarray] = []
    cuts: dict[str, list[tuple[int, Cuts]]] = {c.name: [] for c in spec if c.kind == "string"}
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
        for name, cut in ft.cuts.items():
            cuts[name].append((rows_read, cut))
        names.append(_relative(Path(path), root))
        rows_read += ft.num_rows
    empty_mask = np.zeros(0, dtype=bool) if day is not None else None
    return Input(
        table=pa.concat_tables(parts) if parts else schema.empty_table(),
        in_day=np.concatenate(in_day) if in_day else empty_mask,
        ts_null=np.concatenate(ts_null) if ts_null else empty_mask,
        file_index=np.concatenate(file_index) if file_index else np.zeros(0, dtype=np.int32),
        source_row=np.concatenate(source_row) if source_row else np.zeros(0, dtype=np.int64),
        files=names,
        rows_read=rows_read,
        cuts={name: Cuts.concat(parts) for name, parts in cuts.items()},
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
