"""Deterministic n-gram text tokenizer hashed to uint32 ids (paper 3.2: "a simple shared hash-based
embedding applied to n-gram tokenized text").

Definition (versioned by ``TOKENIZER_VERSION``; the feature store records it in its manifest):

1. Normalise: ``unicodedata.normalize("NFKC", text.casefold())`` - case folding (not just lower-casing:
   "Straße" and "STRASSE" match) then NFKC, so full-width / ligature / compatibility forms collapse
   ("ＡＢＣ" -> "abc", "ﬁ" -> "fi"). ``None`` is the empty text. Several fields are joined by a space.
2. Words: maximal runs of Unicode letters, combining marks, numbers and "_" (``[\\p{L}\\p{M}\\p{N}_]+``).
   Marks are word characters on purpose: Python's ``\\w`` splits Devanagari/Thai words at vowel signs.
3. Tokens of one entity, in this order:
     a. word unigrams               token string  "1\\x1f" + w
     b. word bigrams (adjacent)     token string  "2\\x1f" + w_i + "\\x1f" + w_{i+1}
     c. character trigrams of every word wrapped as "<" + w + ">" (code points, never UTF-8 byte
        fragments; "<" and ">" cannot occur inside a word), fastText style
                                    token string  "3\\x1f" + c_j c_{j+1} c_{j+2}
   The kind prefix keeps the word "abc" and the trigram "abc" apart.
4. Id = fmix32(FNV-1a-32(UTF-8 bytes of the token string)): FNV-1a (offset basis 2166136261, prime
   16777619) followed by MurmurHash3's 32-bit finaliser so low bits are well mixed (the model takes ids
   modulo its bucket count). Never Python's salted ``hash``: ids are identical across processes, machines
   and runs.
5. Duplicate ids inside one entity are dropped (first occurrence kept), then the list is capped at
   ``max_tokens`` - so unigrams win over bigrams, and bigrams over trigrams, when text is long.

``tokenize_batch`` is the vectorised path (Arrow joins the fields, the UTF-8 buffer is normalised as a
whole, and a numba kernel splits, hashes and assembles the tokens, one chunk of entities at a time);
``tokenize_reference`` is a slow pure-Python statement of the same definition that the tests compare it
against.
"""

from __future__ import annotations

import itertools
import unicodedata
from collections.abc import Sequence

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TOKENIZER_VERSION = 1
DEFAULT_MAX_TOKENS = 64

_UNIGRAM, _BIGRAM, _TRIGRAM = 0x31, 0x32, 0x33  # "1", "2", "3"
_SEP = 0x1F
_LT, _GT = 0x3C, 0x3E  # "<", ">"


def normalize(text: str | None) -> str:
    """Step 1 of the definition: casefold, then NFKC."""
    if not text:
        return ""
    return unicodedata.normalize("NFKC", text.casefold())


# --------------------------------------------------------------------------------------- reference


def _fnv1a_fmix(data: bytes) -> int:
    h = 2166136261
    for byte in data:
        h ^= byte
        h = (h * 16777619) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def _is_word_char(ch: str) -> bool:
    return ch == "_" or unicodedata.category(ch)[0] in "LMN"


def _words(text: str) -> list[str]:
    out, cur = [], []
    for ch in text:
        if _is_word_char(ch):
            cur.append(ch)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def tokenize_reference(*fields: str | None, max_tokens: int = DEFAULT_MAX_TOKENS) -> np.ndarray:
    """Pure-Python statement of the definition (slow; for tests and documentation)."""
    text = " ".join(normalize(f) for f in fields)
    words = _words(text)
    strings = [b"1\x1f" + w.encode() for w in words]
    strings += [b"2\x1f" + a.encode() + b"\x1f" + b.encode() for a, b in itertools.pairwise(words)]
    for w in words:
        wrapped = "<" + w + ">"
        strings += [b"3\x1f" + wrapped[j : j + 3].encode() for j in range(len(wrapped) - 2)]
    out: list[int] = []
    seen: set[int] = set()
    for s in strings:
        h = _fnv1a_fmix(s)
        if h not in seen:
            seen.add(h)
            out.append(h)
            if len(out) == max_tokens:
                break
    return np.asarray(out, dtype=np.uint32)


