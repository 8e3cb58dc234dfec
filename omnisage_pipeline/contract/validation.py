"""The input data contract (README, "Data contract", "Input"): schemas, accepted widenings, row rules, quarantine.

Plain pyarrow / numpy library (no Dagster): the ingest assets call it and publish what it returns; the
benchmarks and the fuzz tests call it directly.

Reading (``omnisage_pipeline.contract.reading``; one file at a time, files in sorted name order; names
starting with ``.`` or ``_`` are hidden files of Hadoop/Spark writers and are skipped):

* A file that is not Parquet, has zero bytes, is truncated, or whose data cannot be decoded raises
  :class:`ContractError` naming the file (and the column when one column's data is the culprit). So does
  a file that would decode to more than ``reading.decoded_budget`` (max(1 GiB, 64 x its size on disk)):
  a compression bomb, refused before it is decoded (the error names the column).
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
``source_file`` (path relative to the data root), ``source_row`` (0-based row in that file) and
``original_bytes`` (map column -> byte length of each text value that was cut; null when none was).

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
  replaced by U+FFFD so that the quarantine stays readable by every engine, and a value over
  MAX_TEXT_BYTES - of any text column, logs included - is stored as its first :data:`CUT_TEXT_BYTES`
  bytes (cut at a character boundary), its byte length before the cut in ``original_bytes``.)

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
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Re-exported: the contract's public names live here (readers import them from this module).
from omnisage_pipeline.contract.reading import (  # noqa: F401
    BOARD_COLUMNS,
    LOG_COLUMNS,
    PIN_COLUMNS,
    TS_TYPE,
    VECTOR_TYPE,
    Column,
    ContractError,
    Input,
    list_parquet_files,
    read_all,
)
from omnisage_pipeline.contract.text import (  # noqa: F401
    CUT_TEXT_BYTES,
    MAX_TEXT_BYTES,
    Cuts,
    invalid_utf8_rows,
    repair_utf8,
)

ACTIONS = ("save", "click", "closeup")
SURFACES = ("homefeed", "related_pins", "search", "board")

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
    pa.field("original_bytes", pa.map_(pa.string(), pa.int64())),
]


def quarantine_schema(schema: pa.Schema) -> pa.Schema:
    """A quarantine table: the warehouse columns plus reason, source_file, source_row, original_bytes."""
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


class AccountingError(RuntimeError):
    """rows read != rows kept + rows quarantined: a bug, never bad input."""


# --------------------------------------------------------------------------------------------------
# Vectorised row checks


def _np_mask(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean Arrow result as numpy, nulls counted as False."""
    return pc.fill_null(arr, False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


def _null_mask(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return _np_mask(pc.is_null(arr))


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
    """Validated rows (warehouse schema) and quarantined rows (+ reason, source_file, source_row,
    original_bytes)."""

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


def _text_rules(inp: Input, text_columns: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """invalid_utf8_<c> and text_too_long_<c>, judged on the full values: a value over MAX_TEXT_BYTES was
    cut while it was read (every such value is one, so the cuts are the too-long rows), and its UTF-8
    validity was taken before the cut."""
    n = inp.table.num_rows
    invalid, too_long = [], []
    for c in text_columns:
        cuts = inp.cuts[c]
        bad = invalid_utf8_rows(inp.table.column(c))
        bad[cuts.rows] = cuts.invalid_utf8
        long = np.zeros(n, dtype=bool)
        long[cuts.rows] = True
        invalid.append((f"invalid_utf8_{c}", bad))
        too_long.append((f"text_too_long_{c}", long))
    return invalid + too_long


def _original_bytes(inp: Input, qidx: np.ndarray, keep: np.ndarray) -> pa.Array:
    """Per quarantined row, {text column: byte length before the cut} of its cut values (null: none cut)."""
    rows, keys, sizes = [], [], []
    for name, cuts in inp.cuts.items():
        if keep[cuts.rows].any():  # a value over MAX_TEXT_BYTES breaks a rule in every table
            raise AccountingError(f"a cut {name} value would be kept: the text rules missed it")
        rows.append(np.searchsorted(qidx, cuts.rows))
        keys += [name] * len(cuts.rows)
        sizes.append(cuts.original_bytes)
    at = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    order = np.argsort(at, kind="stable")  # row order; within a row, column order
    counts = np.bincount(at, minlength=len(qidx))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.MapArray.from_arrays(
        pa.array(offsets, pa.int32()),
        pa.array(np.asarray(keys, dtype=object)[order] if keys else [], pa.string()),
        pa.array(np.concatenate(sizes)[order] if sizes else [], pa.int64()),
        mask=pa.array(counts == 0),
    )


def _split(
    name: str,
    inp: Input,
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
        _original_bytes(inp, qidx, keep),
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


def validate_engagement_logs(files: Sequence[Path], day: date | str, root: Path | None = None) -> ValidationResult:
    """Validate one day folder's files (already sorted) against the contract's log rules."""
    day = _as_date(day)
    inp = read_all(files, LOG_COLUMNS, LOG_SCHEMA, root, day)
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
    inp = read_all(files, spec, schema, root, None)
    t = inp.table
    n = t.num_rows
    id_col = f"{entity}_id"
    rules: list[tuple[str, np.ndarray]] = [(f"null_{id_col}", _null_mask(t.column(id_col)))]
    rules += _text_rules(inp, text_columns)
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
    return _validate_entities("pin", files, root, PIN_COLUMNS, PIN_SCHEMA, PIN_QUARANTINE_SCHEMA, PIN_TEXT, PIN_REASONS)


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
