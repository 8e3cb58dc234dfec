"""RocksDB feature store: one binarised record per entity (paper 3.4.1 "Featurizer": "a disk-based key-value
store, mapping each node ID to its corresponding binarized feature set. We store features even for nodes
pruned from the graph").

Key (9 bytes, fixed): ``uint8 entity type code`` (graph_engine.batch.NODE_TYPE_CODE: pin 0, board 1) +
``int64 entity id, big-endian`` (two's complement). Keys therefore sort by (type, id as unsigned 64-bit).

Value (little-endian, fixed 12-byte header then variable parts)::

    offset size  field
    0      1     format version (uint8) = RECORD_VERSION
    1      1     flags (uint8): bit 0 FLAG_IMAGE     the image vector is present
                                bit 1 FLAG_METADATA  the entity has a row in entity_metadata
                                bit 2 FLAG_IN_GRAPH  the entity is a node of the day's graph
                                bits 3-7 must be 0
    2      2     segment code (uint16): 0 = none, else 1 + index into the manifest's "segments" list
    4      4     degree (uint32): entries in the node's pruned adjacency list, 0 when not in the graph
    8      2     n_tokens (uint16)
    10     2     image_dim (uint16): D of the store (0 when the data set has no image vectors)
    12     4*n   token ids (uint32; graph_engine.tokenizer; pins: title + description, boards: name + description)
    12+4n  2*D   image vector (float16), only when FLAG_IMAGE is set

A record is valid iff version matches, unknown flag bits are 0, image_dim equals the store's D and the
length is exactly ``12 + 4 * n_tokens + 2 * D * has_image``; ``graph_engine.featurizer`` checks this.

The manifest (JSON) is stored under ``MANIFEST_KEY`` (starts with 0xFF, so it can never collide with an
entity key and sorts after them) and copied to ``feature_manifest.json`` in the same directory for humans:
format, record version, image_dim, max_tokens, tokenizer version, segment vocabulary, counts, bytes and
build seconds.

Bulk build: records are encoded with numpy into one byte buffer (no per-record packing), then written in
key order as SST files of contiguous key ranges by parallel processes (``graph_engine.sst_writer``) and
ingested together with ``ingest_external_file`` (no memtable, WAL or compaction). rocksdict has no
multi-put, so one C call per record to the SST writer remains; that is the batch API.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rocksdict import AccessType, Rdict

from graph_engine.batch import NODE_TYPE_CODE
from graph_engine.sst_writer import (
    MIN_RECORDS_PER_PROCESS,
    default_processes,
    ingest,
    keys_strictly_increasing,
    store_options,
    write_ssts,
)
from graph_engine.tokenizer import TOKENIZER_VERSION, tokenize_batch

FORMAT = "omnisage-feature-store"
RECORD_VERSION = 1
HEADER_BYTES = 12
KEY_BYTES = 9
FLAG_IMAGE = 1
FLAG_METADATA = 2
FLAG_IN_GRAPH = 4
KNOWN_FLAGS = FLAG_IMAGE | FLAG_METADATA | FLAG_IN_GRAPH
MANIFEST_KEY = b"\xff__omnisage_feature_manifest__"
MANIFEST_FILE = "feature_manifest.json"
#: Store-side token cap; a Featurizer may read fewer (it truncates) but never more.
STORE_MAX_TOKENS = 32
_FLOAT16_MAX = float(np.finfo(np.float16).max)

#: Header as a numpy structured dtype (packed, little-endian) - the layout table above.
HEADER_DTYPE = np.dtype(
    [
        ("version", "u1"),
        ("flags", "u1"),
        ("segment", "<u2"),
        ("degree", "<u4"),
        ("n_tokens", "<u2"),
        ("image_dim", "<u2"),
    ]
)
assert HEADER_DTYPE.itemsize == HEADER_BYTES


class FeatureStoreError(ValueError):
    """Bad input for the feature store build; the message names the file and field."""


# ----------------------------------------------------------------------------------------------- keys


def encode_keys(type_codes: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """uint8 [n, 9] keys: type code byte + big-endian int64 id."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    codes = np.broadcast_to(np.asarray(type_codes), ids.shape)
    out = np.empty((ids.shape[0], KEY_BYTES), dtype=np.uint8)
    out[:, 0] = codes
    out[:, 1:] = ids.astype(">i8").view(np.uint8).reshape(-1, 8)
    return out