# ------------------------------------------------------------------------------------ numba kernels


# Arithmetic in uint64 masked to 32 bits: numba widens uint32 products, so wrap-around is explicit.
_M32 = np.uint64(0xFFFFFFFF)
_FNV_OFFSET64 = np.uint64(2166136261)
_FNV_PRIME64 = np.uint64(16777619)


@numba.njit(cache=True)
def _feed(h, b):
    return ((h ^ np.uint64(b)) * _FNV_PRIME64) & _M32


@numba.njit(cache=True)
def _fmix(h):
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & _M32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & _M32
    h ^= h >> np.uint64(16)
    return np.uint32(h)


@numba.njit(cache=True)
def _cp_len(lead):
    if lead < 0x80:
        return 1
    if lead < 0xE0:
        return 2
    if lead < 0xF0:
        return 3
    return 4


@numba.njit(cache=True)
def _decode(data, p, length):
    b0 = np.int64(data[p])
    if length == 1:
        return b0
    if length == 2:
        return ((b0 & 0x1F) << 6) | (np.int64(data[p + 1]) & 0x3F)
    if length == 3:
        return ((b0 & 0x0F) << 12) | ((np.int64(data[p + 1]) & 0x3F) << 6) | (np.int64(data[p + 2]) & 0x3F)
    return (
        ((b0 & 0x07) << 18)
        | ((np.int64(data[p + 1]) & 0x3F) << 12)
        | ((np.int64(data[p + 2]) & 0x3F) << 6)
        | (np.int64(data[p + 3]) & 0x3F)
    )


@numba.njit(cache=True)
def _add(h, out, base, cnt, tkeys, tstamp, stamp, tmask):
    """Append id h to the entity's list unless already there (open-addressing set, stamped per entity)."""
    slot = np.int64(h) & tmask
    while tstamp[slot] == stamp:
        if tkeys[slot] == h:
            return cnt
        slot = (slot + 1) & tmask
    tstamp[slot] = stamp
    tkeys[slot] = h
    out[base + cnt] = h
    return cnt + 1


