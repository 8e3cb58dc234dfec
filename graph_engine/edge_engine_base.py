"""The edge engines' shared interface (:class:`EdgeEngine`) and helpers: column types, input checks and the
Table 1 statistics (paper 4.1, appendix A.1).

Both implementations (``graph_engine.spark_engine``, ``graph_engine.duckdb_engine``) import this module;
``graph_engine.edge_engine`` picks one of them. Stats are the paper's Table 1 (4.1): node count and average
degree per node type, edge count per edge type; for pruning, before and after plus the kept fraction.
``degree`` of a node = entries in its own adjacency list (an undirected edge is one entry in each endpoint's
list).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from graph_engine.holdout import Holdout
from graph_engine.pruning import EDGE_TYPES, KEY_TYPE_CODE, PruningParams, d_target

#: The contract's edge columns with their Arrow / DuckDB / Spark types.
EDGE_ARROW_TYPES = {
    "src_type": "string",
    "src_id": "int64",
    "dst_type": "string",
    "dst_id": "int64",
    "edge_type": "string",
    "weight": "float64",
}

#: Columns of the validated engagement logs the edge rules read (warehouse layout).
EVENT_COLUMNS = {
    "user_id": "int64",
    "action": "string",
    "surface": "string",
    "pin_id": "int64",
    "board_id": "int64",
    "query_pin_id": "int64",
}


class EdgeInputError(ValueError):
    """An input file of edge extraction or pruning cannot be read as the expected table."""


def parquet_files(directory: Path | None) -> list[Path]:
    """The ``*.parquet`` files of a partition directory (Spark's _SUCCESS/.crc files are not data)."""
    if directory is None:
        return []
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    return sorted(p for p in directory.glob("*.parquet") if p.is_file())


def require_parquet_columns(files: Sequence[Path], columns) -> int:
    """Check every file is Parquet with the named columns (naming file and column otherwise); returns
    the total row count from the footers (no data read). Spark would read a missing column as nulls
    when given an explicit schema, so both engines check first."""
    import pyarrow.parquet as pq

    rows = 0
    for f in files:
        try:
            meta = pq.read_metadata(f)
        except Exception as exc:  # pyarrow raises several types for corrupt/empty files
            raise EdgeInputError(f"{f}: not a readable Parquet file ({exc})") from exc
        names = set(meta.schema.to_arrow_schema().names)
        for col in columns:
            if col not in names:
                raise EdgeInputError(f"{f}: required column {col!r} is missing")
        rows += meta.num_rows
    return rows


def nodes_before_after(hist, params: PruningParams) -> tuple[dict, dict]:
    """Per node type (nodes, entries) before and after pruning, from the degree histogram
    ``[(node_type, d, nodes with that degree), ...]``: a node of degree d keeps min(d, d_target(d))
    entries, and at least one (d_target >= 1 as d_max >= 1 and floor(d ** alpha) >= 1), so the node
    set is unchanged (Algorithm 2, line 10)."""
    before: dict[str, list[int]] = {}
    after: dict[str, list[int]] = {}
    if not hist:
        return {}, {}
    types = [h[0] for h in hist]
    d = np.asarray([h[1] for h in hist], dtype=np.int64)
    n = np.asarray([h[2] for h in hist], dtype=np.int64)
    kept = np.minimum(d, d_target(d, params))
    for t, di, ni, ki in zip(types, d.tolist(), n.tolist(), kept.tolist()):
        b = before.setdefault(t, [0, 0])
        b[0] += ni
        b[1] += ni * di
        a = after.setdefault(t, [0, 0])
        a[0] += ni if ki > 0 else 0
        a[1] += ni * ki
    return {t: tuple(v) for t, v in before.items()}, {t: tuple(v) for t, v in after.items()}


def window_edge_types(rows, dirs) -> dict[str, dict]:
    """Validate the window-summed undirected edges from one grouped aggregation
    ``(edge_type, src_type, dst_type, rows, sum(weight), rows with a null id or weight)`` and return
    the per-edge-type figures before pruning. Unknown types would have no sampling key: fail, naming
    the input directories."""
    edges: dict[str, dict] = {}
    for edge_type, src_type, dst_type, n, w, nulls in rows:
        if edge_type not in EDGE_TYPES or src_type not in KEY_TYPE_CODE or dst_type not in KEY_TYPE_CODE or nulls:
            raise EdgeInputError(
                f"daily edges in {[str(d) for d in dirs]}: {int(n)} row(s) with edge_type={edge_type!r}, "
                f"src_type={src_type!r}, dst_type={dst_type!r} ({int(nulls or 0)} with a null id or "
                f"weight): expected edge types {list(EDGE_TYPES)} between {sorted(KEY_TYPE_CODE)} nodes"
            )
        fig = edges.setdefault(edge_type, {"edges": 0, "entries": 0, "weight": 0.0})
        fig["edges"] += int(n)
        fig["entries"] += 2 * int(n)
        fig["weight"] += float(w)
    return edges


def prune_stats(days: int, before: dict, after: dict, checks: dict) -> dict[str, Any]:
    kept = after["total_entries"] / before["total_entries"] if before["total_entries"] else 1.0
    return {"days": days, "before": before, "after": after, "kept_fraction": round(kept, 6), "checks": checks}


def table1(nodes: dict[str, tuple[int, int]], edges: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Table 1 from per-node-type (node count, adjacency entries) and per-edge-type figures."""
    node_types = {}
    for t in sorted(nodes):
        n, entries = nodes[t]
        node_types[t] = {
            "nodes": int(n),
            "entries": int(entries),
            "avg_degree": round(entries / n, 4) if n else 0.0,
        }
    return {
        "node_types": node_types,
        "edge_types": {
            e: {k: (int(v) if k != "weight" else float(v)) for k, v in edges[e].items()} for e in sorted(edges)
        },
        "total_nodes": int(sum(n for n, _ in nodes.values())),
        "total_entries": int(sum(e for _, e in nodes.values())),
    }


def empty_checks() -> dict[str, int]:
    return {"self_loops": 0, "unknown_edge_types": 0, "nonpositive_weights": 0}


def summarize_edge_types(rows, undirected: bool) -> tuple[dict[str, dict], dict[str, int]]:
    """Per-edge-type figures and the asset checks from one grouped aggregation of an edge table:
    rows ``(edge_type, rows, sum(weight), self loops, weights null/NaN/<= 0)``. Unknown edge types
    (including null) show up as group keys, so no separate scan is needed."""
    edges: dict[str, dict] = {}
    checks = empty_checks()
    for edge_type, n, w, loops, nonpositive in rows:
        n = int(n)
        checks["self_loops"] += int(loops or 0)
        checks["nonpositive_weights"] += int(nonpositive or 0)
        if edge_type not in EDGE_TYPES:
            checks["unknown_edge_types"] += n
        figures = {"edges": n, "entries": 2 * n} if undirected else {"entries": n}
        figures["weight"] = float(w or 0.0)
        edges[str(edge_type)] = figures
    return edges, checks


@runtime_checkable
class EdgeEngine(Protocol):
    """Edge extraction and windowed pruning; ``out_dir`` exists and is empty (a publish staging dir)."""

    name: str

    def extract_daily_edges(
        self, events_dir: Path | None, out_dir: Path, held_out_users: Holdout | None = None
    ) -> dict[str, Any]:
        """Validated events of one day -> canonical undirected edges with the day's count as weight.

        ``events_dir`` None or without parquet files is an empty day: an empty, typed edge table is
        written. ``held_out_users``: the events of the users it holds out (the user-entity evaluation's,
        ``graph_engine.holdout.held_out_users``) are left out, so the graph never holds their engagement.
        Returns ``{"events": rows read, "held_out_user_events": rows left out, "table1": ..., "checks": {...}}``.
        """
        ...

    def prune_window(
        self,
        daily_edge_dirs: Sequence[Path],
        out_dir: Path,
        params: PruningParams,
        holdout: Holdout | None = None,
    ) -> dict[str, Any]:
        """Sum the daily edges of the window per undirected edge, drop the held-out evaluation pairs
        (``holdout``; graph_engine.holdout), then Algorithm 2 per adjacency list.

        Writes one row per kept directed entry (src = the node whose list it is). Returns
        ``{"days": n, "before": table1, "after": table1, "kept_fraction": x, "checks": {...}}``.
        """
        ...
