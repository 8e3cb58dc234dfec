"""DuckDB implementation of the edge engine: embedded, single machine (OMNISAGE_ENGINE=duckdb).

Same semantics as ``graph_engine.spark_engine`` (see ``graph_engine.pruning`` for the rules). Every
numeric column is cast explicitly: DuckDB's SUM over BIGINT is HUGEINT and COUNT is BIGINT, while the
contract wants int64 ids and a float64 weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from graph_engine.edge_engine_base import (
    EVENT_COLUMNS,
    nodes_before_after,
    parquet_files,
    prune_stats,
    require_parquet_columns,
    summarize_edge_types,
    table1,
    window_edge_types,
)
from graph_engine.holdout import Holdout
from graph_engine.pruning import PruningParams, d_target, sampling_key_sql

_SQL_TYPES = {"string": "VARCHAR", "int64": "BIGINT", "float64": "DOUBLE"}
_EDGE_SELECT = (
    "CAST(src_type AS VARCHAR) AS src_type, CAST(src_id AS BIGINT) AS src_id, "
    "CAST(dst_type AS VARCHAR) AS dst_type, CAST(dst_id AS BIGINT) AS dst_id, "
    "CAST(edge_type AS VARCHAR) AS edge_type, CAST(weight AS DOUBLE) AS weight"
)
_EDGE_COLS = "src_type, src_id, dst_type, dst_id, edge_type, weight"
_EMPTY_EDGES = (
    "SELECT CAST(NULL AS VARCHAR) AS src_type, CAST(NULL AS BIGINT) AS src_id, "
    "CAST(NULL AS VARCHAR) AS dst_type, CAST(NULL AS BIGINT) AS dst_id, "
    "CAST(NULL AS VARCHAR) AS edge_type, CAST(NULL AS DOUBLE) AS weight LIMIT 0"
)


def _lit(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _file_list(files: Sequence[Path]) -> str:
    return "[" + ", ".join(_lit(str(f)) for f in files) + "]"


class DuckDBEdgeEngine:
    name = "duckdb"

    def __init__(self, scratch_dir: Path | None = None, threads: int | None = None, memory_limit: str | None = None):
        self.scratch_dir = Path(scratch_dir) if scratch_dir is not None else None
        self.threads = threads
        self.memory_limit = memory_limit

    def _connect(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(":memory:")
        if self.scratch_dir is not None:
            # Spill files stay under OMNISAGE_HOME (contract), not in the working directory.
            tmp = self.scratch_dir / "duckdb"
            tmp.mkdir(parents=True, exist_ok=True)
            con.execute(f"SET temp_directory = {_lit(str(tmp))}")
        if self.threads:
            con.execute(f"SET threads = {int(self.threads)}")
        if self.memory_limit:
            con.execute(f"SET memory_limit = {_lit(self.memory_limit)}")
        # Row order of the output is not part of the contract; letting it go saves memory.
        con.execute("SET preserve_insertion_order = false")
        return con

    # ------------------------------------------------------------------------------- daily edges

    def extract_daily_edges(
        self, events_dir: Path | None, out_dir: Path, held_out_users: Holdout | None = None
    ) -> dict[str, Any]:
        out_dir = Path(out_dir)
        files = parquet_files(events_dir)
        con = self._connect()
        try:
            n_events = require_parquet_columns(files, EVENT_COLUMNS)
            if files:
                cols = ", ".join(f"CAST({c} AS {_SQL_TYPES[t]}) AS {c}" for c, t in EVENT_COLUMNS.items())
                con.execute(
                    f"CREATE VIEW ev AS SELECT {cols} FROM read_parquet({_file_list(files)}, union_by_name = true)"
                )
            else:
                cols = ", ".join(f"CAST(NULL AS {_SQL_TYPES[t]}) AS {c}" for c, t in EVENT_COLUMNS.items())
                con.execute(f"CREATE VIEW ev AS SELECT {cols} LIMIT 0")
            dropped = _drop_held_out_users(con, held_out_users)
            # Paper 4.1 / contract "Edges":
            #  pin_board - every save (pin_id, board_id); src = the pin, dst = the board.
            #  pin_pin   - a save or click on related_pins whose query pin is known and differs from the
            #              engaged pin; src_id < dst_id so both orientations are one edge.
            query = """
                SELECT 'pin' AS src_type, pin_id AS src_id, 'board' AS dst_type, board_id AS dst_id,
                       'pin_board' AS edge_type, CAST(COUNT(*) AS DOUBLE) AS weight
                FROM ev
                WHERE action = 'save' AND board_id IS NOT NULL AND pin_id IS NOT NULL
                GROUP BY pin_id, board_id
                UNION ALL
                SELECT 'pin', LEAST(query_pin_id, pin_id), 'pin', GREATEST(query_pin_id, pin_id),
                       'pin_pin', CAST(COUNT(*) AS DOUBLE)
                FROM ev
                WHERE surface = 'related_pins' AND action IN ('save', 'click')
                  AND query_pin_id IS NOT NULL AND pin_id IS NOT NULL AND query_pin_id <> pin_id
                GROUP BY LEAST(query_pin_id, pin_id), GREATEST(query_pin_id, pin_id)
            """
            out = out_dir / "part-0.parquet"
            con.execute(
                f"COPY (SELECT {_EDGE_SELECT} FROM ({query}) ORDER BY edge_type, src_id, dst_id) "
                f"TO {_lit(str(out))} (FORMAT parquet)"
            )
            con.execute(f"CREATE VIEW e AS SELECT * FROM read_parquet({_lit(str(out))})")
            return {"events": int(n_events), "held_out_user_events": dropped, **_undirected_table1(con, "e")}
        finally:
            con.close()

    # ---------------------------------------------------------------------------------- pruning

    def prune_window(
        self,
        daily_edge_dirs: Sequence[Path],
        out_dir: Path,
        params: PruningParams,
        holdout: Holdout | None = None,
    ) -> dict[str, Any]:
        out_dir = Path(out_dir)
        dirs = [Path(d) for d in daily_edge_dirs]
        files = [f for d in dirs for f in parquet_files(d)]
        con = self._connect()
        try:
            if files:
                require_parquet_columns(files, _EDGE_COLS.split(", "))
                con.execute(
                    f"CREATE VIEW raw AS SELECT {_EDGE_SELECT} FROM read_parquet("
                    f"{_file_list(files)}, union_by_name = true)"
                )
            else:
                con.execute(f"CREATE VIEW raw AS {_EMPTY_EDGES}")
            # Window sum per undirected edge (contract: the graph of D sums the window's daily edges).
            # Same-type pairs are re-canonicalised (src_id < dst_id) so a non-canonical writer cannot
            # turn one undirected edge into two entries per list.
            con.execute("""
                CREATE TEMP TABLE und AS
                SELECT src_type, src_id, dst_type, dst_id, edge_type, CAST(SUM(weight) AS DOUBLE) AS weight
                FROM (
                    SELECT src_type,
                           CASE WHEN src_type = dst_type AND src_id > dst_id THEN dst_id ELSE src_id END
                               AS src_id,
                           dst_type,
                           CASE WHEN src_type = dst_type AND src_id > dst_id THEN src_id ELSE dst_id END
                               AS dst_id,
                           edge_type, weight
                    FROM raw
                )
                GROUP BY src_type, src_id, dst_type, dst_id, edge_type
            """)
            held_out_edges = _drop_held_out(con, holdout)
            # One entry in each endpoint's adjacency list; d = entries in the node's own list.
            con.execute("""
                CREATE TEMP TABLE deg AS
                SELECT node_type, node_id, CAST(COUNT(*) AS BIGINT) AS d
                FROM (SELECT src_type AS node_type, src_id AS node_id FROM und
                      UNION ALL SELECT dst_type, dst_id FROM und)
                GROUP BY node_type, node_id
            """)
            edges_before = window_edge_types(
                con.execute("""
                SELECT edge_type, src_type, dst_type, COUNT(*), CAST(SUM(weight) AS DOUBLE),
                       COUNT(*) FILTER (WHERE src_id IS NULL OR dst_id IS NULL OR weight IS NULL)
                FROM und GROUP BY ALL
            """).fetchall(),
                dirs,
            )
            hist = con.execute(
                "SELECT node_type, d, CAST(COUNT(*) AS BIGINT) FROM deg GROUP BY node_type, d"
            ).fetchall()
            degrees = np.unique(np.asarray([h[1] for h in hist], dtype=np.int64))
            # d_target from the one numpy implementation (never DuckDB's own pow; see pruning.py).
            con.register(
                "d_targets",
                pa.table(
                    {
                        "d": pa.array(degrees, pa.int64()),
                        "d_target": pa.array(d_target(degrees, params), pa.int64()),
                    }
                ),
            )
            con.execute("""
                CREATE TEMP TABLE node_target AS
                SELECT deg.node_type, deg.node_id, deg.d, t.d_target
                FROM deg JOIN d_targets AS t ON deg.d = t.d
            """)
            stages = sampling_key_sql("duckdb", params.seed, "src_type", "src_id", "dst_type", "dst_id")
            ctes, prev = [], "big"
            for i, (col, expr) in enumerate(stages):
                ctes.append(f"key{i} AS (SELECT *, {expr} AS {col} FROM {prev})")
                prev = f"key{i}"
            key_col = stages[-1][0]
            query = f"""
                WITH ent AS (
                    SELECT {_EDGE_COLS} FROM und
                    UNION ALL
                    SELECT dst_type, dst_id, src_type, src_id, edge_type, weight FROM und
                ),
                j AS (
                    SELECT ent.*, n.d, n.d_target
                    FROM ent JOIN node_target AS n ON ent.src_type = n.node_type AND ent.src_id = n.node_id
                ),
                big AS (SELECT * FROM j WHERE d > d_target),
                {", ".join(ctes)}
                SELECT {_EDGE_COLS} FROM j WHERE d <= d_target
                UNION ALL
                SELECT {_EDGE_COLS} FROM {prev}
                QUALIFY row_number() OVER (
                    PARTITION BY src_type, src_id ORDER BY {key_col}, dst_type, dst_id) <= d_target
            """
            out = out_dir / "part-0.parquet"
            con.execute(f"COPY (SELECT {_EDGE_SELECT} FROM ({query})) TO {_lit(str(out))} (FORMAT parquet)")

            nodes_before, nodes_after = nodes_before_after(hist, params)
            con.execute(f"CREATE VIEW pruned AS SELECT * FROM read_parquet({_lit(str(out))})")
            edges_after, checks = summarize_edge_types(_edge_summary(con, "pruned"), undirected=False)
            stats = prune_stats(len(dirs), table1(nodes_before, edges_before), table1(nodes_after, edges_after), checks)
            return {**stats, "held_out_edges": held_out_edges}
        finally:
            con.close()


def _drop_held_out_users(con, holdout: Holdout | None) -> int:
    """Replace view ``ev`` by its events of users that are not held out; returns how many were dropped."""
    if holdout is None:
        return 0
    stages, flag = holdout.user_sql_stages("duckdb", "_user_type", "user_id")
    flagged = "SELECT *, 'user' AS _user_type FROM ev"
    for col, expr in stages:
        flagged = f"SELECT *, {expr} AS {col} FROM ({flagged})"
    con.execute(f"CREATE TEMP TABLE ev_flagged AS {flagged}")
    dropped = int(con.execute(f"SELECT COUNT(*) FROM ev_flagged WHERE coalesce({flag}, false)").fetchone()[0])
    cols = ", ".join(EVENT_COLUMNS)
    con.execute(f"CREATE OR REPLACE VIEW ev AS SELECT {cols} FROM ev_flagged WHERE NOT coalesce({flag}, false)")
    return dropped


def _drop_held_out(con, holdout: Holdout | None) -> int:
    """Remove the evaluation pairs from the window graph (graph_engine.holdout); returns how many."""
    if holdout is None:
        return 0
    stages, flag = holdout.sql_stages("duckdb")
    flagged = "SELECT * FROM und"
    for col, expr in stages:
        flagged = f"SELECT *, {expr} AS {col} FROM ({flagged})"
    con.execute(f"CREATE TEMP TABLE und_flagged AS {flagged}")
    held = int(con.execute(f"SELECT COUNT(*) FROM und_flagged WHERE {flag}").fetchone()[0])
    con.execute("DROP TABLE und")
    con.execute(f"CREATE TEMP TABLE und AS SELECT {_EDGE_COLS} FROM und_flagged WHERE NOT {flag}")
    con.execute("DROP TABLE und_flagged")
    return held


def _undirected_table1(con, view: str) -> dict[str, Any]:
    nodes = {
        t: (n, entries)
        for t, n, entries in con.execute(f"""
            SELECT t, COUNT(DISTINCT i), COUNT(*) FROM (
                SELECT src_type AS t, src_id AS i FROM {view} UNION ALL SELECT dst_type, dst_id FROM {view})
            GROUP BY t
        """).fetchall()
    }
    edges, checks = summarize_edge_types(_edge_summary(con, view), undirected=True)
    return {"table1": table1(nodes, edges), "checks": checks}


def _edge_summary(con, view: str) -> list[tuple]:
    """(edge_type, rows, sum weight, self loops, bad weights) per edge type: see summarize_edge_types."""
    return con.execute(f"""
        SELECT edge_type, COUNT(*), CAST(SUM(weight) AS DOUBLE),
               COUNT(*) FILTER (WHERE src_type = dst_type AND src_id = dst_id),
               COUNT(*) FILTER (WHERE weight IS NULL OR isnan(weight) OR weight <= 0)
        FROM {view} GROUP BY edge_type
    """).fetchall()
