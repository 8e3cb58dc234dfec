"""Bulk load of a new RocksDB from pre-encoded, key-sorted records: several SST files written in parallel
processes, then ingested together (paper 3.4.1 "Featurizer": the day's store is built once, read many times).

The records arrive as one key matrix (uint8 [n, k], sorted) and one value buffer with offsets, so the only
per-record work left is the SST writer's put (rocksdict has no multi-put). Record ranges are contiguous in
key order, so each file's keys are sorted and the files cover disjoint key ranges: RocksDB ingests them
into the bottom level side by side, with no compaction.

Only numpy and rocksdict are imported here: a writer process pays for nothing else.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from rocksdict import DBCompressionType, IngestExternalFileOptions, Options, Rdict, SstFileWriter

#: Records per writer process at least: a writer costs an interpreter start (~0.25 s) and saving the records
#: it reads, against ~1-2 us per put it takes over, so it pays only for large stores (benchmarks/builders.py).
MIN_RECORDS_PER_PROCESS = 500_000


def store_options() -> Options:
    """Options of writer and readers alike: raw byte keys/values; no block compression (float16 vectors
    and hash ids barely compress and decompression would cost on every lookup); mmap reads (measured ~1.4x
    faster batched point lookups than pread on the benchmark box)."""
    opt = Options(raw_mode=True)
    opt.set_compression_type(DBCompressionType.none())
    opt.set_allow_mmap_reads(True)
    return opt


def default_processes() -> int:
    """min(2, cores this process may run on)."""
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def record_ranges(n: int, processes: int, min_records_per_process: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges of n records, one per writer: at most ``processes`` of them, each of at
    least ``min_records_per_process`` records (one range, possibly empty, when n is small)."""
    if processes < 1 or min_records_per_process < 1:
        raise ValueError(f"processes={processes} and min_records_per_process={min_records_per_process} must be >= 1")
    k = max(1, min(processes, n // min_records_per_process))
    return list(itertools.pairwise(i * n // k for i in range(k + 1)))


def keys_strictly_increasing(keys: np.ndarray) -> bool:
    """True when the rows of a uint8 key matrix are strictly increasing as byte strings (vectorised)."""
    if keys.shape[0] < 2:
        return True
    diff = keys[1:].astype(np.int16) - keys[:-1].astype(np.int16)
    nonzero = diff != 0
    first = np.argmax(nonzero, axis=1)  # first differing byte of each neighbour pair
    return bool(nonzero.any(axis=1).all() and (diff[np.arange(diff.shape[0]), first] > 0).all())


def write_sst(
    path: Path,
    keys: np.ndarray,
    values: np.ndarray,
    offsets: np.ndarray,
    lo: int,
    hi: int,
    trailer: tuple[bytes, bytes] | None = None,
) -> int:
    """Write records [lo, hi) (and ``trailer``, a key sorting after all of them) into one SST file.
    ``offsets`` index ``values`` absolutely. Returns the file's size in bytes."""
    width = keys.shape[1]
    kbuf = np.ascontiguousarray(keys[lo:hi]).tobytes()
    base = int(offsets[lo])
    vbuf = np.asarray(values[base : int(offsets[hi])]).tobytes()
    ends = (np.asarray(offsets[lo + 1 : hi + 1]) - base).tolist()
    writer = SstFileWriter(options=store_options())
    writer.open(str(path))
    start = 0
    for i, end in enumerate(ends):
        writer[kbuf[width * i : width * (i + 1)]] = vbuf[start:end]
        start = end
    if trailer is not None:
        writer[trailer[0]] = trailer[1]
    writer.finish()
    return Path(path).stat().st_size


def _write_sst_from_files(array_dir: Path, path: Path, lo: int, hi: int, with_trailer: bool) -> int:
    """Writer process body: the record arrays (and the trailer) are memory-mapped from ``array_dir``."""
    arrays = {n: np.load(array_dir / f"{n}.npy", mmap_mode="r") for n in ("keys", "values", "offsets")}
    trailer = None
    if with_trailer:
        key_len = int((array_dir / "trailer.len").read_text())
        raw = (array_dir / "trailer.bin").read_bytes()
        trailer = (raw[:key_len], raw[key_len:])
    return write_sst(path, arrays["keys"], arrays["values"], arrays["offsets"], lo, hi, trailer)


def _save_arrays(array_dir: Path, keys, values, offsets, first: int, trailer) -> None:
    """Records [first, n) for the writer processes, rebased so their offsets start at 0."""
    array_dir.mkdir()
    base = int(offsets[first])
    parts = (
        ("keys", keys[first:]),
        ("values", values[base : int(offsets[-1])]),
        ("offsets", offsets[first:] - base),
    )
    for name, arr in parts:
        np.save(array_dir / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
    if trailer is not None:
        (array_dir / "trailer.len").write_text(str(len(trailer[0])))
        (array_dir / "trailer.bin").write_bytes(trailer[0] + trailer[1])


def _start_writer(array_dir: Path, path: Path, lo: int, hi: int, with_trailer: bool) -> subprocess.Popen:
    package_root = str(Path(__file__).resolve().parents[1])  # this checkout, not another installed copy
    pythonpath = os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))
    cmd = [sys.executable, "-m", "graph_engine.sst_writer", str(array_dir), str(path), str(lo), str(hi)]
    return subprocess.Popen(
        [*cmd, "1" if with_trailer else "0"],
        env=dict(os.environ, PYTHONPATH=pythonpath),
        stderr=subprocess.PIPE,
    )


def write_ssts(
    sst_dir: Path,
    keys: np.ndarray,
    values: np.ndarray,
    offsets: np.ndarray,
    trailer: tuple[bytes, bytes] | None,
    processes: int,
    min_records_per_process: int = MIN_RECORDS_PER_PROCESS,
) -> list[Path]:
    """Write the key-sorted records as one SST file per range of ``record_ranges`` (the trailer goes in the
    last one). The first range is written here; each further one by its own writer process, started first.

    Writers are fresh interpreters running this module (``python -m graph_engine.sst_writer``) that
    memory-map the records they need: not fork (the caller may hold threads, e.g. Dagster's or numba's,
    that a fork copies in a broken state) and not multiprocessing's spawn (it re-imports the caller's main
    module, i.e. all of Dagster or torch)."""
    sst_dir = Path(sst_dir)
    ranges = record_ranges(keys.shape[0], processes, min_records_per_process)
    paths = [sst_dir / f"records-{i:03d}.sst" for i in range(len(ranges))]
    last = len(ranges) - 1
    writers = []
    if last:
        first = ranges[1][0]
        _save_arrays(sst_dir / "arrays", keys, values, offsets, first, trailer)
        writers = [
            _start_writer(sst_dir / "arrays", paths[i], lo - first, hi - first, i == last and trailer is not None)
            for i, (lo, hi) in enumerate(ranges[1:], start=1)
        ]
    try:
        write_sst(paths[0], keys, values, offsets, *ranges[0], trailer if not last else None)
    finally:
        failures = []
        for path, proc in zip(paths[1:], writers):
            _, err = proc.communicate()
            if proc.returncode != 0:
                failures.append(f"{path.name}: exit code {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    if failures:
        raise RuntimeError("SST writer process(es) failed: " + "; ".join(failures))
    return paths


def ingest(db_dir: Path, sst_files: list[Path]) -> None:
    """Create the DB at ``db_dir`` from SST files of disjoint key ranges (moved, not copied)."""
    db = Rdict(str(db_dir), options=store_options())
    try:
        opts = IngestExternalFileOptions()
        opts.set_move_files(True)  # hard-link the SSTs into the DB instead of copying them
        db.ingest_external_file([str(p) for p in sst_files], opts)
        db.flush()
    finally:
        db.close()


if __name__ == "__main__":  # one writer process: ARRAY_DIR SST_PATH LO HI WITH_TRAILER
    _dir, _path, _lo, _hi, _trailer = sys.argv[1:]
    _write_sst_from_files(Path(_dir), Path(_path), int(_lo), int(_hi), _trailer == "1")