def key_list(keys: np.ndarray) -> list[bytes]:
    """Python bytes objects of a uint8 [n, 9] key matrix (one buffer, sliced)."""
    buf = keys.tobytes()
    return [buf[i : i + KEY_BYTES] for i in range(0, len(buf), KEY_BYTES)]


def describe_key(key: bytes) -> str:
    if len(key) != KEY_BYTES:
        return f"key {key!r}"
    names = {v: k for k, v in NODE_TYPE_CODE.items()}
    code = key[0]
    ident = int.from_bytes(key[1:], "big", signed=True)
    return f"{names.get(code, f'type code {code}')} id={ident}"


# --------------------------------------------------------------------------------------------- records


def encode_records(
    flags: np.ndarray,
    segment: np.ndarray,
    degree: np.ndarray,
    token_offsets: np.ndarray,
    tokens: np.ndarray,
    image: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode n records into one buffer. ``image`` float32/16 [n, D] (rows without FLAG_IMAGE are ignored).
    Returns (buffer uint8, offsets int64[n+1])."""
    n = flags.shape[0]
    d = image.shape[1] if image.ndim == 2 else 0
    n_tok = np.diff(token_offsets).astype(np.int64)
    if n_tok.size and n_tok.max() > np.iinfo(np.uint16).max:
        raise FeatureStoreError("a record holds more than 65535 tokens")
    if d > np.iinfo(np.uint16).max:
        raise FeatureStoreError(f"image_dim {d} does not fit the record's uint16 field")
    has_image = (flags & FLAG_IMAGE) != 0
    lengths = HEADER_BYTES + 4 * n_tok + 2 * d * has_image.astype(np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    buf = np.zeros(int(offsets[-1]), dtype=np.uint8)

    header = np.zeros(n, dtype=HEADER_DTYPE)
    header["version"] = RECORD_VERSION
    header["flags"] = flags
    header["segment"] = segment
    header["degree"] = np.minimum(degree, np.iinfo(np.uint32).max)
    header["n_tokens"] = n_tok
    header["image_dim"] = d
    starts = offsets[:-1]
    buf[(starts[:, None] + np.arange(HEADER_BYTES)).reshape(-1)] = header.view(np.uint8)

    # Token bytes: record r's tokens go to starts[r] + 12 + [0, 4 * n_tok[r]).
    tok_bytes = np.ascontiguousarray(tokens, dtype="<u4").view(np.uint8)
    if tok_bytes.size:
        dest = np.repeat(starts + HEADER_BYTES - 4 * token_offsets[:-1], 4 * n_tok) + np.arange(tok_bytes.size)
        buf[dest] = tok_bytes
    if d and has_image.any():
        rows = np.flatnonzero(has_image)
        img = np.clip(np.asarray(image[rows], dtype=np.float32), -_FLOAT16_MAX, _FLOAT16_MAX).astype("<f2")
        img_start = starts[rows] + HEADER_BYTES + 4 * n_tok[rows]
        buf[(img_start[:, None] + np.arange(2 * d)).reshape(-1)] = img.view(np.uint8).reshape(-1)
    return buf, offsets


def write_store(
    out_dir: Path,
    keys: np.ndarray,
    buf: np.ndarray,
    offsets: np.ndarray,
    manifest: dict,
    processes: int | None = None,
    min_records_per_process: int = MIN_RECORDS_PER_PROCESS,
) -> dict:
    """Write (already key-sorted) records plus the manifest into a new RocksDB at ``out_dir``: SST files of
    contiguous key ranges written by up to ``processes`` processes (default min(2, cores); each writes at
    least ``min_records_per_process`` records), ingested together. Returns {"sst_bytes": ..., "db_bytes": ...,
    "sst_files": ...}."""
    out_dir = Path(out_dir)
    if not keys_strictly_increasing(keys):
        raise FeatureStoreError(f"feature store {out_dir}: record keys are not strictly increasing")
    out_dir.mkdir(parents=True, exist_ok=True)
    sst_dir = out_dir / "_ingest"  # inside the staging dir: a killed build leaves nothing elsewhere
    shutil.rmtree(sst_dir, ignore_errors=True)
    sst_dir.mkdir(parents=True)
    try:
        manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
        # The manifest key (0xFF...) sorts after every entity key: it goes last, in the last file.
        files = write_ssts(
            sst_dir,
            keys,
            buf,
            offsets,
            (MANIFEST_KEY, manifest_bytes),
            processes or default_processes(),
            min_records_per_process,
        )
        sst_bytes = sum(p.stat().st_size for p in files)
        ingest(out_dir, files)
    finally:
        shutil.rmtree(sst_dir, ignore_errors=True)
    db_bytes = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    return {"sst_bytes": int(sst_bytes), "db_bytes": int(db_bytes), "sst_files": len(files)}


def open_store(path: Path) -> Rdict:
    """Open a published store read-only."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"feature store {path} does not exist")
    return Rdict(str(path), options=store_options(), access_type=AccessType.read_only())


def read_manifest(db: Rdict, path: Path | str = "") -> dict:
    raw = db.get(MANIFEST_KEY)
    if raw is None:
        raise FeatureStoreError(f"feature store {path}: manifest key missing (not a finished feature store)")
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT:
        raise FeatureStoreError(f"feature store {path}: manifest field 'format' is {manifest.get('format')!r}")
    if manifest.get("record_version") != RECORD_VERSION:
        raise FeatureStoreError(
            f"feature store {path}: manifest field 'record_version' is {manifest.get('record_version')!r}, "
            f"this reader understands {RECORD_VERSION}"
        )
    return manifest


# ------------------------------------------------------------------------------------- reading metadata


def _parquet_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*.parquet")
        if not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts)
    )