@numba.njit(cache=True)
def _tokenize_kernel(data, is_word, n, n_fields, max_tokens, max_entity_bytes):
    """One pass over the normalised UTF-8 bytes of n * n_fields texts separated by NUL bytes.
    ``max_entity_bytes`` bounds the bytes of one entity's text, hence its words and a word's code points
    (buffers are allocated once: growing arrays inside the loop made numba ~5x slower)."""
    out = np.empty(n * max_tokens, dtype=np.uint32)
    lengths = np.zeros(n, dtype=np.int64)
    tsize = 1
    while tsize < 2 * max_tokens:
        tsize *= 2
    tmask = tsize - 1
    tkeys = np.zeros(tsize, dtype=np.uint32)
    tstamp = np.zeros(tsize, dtype=np.int64)
    ws = np.empty(max_entity_bytes // 2 + 2, dtype=np.int64)  # word byte starts of the current entity
    we = np.empty(max_entity_bytes // 2 + 2, dtype=np.int64)  # word byte ends
    cps = np.empty(max_entity_bytes + 4, dtype=np.int64)  # code-point starts of one wrapped word
    size = data.shape[0]
    pos = 0
    for e in range(n):
        nw = 0
        for _f in range(n_fields):
            start = -1
            while pos < size and data[pos] != 0:
                length = _cp_len(data[pos])
                if is_word[_decode(data, pos, length)]:
                    if start < 0:
                        start = pos
                elif start >= 0:
                    ws[nw] = start
                    we[nw] = pos
                    nw += 1
                    start = -1
                pos += length
            if start >= 0:
                ws[nw] = start
                we[nw] = pos
                nw += 1
            pos += 1  # the NUL separator (or one past the end)
        base = e * max_tokens
        stamp = e + 1
        cnt = 0
        # a. unigrams
        for i in range(nw):
            if cnt >= max_tokens:
                break
            h = _FNV_OFFSET64
            h = _feed(h, _UNIGRAM)
            h = _feed(h, _SEP)
            for p in range(ws[i], we[i]):
                h = _feed(h, data[p])
            cnt = _add(_fmix(h), out, base, cnt, tkeys, tstamp, stamp, tmask)
        # b. bigrams
        for i in range(nw - 1):
            if cnt >= max_tokens:
                break
            h = _FNV_OFFSET64
            h = _feed(h, _BIGRAM)
            h = _feed(h, _SEP)
            for p in range(ws[i], we[i]):
                h = _feed(h, data[p])
            h = _feed(h, _SEP)
            for p in range(ws[i + 1], we[i + 1]):
                h = _feed(h, data[p])
            cnt = _add(_fmix(h), out, base, cnt, tkeys, tstamp, stamp, tmask)
        # c. character trigrams of "<" w ">" (code points; a-1 stands for "<", b for ">")
        for i in range(nw):
            if cnt >= max_tokens:
                break
            a, b = ws[i], we[i]
            c = 0
            cps[c] = a - 1
            c += 1
            for p in range(a, b):
                if (data[p] & 0xC0) != 0x80:  # not a UTF-8 continuation byte: a code point starts
                    cps[c] = p
                    c += 1
            cps[c] = b
            c += 1
            cps[c] = b + 1  # end sentinel
            for j in range(c - 2):
                if cnt >= max_tokens:
                    break
                h = _FNV_OFFSET64
                h = _feed(h, _TRIGRAM)
                h = _feed(h, _SEP)
                for p in range(cps[j], cps[j + 3]):
                    if p == a - 1:
                        h = _feed(h, _LT)
                    elif p == b:
                        h = _feed(h, _GT)
                    else:
                        h = _feed(h, data[p])
                cnt = _add(_fmix(h), out, base, cnt, tkeys, tstamp, stamp, tmask)
        lengths[e] = cnt
    csr_off = np.zeros(n + 1, dtype=np.int64)
    for e in range(n):
        csr_off[e + 1] = csr_off[e] + lengths[e]
    tokens = np.empty(csr_off[n], dtype=np.uint32)
    for e in range(n):
        tokens[csr_off[e] : csr_off[e + 1]] = out[e * max_tokens : e * max_tokens + lengths[e]]
    return csr_off, tokens


# ---------------------------------------------------------------------------------- vectorised path

_WORD_TABLE: np.ndarray | None = None


def word_char_table() -> np.ndarray:
    """bool[0x110000]: code points that are word characters (categories L*, M*, N*, and "_"), from the
    running Python's Unicode database (``unicodedata.unidata_version``; 14.0.0 on Python 3.11). Built
    once per process (~0.3 s)."""
    global _WORD_TABLE
    if _WORD_TABLE is None:
        category = unicodedata.category
        table = np.fromiter((category(chr(i))[0] in "LMN" for i in range(0x110000)), dtype=bool, count=0x110000)
        table[ord("_")] = True
        _WORD_TABLE = table
    return _WORD_TABLE


#: Entities per kernel call: bounds the joined text buffer and the kernel's output scratch.
CHUNK_ROWS = 1 << 16


def _as_text_column(values) -> pa.ChunkedArray:
    """One text field as a large_string column with nulls as "" and NUL as a space (NUL is the kernel's
    separator and not a word character, so the space is equivalent). Arrow input is never turned into
    Python objects; a Python sequence is converted by Arrow in C (``str(v)`` only for non-text items)."""
    if isinstance(values, pa.Array):
        values = pa.chunked_array([values])
    if not isinstance(values, pa.ChunkedArray):
        try:
            values = pa.chunked_array([pa.array(values, pa.large_string())])
        except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError):
            # Non-text items, or lone surrogates (kept as bytes, as Python's "surrogatepass" writes them).
            items = [None if v is None else str(v).encode("utf-8", "surrogatepass") for v in values]
            values = pa.chunked_array([pa.array(items, pa.large_binary()).view(pa.large_string())])
    text = pc.fill_null(values.cast(pa.large_string()), "")
    return pc.replace_substring(text, "\x00", " ")


def _normalized_bytes(joined: pa.Array) -> np.ndarray:
    """Step 1 (casefold, NFKC) over the UTF-8 data buffer of one large_string array, as uint8.

    ASCII text (the common case) is lower-cased in numpy: casefold of ASCII is ASCII lower case and NFKC
    leaves ASCII alone. Otherwise the whole buffer is decoded once and normalised by two C calls (Arrow has
    no case folding; its lower-casing differs, e.g. for "ß")."""
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int64)[joined.offset : joined.offset + len(joined) + 1]
    data_buffer = joined.buffers()[2]
    if data_buffer is None or offsets[-1] == offsets[0]:
        return np.zeros(0, dtype=np.uint8)
    data = np.frombuffer(data_buffer, dtype=np.uint8)[offsets[0] : offsets[-1]]
    if data.max() < 0x80:
        upper = (data >= 0x41) & (data <= 0x5A)
        return data + (upper.view(np.uint8) << 5)
    text = data.tobytes().decode("utf-8", "surrogatepass")
    return np.frombuffer(
        unicodedata.normalize("NFKC", text.casefold()).encode("utf-8", "surrogatepass"), dtype=np.uint8
    )


