"""Snapshot, tokenizer and feature-store builders: the earlier per-row Python steps against the current ones,
in the same run, on the same synthetic data (results checked equal before any time is printed).

    python benchmarks/builders.py                    # 1M edge entries, 200K entities
    python benchmarks/builders.py --entries 200000 --entities 50000 --processes 2

- snapshot edge types: object array of strings + ``np.unique`` (before) vs. per-file Arrow codes remapped
  by a lookup table (``graph_engine.snapshot``);
- tokenizer: every text as a Python string joined in Python (before) vs. Arrow joins and the UTF-8 buffer
  (``graph_engine.tokenizer.tokenize_batch``);
- feature store write: one SST file written in this process (before) vs. ``--processes`` writer processes
  (``graph_engine.sst_writer``), each ingested into a fresh RocksDB.

The last line of output is one JSON object. Timings on a shared, loaded machine say little.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from graph_engine.feature_store import MANIFEST_KEY, encode_keys, encode_records
from graph_engine.snapshot import _global_edge_type_codes
from graph_engine.sst_writer import ingest, write_ssts
from graph_engine.tokenizer import _tokenize_kernel, tokenize_batch, word_char_table


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


# ------------------------------------------------------------------------------ earlier implementations


def edge_types_before(columns: list[pa.ChunkedArray]) -> tuple[list[str], np.ndarray]:
    edge_type = np.concatenate([c.to_numpy(zero_copy_only=False).astype(object) for c in columns])
    names, codes = np.unique(edge_type.astype(str), return_inverse=True)
    return [str(t) for t in names], codes


def edge_types_now(columns: list[pa.ChunkedArray]) -> tuple[list[str], np.ndarray]:
    parts = []
    for c in columns:
        names = pc.unique(c)
        codes = pc.index_in(c, value_set=names).to_numpy()
        parts.append({"edge_type_names": np.array(names.to_pylist(), dtype=object), "edge_type_code": codes})
    return _global_edge_type_codes(parts)


def tokenize_before(*fields, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The earlier ``tokenize_batch``: to_pylist over whole columns, the join built in Python."""
    columns = [pc.fill_null(f.cast(pa.large_string()), "").to_pylist() for f in fields]
    n, n_fields = len(columns[0]), len(columns)
    segments = [""] * (n * n_fields)
    for f, col in enumerate(columns):
        segments[f::n_fields] = col
    joined = "\x00".join(segments)
    data = np.frombuffer(
        unicodedata.normalize("NFKC", joined.casefold()).encode("utf-8", "surrogatepass"), dtype=np.uint8
    )
    bounds = np.concatenate(([-1], np.flatnonzero(data == 0), [data.shape[0]]))[::n_fields]
    max_entity_bytes = int(np.max(np.diff(bounds))) if bounds.shape[0] > 1 else 0
    return _tokenize_kernel(data, word_char_table(), n, n_fields, int(max_tokens), max_entity_bytes)


# ----------------------------------------------------------------------------------------------- data


def edge_type_columns(entries: int, files: int, rng) -> list[pa.ChunkedArray]:
    names = np.array(["pin_board", "pin_pin"])
    return [
        pa.chunked_array([pa.array(names[rng.integers(0, 2, entries // files)], pa.string())]) for _ in range(files)
    ]


def text_columns(entities: int, rng) -> tuple[pa.Array, pa.Array]:
    words = np.array(["Red", "running", "shoes", "chocolate", "CAKE", "recipe", "garden", "ideas", "Café", "été"])
    title = [" ".join(words[rng.integers(0, 10, 4)]) if i % 11 else None for i in range(entities)]
    desc = [" ".join(words[rng.integers(0, 10, 12)]) for i in range(entities)]
    return pa.array(title, pa.large_string()), pa.array(desc, pa.large_string())


def records(entities: int, rng):
    keys = encode_keys(np.zeros(entities, np.int8), np.sort(rng.choice(10**12, entities, replace=False)))
    n_tok = rng.integers(0, 32, entities)
    tok_off = np.concatenate(([0], np.cumsum(n_tok))).astype(np.int64)
    flags = np.full(entities, 3, np.uint8)
    image = rng.standard_normal((entities, 64)).astype(np.float32)
    tokens = rng.integers(0, 2**32, tok_off[-1], dtype=np.uint64).astype(np.uint32)
    buf, offsets = encode_records(flags, np.zeros(entities, np.uint16), n_tok, tok_off, tokens, image)
    return keys, buf, offsets


def store_write(work: Path, keys, buf, offsets, processes: int) -> None:
    shutil.rmtree(work, ignore_errors=True)
    (work / "sst").mkdir(parents=True)
    files = write_ssts(work / "sst", keys, buf, offsets, (MANIFEST_KEY, b"{}"), processes, 1)
    ingest(work / "db", files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000, help="snapshot edge entries")
    ap.add_argument("--entities", type=int, default=200_000, help="entities tokenized and stored")
    ap.add_argument("--processes", type=int, default=2, help="SST writer processes of the current build")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    figures: dict[str, dict] = {}

    cols = edge_type_columns(args.entries, 4, rng)
    (names_a, codes_a), before = _timed(edge_types_before, cols)
    (names_b, codes_b), now = _timed(edge_types_now, cols)
    assert names_a == names_b and np.array_equal(codes_a, codes_b)
    figures["snapshot_edge_types"] = {
        "rows": args.entries,
        "before_s": round(before, 3),
        "now_s": round(now, 3),
    }

    title, desc = text_columns(args.entities, rng)
    tokenize_batch(["warm up"])  # word table and compiled kernel load once per process: in neither figure
    (off_a, tok_a), before = _timed(tokenize_before, title, desc, max_tokens=32)
    (off_b, tok_b), now = _timed(tokenize_batch, title, desc, max_tokens=32)
    assert np.array_equal(off_a, off_b) and np.array_equal(tok_a, tok_b)
    figures["tokenize"] = {"entities": args.entities, "before_s": round(before, 3), "now_s": round(now, 3)}

    keys, buf, offsets = records(args.entities, rng)
    with tempfile.TemporaryDirectory() as tmp:
        _, before = _timed(store_write, Path(tmp) / "one", keys, buf, offsets, 1)
        _, now = _timed(store_write, Path(tmp) / "many", keys, buf, offsets, args.processes)
    figures["feature_store_write"] = {
        "records": args.entities,
        "record_bytes": int(buf.size),
        "processes": args.processes,
        "before_s": round(before, 3),
        "now_s": round(now, 3),
    }
    for name, f in figures.items():
        print(f"{name}: before {f['before_s']:.3f} s, now {f['now_s']:.3f} s")
    print(json.dumps({"benchmark": "builders", "machine": f"{platform.node()} {os.cpu_count()} cpu", **figures}))


if __name__ == "__main__":
    main()