def _read_table(folder: Path, id_column: str, text_columns: tuple[str, ...], optional: tuple[str, ...]) -> pa.Table:
    """Concatenate ``folder/*.parquet`` (file-name order) with the needed columns; errors name file + field."""
    tables = []
    for path in _parquet_files(folder):
        try:
            schema = pq.read_schema(path)
        except Exception as exc:
            raise FeatureStoreError(f"{path}: not a readable Parquet file ({exc})") from exc
        for col in (id_column, *text_columns):
            if col not in schema.names:
                raise FeatureStoreError(f"{path}: required column {col!r} is missing")
        cols = [id_column, *text_columns, *[c for c in optional if c in schema.names]]
        table = pq.read_table(path, columns=cols)
        if not pa.types.is_integer(table.schema.field(id_column).type):
            raise FeatureStoreError(
                f"{path}: column {id_column!r} has type {table.schema.field(id_column).type}, expected int64"
            )
        if table.column(id_column).null_count:
            raise FeatureStoreError(f"{path}: column {id_column!r} holds nulls")
        columns = {id_column: table.column(id_column).cast(pa.int64())}
        for c in text_columns:
            columns[c] = table.column(c).cast(pa.large_string())
        if "segment" in optional:
            columns["segment"] = (
                table.column("segment").cast(pa.large_string())
                if "segment" in table.schema.names
                else pa.nulls(table.num_rows, pa.large_string())
            )
        if "image_embedding" in optional:
            if "image_embedding" in table.schema.names:
                col = table.column("image_embedding")
                vtype = col.type
                if not (pa.types.is_list(vtype) or pa.types.is_large_list(vtype) or pa.types.is_fixed_size_list(vtype)):
                    raise FeatureStoreError(
                        f"{path}: column 'image_embedding' has type {vtype}, expected list<float32>"
                    )
                columns["image_embedding"] = col.cast(pa.large_list(pa.float32()))
            else:
                columns["image_embedding"] = pa.nulls(table.num_rows, pa.large_list(pa.float32()))
        t = pa.table(columns)
        tables.append((path, t))
    if not tables:
        fields = [pa.field(id_column, pa.int64())] + [pa.field(c, pa.large_string()) for c in text_columns]
        if "segment" in optional:
            fields.append(pa.field("segment", pa.large_string()))
        if "image_embedding" in optional:
            fields.append(pa.field("image_embedding", pa.large_list(pa.float32())))
        return pa.schema(fields).empty_table()
    out = pa.concat_tables([t for _, t in tables])
    ids = np.asarray(out.column(id_column))
    if np.unique(ids).size != ids.size:
        raise FeatureStoreError(f"{folder}: column {id_column!r} holds duplicate ids (entity_metadata must be unique)")
    return out


