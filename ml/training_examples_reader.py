"""Reading a ``training_examples`` partition back (the writer is ``ml.training_examples``): ``TrainingData``.

``load_training_examples(dir)`` reads the Parquet tables of ``ml.training_examples.OUTPUT_TABLES`` (each
checked against its schema, naming the file and column otherwise) and the manifest; ``list_column`` turns a
list<int64> column (the sequences' ``history`` / ``future``) into offsets and values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ml.training_examples import NODE_SCHEMA, OUTPUT_TABLES, PAIR_SCHEMA, SEQUENCE_SCHEMA

_SCHEMAS = {
    "pairs": PAIR_SCHEMA,
    "eval_pairs": PAIR_SCHEMA,
    "sequences": SEQUENCE_SCHEMA,
    "eval_sequences": SEQUENCE_SCHEMA,
    "feature_nodes": NODE_SCHEMA,
    "eval_feature_nodes": NODE_SCHEMA,
    "universe": NODE_SCHEMA,
    "future_pairs": PAIR_SCHEMA,
}
#: Tables a partition written before they existed lacks (read as empty / None).
_OPTIONAL = ("universe", "future_pairs")


@dataclass
class TrainingData:
    """One ``training_examples`` partition in memory (Arrow tables; schemas of ml.training_examples)."""

    pairs: pa.Table
    eval_pairs: pa.Table
    sequences: pa.Table
    eval_sequences: pa.Table
    feature_nodes: pa.Table
    eval_feature_nodes: pa.Table
    manifest: dict = field(default_factory=dict)
    universe_table: pa.Table | None = None  # entity_type, entity_id: every pin and board of the day
    path: Path | None = None
    # the time split (ml.time_split): pairs first engaged in the window's last days; empty when not written
    future_pairs: pa.Table = field(default_factory=PAIR_SCHEMA.empty_table)

    def universe(self) -> dict[str, np.ndarray]:
        """Entity ids per type (sorted) of the day's universe; falls back to every id the tables mention
        when the partition has no ``universe.parquet``."""
        t = self.universe_table
        if t is None or t.num_rows == 0:
            parts = [
                pa.table({"entity_type": x["query_type"], "entity_id": x["query_id"]})
                for x in (self.pairs, self.eval_pairs)
            ]
            parts += [
                pa.table({"entity_type": x["pos_type"], "entity_id": x["pos_id"]})
                for x in (self.pairs, self.eval_pairs)
            ]
            parts += [x.select(["entity_type", "entity_id"]) for x in (self.feature_nodes, self.eval_feature_nodes)]
            t = pa.concat_tables([p.cast(NODE_SCHEMA) for p in parts])
        out = {}
        for name in ("pin", "board"):
            ids = t.filter(pc.equal(t["entity_type"], name))["entity_id"].to_numpy()
            out[name] = np.unique(np.asarray(ids, dtype=np.int64))
        return out

    @property
    def day(self) -> str | None:
        return self.manifest.get("window_end")


def _read(path: Path, name: str, required: bool) -> pa.Table | None:
    f = path / f"{name}.parquet"
    if not f.is_file():
        if required:
            raise FileNotFoundError(f"{f} not found: {path} is not a training_examples partition")
        return None
    t = pq.read_table(f)
    want = _SCHEMAS[name]
    missing = [c for c in want.names if c not in t.column_names]
    if missing:
        raise ValueError(f"{f}: column(s) {missing} missing (expected {want.names})")
    try:
        return t.select(want.names).cast(want)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{f}: columns do not cast to {want}: {exc}") from exc


def load_training_examples(path: Path | str) -> TrainingData:
    """Read a directory written by ``ml.training_examples.build_training_examples``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"training examples directory {path} does not exist")
    tables = {name: _read(path, name, name not in _OPTIONAL) for name in OUTPUT_TABLES}
    mpath = path / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
    return TrainingData(
        pairs=tables["pairs"],
        eval_pairs=tables["eval_pairs"],
        sequences=tables["sequences"],
        eval_sequences=tables["eval_sequences"],
        feature_nodes=tables["feature_nodes"],
        eval_feature_nodes=tables["eval_feature_nodes"],
        manifest=manifest,
        universe_table=tables["universe"],
        path=path,
        future_pairs=PAIR_SCHEMA.empty_table() if tables["future_pairs"] is None else tables["future_pairs"],
    )


def list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list<int64> column -> (offsets int64 [n+1], values int64) with nulls as empty lists."""
    col = table[name].combine_chunks() if table.num_rows else pa.array([], pa.list_(pa.int64()))
    col = pc.fill_null(col, pa.scalar([], pa.list_(pa.int64()))) if col.null_count else col
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    offsets = np.asarray(col.offsets.to_numpy(), dtype=np.int64)
    values = np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.int64)
    # a sliced list array has offsets not starting at 0
    return offsets - offsets[0], values[offsets[0] : offsets[-1]] if offsets.size else values