def _tokenize_chunk(columns: list[pa.ChunkedArray], lo: int, hi: int, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Entities [lo, hi): each entity's fields joined in Arrow as "f0 NUL f1 NUL ... NUL" (entity-major,
    the kernel's input), normalised, then split and hashed by one numba pass."""
    n_fields = len(columns)
    parts = [c.slice(lo, hi - lo).combine_chunks() for c in columns]
    joined = pc.binary_join_element_wise(*parts, pa.scalar("", pa.large_string()), pa.scalar("\x00", pa.large_string()))
    data = _normalized_bytes(joined)
    # Bytes of one entity's text (its n_fields segments and their NULs) bound the kernel's buffers.
    bounds = np.concatenate(([-1], np.flatnonzero(data == 0)))[::n_fields]
    max_entity_bytes = int(np.max(np.diff(bounds))) if bounds.shape[0] > 1 else 0
    return _tokenize_kernel(data, word_char_table(), hi - lo, n_fields, int(max_tokens), max_entity_bytes)


def tokenize_batch(
    *fields: Sequence[str | None] | pa.Array | pa.ChunkedArray,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize n entities at once; each positional argument is one text field (length n), joined by a
    space per entity (pins: title, description; boards: name, description).

    Returns CSR ``(offsets int64[n+1], token_ids uint32[offsets[-1]])``: entity i has
    ``token_ids[offsets[i]:offsets[i+1]]`` (at most ``max_tokens``).

    Vectorised, ``chunk_rows`` entities at a time: the fields are joined by NUL in Arrow (a separator that
    casefold and NFKC leave alone and that never composes with a neighbour, so normalising the join equals
    normalising each text), the join's UTF-8 buffer is normalised (numpy for ASCII, two C calls otherwise),
    and one numba pass splits and hashes it. No Python object per text.
    """
    if not fields:
        raise ValueError("tokenize_batch needs at least one text field")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    columns = [_as_text_column(f) for f in fields]
    n = len(columns[0])
    if any(len(c) != n for c in columns[1:]):
        raise ValueError("tokenize_batch: text fields have different lengths")
    offsets, tokens, total = [np.zeros(1, dtype=np.int64)], [np.zeros(0, dtype=np.uint32)], 0
    for lo in range(0, n, chunk_rows):
        chunk_off, chunk_tokens = _tokenize_chunk(columns, lo, min(n, lo + chunk_rows), max_tokens)
        offsets.append(chunk_off[1:] + total)
        tokens.append(chunk_tokens)
        total += int(chunk_off[-1])
    return np.concatenate(offsets), np.concatenate(tokens)


def tokenize(*fields: str | None, max_tokens: int = DEFAULT_MAX_TOKENS) -> np.ndarray:
    """Token ids (uint32) of one entity; same result as ``tokenize_batch`` on a batch of one."""
    _, ids = tokenize_batch(*[[f] for f in fields], max_tokens=max_tokens)
    return ids