def _image_matrix(col: pa.ChunkedArray, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n, D], has_image bool [n]); D = the common length of the non-null vectors (0 when none)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    valid = np.asarray(arr.is_valid()) if n else np.zeros(0, bool)
    lengths = np.asarray(pc.fill_null(pc.list_value_length(arr), 0)).astype(np.int64) if n else np.zeros(0, np.int64)
    present_lengths = np.unique(lengths[valid])
    if present_lengths.size == 0 or (present_lengths.size == 1 and present_lengths[0] == 0):
        return np.zeros((n, 0), dtype=np.float32), np.zeros(n, dtype=bool)
    if present_lengths.size > 1:
        raise FeatureStoreError(
            f"{folder}: column 'image_embedding' holds vectors of different lengths {present_lengths.tolist()[:5]}"
        )
    d = int(present_lengths[0])
    values = np.asarray(pc.list_flatten(arr), dtype=np.float32)  # nulls contribute no values
    image = np.zeros((n, d), dtype=np.float32)
    image[valid] = values.reshape(-1, d)
    if not np.isfinite(image).all():
        raise FeatureStoreError(f"{folder}: column 'image_embedding' holds NaN or inf values")
    return image, valid


# ----------------------------------------------------------------------------------------------- build


@dataclass
class _MetadataFeatures:
    """Features of the metadata rows (pins first, then boards), before the union with the graph's nodes."""

    n_pins: int
    n_boards: int
    codes: np.ndarray  # int8 type code per row
    ids: np.ndarray  # int64
    tok_off: np.ndarray  # start of each row's tokens in ``tokens``
    tok_len: np.ndarray
    tokens: np.ndarray  # uint32, every row's tokens
    image: np.ndarray  # float32 [pins, d]
    has_image: np.ndarray  # bool [pins]
    seg_vocab: list[str]
    seg_code: np.ndarray  # uint16 per pin, 0 = no segment


def _metadata_features(metadata_dir: Path, max_tokens: int) -> _MetadataFeatures:
    """Read the day's pins and boards and compute their tokens, image vectors and segment codes."""
    pins = _read_table(metadata_dir / "pins", "pin_id", ("title", "description"), ("image_embedding", "segment"))
    boards = _read_table(metadata_dir / "boards", "board_id", ("name", "description"), ())
    n_pins, n_boards = pins.num_rows, boards.num_rows

    # Text tokens (vectorised over all pins, then all boards).
    pin_off, pin_tok = tokenize_batch(pins.column("title"), pins.column("description"), max_tokens=max_tokens)
    board_off, board_tok = tokenize_batch(boards.column("name"), boards.column("description"), max_tokens=max_tokens)
    image_meta, has_image_meta = _image_matrix(pins.column("image_embedding"), metadata_dir / "pins")
    segments_col = pins.column("segment")
    seg_vocab = sorted(set(pc.unique(segments_col.drop_null()).to_pylist())) if n_pins else []
    if len(seg_vocab) >= np.iinfo(np.uint16).max:
        raise FeatureStoreError(f"{metadata_dir / 'pins'}: column 'segment' holds {len(seg_vocab)} distinct values")
    seg_code_meta = np.zeros(n_pins, dtype=np.uint16)
    if seg_vocab:
        idx = pc.index_in(segments_col, value_set=pa.array(seg_vocab, pa.large_string()))
        seg_code_meta = (np.asarray(pc.fill_null(idx, -1), dtype=np.int64) + 1).astype(np.uint16)

    # Metadata rows: codes, ids, and where their features live.
    return _MetadataFeatures(
        n_pins=n_pins,
        n_boards=n_boards,
        codes=np.concatenate(
            [
                np.full(n_pins, NODE_TYPE_CODE["pin"], np.int8),
                np.full(n_boards, NODE_TYPE_CODE["board"], np.int8),
            ]
        ),
        ids=np.concatenate(
            [np.asarray(pins.column("pin_id"), np.int64), np.asarray(boards.column("board_id"), np.int64)]
        ),
        tok_off=(
            np.concatenate([pin_off[:-1], board_off[:-1] + pin_off[-1]]) if n_pins + n_boards else np.zeros(0, np.int64)
        ),
        tok_len=np.concatenate([np.diff(pin_off), np.diff(board_off)]),
        tokens=np.concatenate([pin_tok, board_tok]),
        image=image_meta,
        has_image=has_image_meta,
        seg_vocab=seg_vocab,
        seg_code=seg_code_meta,
    )


