"""The snapshot build is byte-stable: a fixed input gives the arrays (sha256 of every .npy) and manifest
recorded in ``tests/graph_engine/data/snapshot_golden.json``, which were written by the earlier build that
held edge types as a numpy object array (before edge types became Arrow dictionary codes).

Regenerate only on a deliberate format change: ``python tests/graph_engine/test_snapshot_golden.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from graph_engine.snapshot import build_snapshot

GOLDEN = Path(__file__).parent / "data" / "snapshot_golden.json"
SUBSETS = {
    "pin_board": ("pin_board",),
    "pins": ("pin_pin", "pin_like"),
    "all": ("pin_board", "pin_pin", "pin_like"),
}
#: Manifest fields that hold the machine's paths or timings, not the snapshot's content.
VOLATILE = ("build_seconds", "source_dir")


def _edges(part: int, rows: int) -> dict[str, list]:
    """Deterministic entries (arithmetic, no RNG): three edge types, repeated (src, dst) pairs, sparse ids."""
    cols: dict[str, list] = {k: [] for k in ("src_type", "src_id", "dst_type", "dst_id", "edge_type", "weight")}
    kinds = (
        ("pin", "board", "pin_board"),
        ("pin", "pin", "pin_pin"),
        ("pin", "pin", "pin_like"),
        ("board", "pin", "pin_board"),
    )
    for i in range(rows):
        st, dt, et = kinds[(i * 7 + part) % len(kinds)]
        cols["src_type"].append(st)
        cols["src_id"].append(10**11 + (i * 7919 + part * 31) % 31 * 1_000_003)
        cols["dst_type"].append(dt)
        cols["dst_id"].append(10**11 + (i * 104729 + part) % 23 * 999_983)
        cols["edge_type"].append(et)
        cols["weight"].append(float(1 + (i * 13 + part) % 5))
    return cols


def write_fixture(directory: Path) -> None:
    """Three part files: plain strings, large strings and dictionary-encoded strings."""
    directory.mkdir(parents=True, exist_ok=True)
    encodings = (pa.string(), pa.large_string(), pa.dictionary(pa.int32(), pa.string()))
    for part, string_type in enumerate(encodings):
        cols = _edges(part, 700 + 150 * part)
        table = pa.table(
            {
                "src_type": pa.array(cols["src_type"], pa.string()).cast(string_type),
                "src_id": pa.array(cols["src_id"], pa.int64()),
                "dst_type": pa.array(cols["dst_type"], pa.string()).cast(string_type),
                "dst_id": pa.array(cols["dst_id"], pa.int64()),
                "edge_type": pa.array(cols["edge_type"], pa.string()).cast(string_type),
                "weight": pa.array(cols["weight"], pa.float64()),
            }
        )
        pq.write_table(table, directory / f"part-{part}.parquet")


def content(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in VOLATILE}


def test_snapshot_matches_the_golden_build(tmp_path):
    write_fixture(tmp_path / "edges")
    manifest = build_snapshot(tmp_path / "edges", tmp_path / "snap", subsets=SUBSETS, source_partition="2026-01-01")
    golden = json.loads(GOLDEN.read_text())
    assert golden["subsets"]["all"]["duplicate_entries_merged"] > 0  # the fixture exercises the merge
    assert set(golden["entries_by_edge_type"]) == {"pin_board", "pin_pin", "pin_like"}
    assert content(manifest) == golden


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_fixture(Path(tmp) / "edges")
        built = build_snapshot(Path(tmp) / "edges", Path(tmp) / "snap", subsets=SUBSETS, source_partition="2026-01-01")
    GOLDEN.write_text(json.dumps(content(built), indent=2, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
