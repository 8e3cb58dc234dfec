"""Text values of the input contract: UTF-8 validity (the Parquet reader does not check it), the repair used
for the quarantine table, and the cut of over-long values (plain pyarrow / numpy, no Dagster).

A value longer than :data:`MAX_TEXT_BYTES` bytes breaks a row rule in every contract table (pins/boards:
``text_too_long_<column>``; logs: such an action or surface is unknown), so its full bytes are never kept.
The reader cuts it to its first :data:`CUT_TEXT_BYTES` bytes as soon as it is read, and remembers its
original byte length and whether it was valid UTF-8 (:class:`Cuts`): a hostile file (e.g. 100 titles of
2 MiB from a 1 KB dictionary-encoded file) then costs kilobytes, not hundreds of MiB, in the quarantine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Text values longer than this (bytes) are quarantined as text_too_long_<column> (logs: unknown value).
MAX_TEXT_BYTES = 1 << 20

#: What the quarantine keeps of a value longer than MAX_TEXT_BYTES: a prefix of at most this many bytes.
CUT_TEXT_BYTES = 1 << 10


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


def utf8_prefix(raw: bytes, limit: int = CUT_TEXT_BYTES) -> bytes:
    """The first ``limit`` bytes of ``raw`` without a UTF-8 sequence cut in two at the end (so the prefix of
    a valid value is valid; invalid bytes inside the prefix stay as they are)."""
    head = raw[:limit]
    for back in range(1, min(4, len(head)) + 1):
        lead = head[-back]
        if lead & 0xC0 != 0x80:  # the last byte that starts a character
            need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
            return head[:-back] if need > back else head
    return head


@dataclass
class Cuts:
    """The values of one text column that were longer than MAX_TEXT_BYTES and were cut: their rows, their
    original byte lengths and whether the full value was invalid UTF-8 (the rules judge the full value)."""

    rows: np.ndarray  # int64, ascending
    original_bytes: np.ndarray  # int64
    invalid_utf8: np.ndarray  # bool

    @staticmethod
    def none() -> Cuts:
        return Cuts(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool))

    @staticmethod
    def concat(parts: list[tuple[int, Cuts]]) -> Cuts:
        """Cuts of consecutive parts, each given with the row offset of its first row."""
        if not parts:
            return Cuts.none()
        return Cuts(
            np.concatenate([c.rows + offset for offset, c in parts]),
            np.concatenate([c.original_bytes for _, c in parts]),
            np.concatenate([c.invalid_utf8 for _, c in parts]),
        )


def cut_long_text(arr: pa.Array) -> tuple[pa.Array, Cuts, int]:
    """``arr`` (string-like, or a dictionary of strings as read with ``read_dictionary``) with every value
    longer than MAX_TEXT_BYTES cut to a CUT_TEXT_BYTES prefix; with the :class:`Cuts` and the byte size of
    the values it decodes to. A dictionary stays a dictionary (cut entry by entry, never expanded here), so
    the caller can refuse a small file of one huge repeated value before decoding it."""
    if pa.types.is_dictionary(arr.type):
        values, indices = arr.dictionary, arr.indices
    else:
        values, indices = arr, None
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())  # large_string / string_view: the same bytes
    lengths = pc.binary_length(values).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    long = lengths > MAX_TEXT_BYTES
    invalid = np.zeros(len(values), dtype=bool)
    if long.any():
        where = np.flatnonzero(long)
        full = values.take(pa.array(where))
        invalid[where] = invalid_utf8_rows(full)
        heads = pc.binary_slice(full.view(pa.binary()), 0, CUT_TEXT_BYTES).to_pylist()
        cut = pa.array([utf8_prefix(h) for h in heads], pa.binary()).view(pa.string())
        values = pc.replace_with_mask(values, pa.array(long), cut)
    kept = pc.binary_length(values).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if indices is None:
        rows = np.flatnonzero(long)
        return values, Cuts(rows, lengths[rows], invalid[rows]), int(kept.sum())
    if len(values) == 0:  # every row null
        return pa.DictionaryArray.from_arrays(indices, values), Cuts.none(), 0
    valid = indices.is_valid().to_numpy(zero_copy_only=False)
    idx = indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    rows = np.flatnonzero(valid & long[idx])
    cuts = Cuts(rows, lengths[idx[rows]], invalid[idx[rows]])
    return pa.DictionaryArray.from_arrays(indices, values), cuts, int(kept[idx[valid]].sum())