def _graph_nodes(snapshot) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(type codes, ids, degrees) of the graph's pins and boards (the key space has no other types)."""
    if snapshot is not None and snapshot.num_nodes:
        g_codes = np.asarray(snapshot.node_type, dtype=np.int8)
        g_ids = np.asarray(snapshot.node_id, dtype=np.int64)
        g_deg = np.asarray(snapshot.degree(), dtype=np.int64)
        keep = np.isin(g_codes, list(NODE_TYPE_CODE.values()))
        return g_codes[keep], g_ids[keep], g_deg[keep]
    return np.zeros(0, np.int8), np.zeros(0, np.int64), np.zeros(0, np.int64)


def _union(meta: _MetadataFeatures, g_codes: np.ndarray, g_ids: np.ndarray):
    """Union of (code, id), sorted by key bytes = (code, id as uint64 big-endian): (codes, ids, metadata row
    or -1, graph row or -1) per record."""
    all_codes = np.concatenate([meta.codes, g_codes])
    all_ids = np.concatenate([meta.ids, g_ids])
    source = np.concatenate([np.arange(meta.ids.size), np.full(g_ids.size, -1)])  # metadata row or -1
    graph_row = np.concatenate([np.full(meta.ids.size, -1), np.arange(g_ids.size)])
    order = np.lexsort((graph_row, all_ids.view(np.uint64), all_codes.astype(np.uint8)))
    sc, si = all_codes[order], all_ids[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = (sc[1:] != sc[:-1]) | (si[1:] != si[:-1])
    group = np.cumsum(first) - 1
    n = int(first.sum())
    meta_row = np.full(n, -1, dtype=np.int64)
    g_row = np.full(n, -1, dtype=np.int64)
    src_sorted, g_sorted = source[order], graph_row[order]
    has_m = src_sorted >= 0
    meta_row[group[has_m]] = src_sorted[has_m]
    has_g = g_sorted >= 0
    g_row[group[has_g]] = g_sorted[has_g]
    return sc[first], si[first], meta_row, g_row


@dataclass
class _Records:
    """Every record's fields, in key order (``encode_records``' inputs)."""

    flags: np.ndarray
    segment: np.ndarray
    degree: np.ndarray
    tok_off: np.ndarray
    tokens: np.ndarray
    image: np.ndarray


def _records(meta: _MetadataFeatures, codes, meta_row, g_row, g_deg) -> _Records:
    """Gather each record's features from its metadata row and graph node."""
    n = codes.size
    d = meta.image.shape[1]
    in_meta = meta_row >= 0
    in_graph = g_row >= 0
    degree = np.where(in_graph, g_deg[np.maximum(g_row, 0)] if g_deg.size else 0, 0)
    flags = (FLAG_METADATA * in_meta + FLAG_IN_GRAPH * in_graph).astype(np.uint8)
    segment = np.zeros(n, dtype=np.uint16)
    image = np.zeros((n, d), dtype=np.float32)
    is_pin_meta = in_meta & (codes == NODE_TYPE_CODE["pin"])
    pin_rows = meta_row[is_pin_meta]  # metadata row == pins row for pins (pins come first)
    segment[is_pin_meta] = meta.seg_code[pin_rows]
    if d:
        img_present = np.zeros(n, dtype=bool)
        img_present[is_pin_meta] = meta.has_image[pin_rows]
        image[is_pin_meta] = meta.image[pin_rows]
        flags |= (FLAG_IMAGE * img_present).astype(np.uint8)
    # Tokens in record order (CSR gather).
    tok_len = np.zeros(n, dtype=np.int64)
    tok_len[in_meta] = meta.tok_len[meta_row[in_meta]]
    tok_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(tok_len, out=tok_off[1:])
    src_start = np.zeros(n, dtype=np.int64)
    src_start[in_meta] = meta.tok_off[meta_row[in_meta]]
    gather = np.repeat(src_start - tok_off[:-1], tok_len) + np.arange(tok_off[-1])
    tokens = meta.tokens[gather] if gather.size else np.zeros(0, np.uint32)
    return _Records(flags, segment, degree, tok_off, tokens, image)


def _manifest(meta: _MetadataFeatures, codes, meta_row, g_row, rec: _Records, buf, max_tokens, source_partition):
    in_meta, in_graph = meta_row >= 0, g_row >= 0
    names = {v: k for k, v in NODE_TYPE_CODE.items()}
    count_by_type = {names[c]: int(np.count_nonzero(codes == c)) for c in NODE_TYPE_CODE.values()}
    return {
        "format": FORMAT,
        "record_version": RECORD_VERSION,
        "key_layout": "uint8 type code + big-endian int64 id",
        "node_type_code": dict(NODE_TYPE_CODE),
        "image_dim": int(meta.image.shape[1]),
        "max_tokens": int(max_tokens),
        "tokenizer_version": TOKENIZER_VERSION,
        "segments": meta.seg_vocab,
        "source_partition": source_partition,
        "entities": int(codes.size),
        "entities_by_type": count_by_type,
        "entities_with_metadata": int(in_meta.sum()),
        "entities_in_graph": int(in_graph.sum()),
        "entities_without_metadata": int((~in_meta).sum()),
        "entities_outside_graph": int((~in_graph).sum()),
        "entities_with_image": int(((rec.flags & FLAG_IMAGE) != 0).sum()),
        "tokens_total": int(rec.tok_off[-1]),
        "record_bytes": int(buf.size),
        "metadata_rows": {"pins": meta.n_pins, "boards": meta.n_boards},
    }


def build_feature_store(
    metadata_dir: Path,
    snapshot,
    out_dir: Path,
    max_tokens: int = STORE_MAX_TOKENS,
    source_partition: str = "",
    writer_processes: int | None = None,
    min_records_per_process: int = MIN_RECORDS_PER_PROCESS,
) -> dict:
    """Build the store of one day into ``out_dir`` (a fresh directory the caller publishes).

    ``metadata_dir`` is ``warehouse/entity_metadata/dt=D`` (``pins/*.parquet``: pin_id, title, description,
    image_embedding, segment; ``boards/*.parquet``: board_id, name, description). ``snapshot`` is the day's
    ``GraphSnapshot`` (or None: no graph). Records: every pin and board of the metadata and every node of
    the graph (a node without metadata gets empty features and its degree). ``writer_processes`` and
    ``min_records_per_process``: see ``write_store`` (the content does not depend on them). Returns the
    manifest.
    """
    t0 = time.perf_counter()
    metadata_dir = Path(metadata_dir)
    if max_tokens < 1 or max_tokens > np.iinfo(np.uint16).max:
        raise ValueError(f"max_tokens={max_tokens} out of range [1, 65535]")
    meta = _metadata_features(metadata_dir, max_tokens)
    g_codes, g_ids, g_deg = _graph_nodes(snapshot)
    codes, ids, meta_row, g_row = _union(meta, g_codes, g_ids)
    rec = _records(meta, codes, meta_row, g_row, g_deg)
    t_features = time.perf_counter() - t0

    buf, offsets = encode_records(rec.flags, rec.segment, rec.degree, rec.tok_off, rec.tokens, rec.image)
    keys = encode_keys(codes, ids)
    manifest = _manifest(meta, codes, meta_row, g_row, rec, buf, max_tokens, source_partition)
    t_encode = time.perf_counter()
    sizes = write_store(Path(out_dir), keys, buf, offsets, manifest, writer_processes, min_records_per_process)
    t_write = time.perf_counter() - t_encode
    manifest.update(
        sizes,
        build_seconds=round(time.perf_counter() - t0, 3),
        feature_seconds=round(t_features, 3),
        write_seconds=round(t_write, 3),
    )
    # The human copy holds the sizes and timings too (the in-DB manifest is written before they are known).
    (Path(out_dir) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
