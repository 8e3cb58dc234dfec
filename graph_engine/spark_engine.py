"""Spark implementation of the edge engine (OMNISAGE_ENGINE=spark, the default; runs on a cluster).

Same semantics as ``graph_engine.duckdb_engine`` (rules in ``graph_engine.pruning``). Everything is
DataFrame aggregations and window functions: a node's adjacency list is only ever ranked inside a window
partition on an executor, never collected. The driver only collects small things: the degree histogram
(distinct degrees per node type), per-edge-type counts and check counts.

Spark 4 runs with ANSI mode: the sampling key is built so no product exceeds 2**62, and every column is
cast explicitly. Inputs are read with an explicit schema (no inference, no schema merging); since Spark
would read a column missing from a file as nulls, files are checked for their columns first.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from graph_engine.edge_engine import (
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
from graph_engine.pruning import EDGE_COLUMNS, PruningParams, d_target, sampling_key_sql


def _types():
    from pyspark.sql import types as T

    return {"string": T.StringType(), "int64": T.LongType(), "float64": T.DoubleType()}


def edge_schema():
    from pyspark.sql import types as T

    from graph_engine.edge_engine import EDGE_ARROW_TYPES

    ty = _types()
    return T.StructType([T.StructField(c, ty[t], True) for c, t in EDGE_ARROW_TYPES.items()])


def event_schema():
    from pyspark.sql import types as T

    ty = _types()
    return T.StructType([T.StructField(c, ty[t], True) for c, t in EVENT_COLUMNS.items()])


def _cast_edges(df):
    from pyspark.sql import functions as F

    return df.select(
        F.col("src_type").cast("string").alias("src_type"),
        F.col("src_id").cast("bigint").alias("src_id"),
        F.col("dst_type").cast("string").alias("dst_type"),
        F.col("dst_id").cast("bigint").alias("dst_id"),
        F.col("edge_type").cast("string").alias("edge_type"),
        F.col("weight").cast("double").alias("weight"),
    )


def write_parquet_flat(df, out_dir: Path, schema) -> None:
    """Write ``df`` as ``out_dir/part-*.parquet``.

    Spark writes into a fresh sub-folder (it wants a path that does not exist), then the part files are
    moved up and the folder (with _SUCCESS and .crc files) removed; on a cluster ``out_dir`` is on the
    shared POSIX storage, so the driver sees the executors' files. An empty DataFrame still gets one
    typed file (via pyarrow) so every partition has a schema.
    """
    out_dir = Path(out_dir)
    tmp = out_dir / f"_spark-{uuid.uuid4().hex[:8]}"
    df.write.mode("errorifexists").parquet(str(tmp))
    for part in sorted(tmp.glob("*.parquet")):
        part.rename(out_dir / part.name)
    shutil.rmtree(tmp)
    if not any(out_dir.glob("*.parquet")):
        _write_empty(out_dir / "part-00000-empty.parquet", schema)


def _write_empty(path: Path, schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from graph_engine.edge_engine import EDGE_ARROW_TYPES

    arrow = pa.schema([(f.name, pa.type_for_alias(EDGE_ARROW_TYPES[f.name])) for f in schema.fields])
    pq.write_table(arrow.empty_table(), path)


class SparkEdgeEngine:
    name = "spark"

    def __init__(self, spark_session_factory: Callable[[], Any], partitions: int | None = None):
        """``partitions``: hash-partition the adjacency entries by node into this many partitions before
        ranking (default: spark.sql.shuffle.partitions). The kept set does not depend on it."""
        self._factory = spark_session_factory
        self._session = None
        self.partitions = partitions

    @property
    def spark(self):
        if self._session is None:
            self._session = self._factory()
        return self._session

    def _read_edges(self, files: Sequence[Path]):
        schema = edge_schema()
        if not files:
            return self.spark.createDataFrame([], schema)
        return _cast_edges(self.spark.read.schema(schema).parquet(*[str(f) for f in files]))

    # ------------------------------------------------------------------------------- daily edges

    def extract_daily_edges(self, events_dir: Path | None, out_dir: Path,
                            held_out_users: Holdout | None = None) -> dict[str, Any]:
        from pyspark.sql import functions as F

        files = parquet_files(events_dir)
        n_events = require_parquet_columns(files, EVENT_COLUMNS)
        schema = event_schema()
        if files:
            ev = self.spark.read.schema(schema).parquet(*[str(f) for f in files])
        else:
            ev = self.spark.createDataFrame([], schema)
        dropped = 0
        if held_out_users is not None:
            # Held-out users' engagement never becomes an edge (graph_engine.holdout, user-entity evaluation).
            stages, flag = held_out_users.user_sql_stages("spark", "_user_type", "user_id")
            flagged = ev.withColumn("_user_type", F.lit("user"))
            for col, expr in stages:
                flagged = flagged.withColumn(col, F.expr(expr))
            held = F.coalesce(F.col(flag), F.lit(False))
            dropped = flagged.where(held).count()
            ev = flagged.where(~held).select(*schema.fieldNames())
        one = F.lit(1)
        # Paper 4.1 / contract "Edges": pin_board from every save (src = pin, dst = board); pin_pin from
        # a save or click on related_pins with a known query pin different from the engaged pin,
        # canonical src_id < dst_id so both orientations are one edge.
        pin_board = (
            ev.where((F.col("action") == "save") & F.col("board_id").isNotNull() & F.col("pin_id").isNotNull())
            .groupBy(F.col("pin_id").alias("src_id"), F.col("board_id").alias("dst_id"))
            .agg(F.count(one).cast("double").alias("weight"))
            .select(F.lit("pin").alias("src_type"), "src_id", F.lit("board").alias("dst_type"), "dst_id",
                    F.lit("pin_board").alias("edge_type"), "weight")
        )
        q, p = F.col("query_pin_id"), F.col("pin_id")
        pin_pin = (
            ev.where((F.col("surface") == "related_pins") & F.col("action").isin("save", "click")
                     & q.isNotNull() & p.isNotNull() & (q != p))
            .groupBy(F.least(q, p).alias("src_id"), F.greatest(q, p).alias("dst_id"))
            .agg(F.count(one).cast("double").alias("weight"))
            .select(F.lit("pin").alias("src_type"), "src_id", F.lit("pin").alias("dst_type"), "dst_id",
                    F.lit("pin_pin").alias("edge_type"), "weight")
        )
        edges = _cast_edges(pin_board.unionByName(pin_pin))
        write_parquet_flat(edges, out_dir, edge_schema())
        written = self._read_edges(parquet_files(out_dir))
        return {"events": int(n_events), "held_out_user_events": int(dropped), **_undirected_table1(written)}

    # ---------------------------------------------------------------------------------- pruning

    def prune_window(self, daily_edge_dirs: Sequence[Path], out_dir: Path,
                     params: PruningParams, holdout: Holdout | None = None) -> dict[str, Any]:
        from pyspark import StorageLevel
        from pyspark.sql import Window
        from pyspark.sql import functions as F

        dirs = [Path(d) for d in daily_edge_dirs]
        files = [f for d in dirs for f in parquet_files(d)]
        require_parquet_columns(files, EDGE_COLUMNS)
        raw = self._read_edges(files)

        # Window sum per undirected edge; same-type pairs re-canonicalised (src_id < dst_id).
        swap = (F.col("src_type") == F.col("dst_type")) & (F.col("src_id") > F.col("dst_id"))
        und = (
            raw.select(
                "src_type",
                F.when(swap, F.col("dst_id")).otherwise(F.col("src_id")).alias("src_id"),
                "dst_type",
                F.when(swap, F.col("src_id")).otherwise(F.col("dst_id")).alias("dst_id"),
                "edge_type", "weight")
            .groupBy("src_type", "src_id", "dst_type", "dst_id", "edge_type")
            .agg(F.sum("weight").cast("double").alias("weight"))
        )
        held_out_edges, flagged = 0, None
        if holdout is not None:
            # Evaluation pairs never become graph edges (graph_engine.holdout).
            stages, flag = holdout.sql_stages("spark")
            for col, expr in stages:
                und = und.withColumn(col, F.expr(expr))
            und = und.persist(StorageLevel.MEMORY_AND_DISK)
            held_out_edges = und.filter(F.col(flag)).count()
            flagged = und
            und = und.filter(~F.col(flag)).select(*EDGE_COLUMNS)
        und = und.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            null_row = F.col("src_id").isNull() | F.col("dst_id").isNull() | F.col("weight").isNull()
            edges_before = window_edge_types(
                [tuple(r) for r in und.groupBy("edge_type", "src_type", "dst_type").agg(
                    F.count(F.lit(1)), F.sum("weight"), _count_where(null_row)).collect()], dirs)
            # Degree histogram: small (distinct degrees per node type), the only per-node figure the
            # driver sees.
            endpoints = und.select(F.col("src_type").alias("node_type"), F.col("src_id").alias("node_id")) \
                .unionByName(und.select(F.col("dst_type").alias("node_type"), F.col("dst_id").alias("node_id")))
            hist = [
                (r[0], int(r[1]), int(r[2]))
                for r in endpoints.groupBy("node_type", "node_id").agg(F.count(F.lit(1)).alias("d"))
                .groupBy("node_type", "d").agg(F.count(F.lit(1))).collect()
            ]
            nodes_before, nodes_after = nodes_before_after(hist, params)
            degrees = sorted({h[1] for h in hist})
            # d_target from the one numpy implementation (never the JVM's pow; see pruning.py).
            targets = d_target(degrees, params).tolist() if degrees else []
            from pyspark.sql import types as T

            dt_schema = T.StructType([T.StructField("_d", T.LongType(), False),
                                      T.StructField("_d_target", T.LongType(), False)])
            dt_df = self.spark.createDataFrame(list(zip(degrees, targets)), dt_schema)

            # Each undirected edge is one entry in each endpoint's adjacency list.
            ent = und.select(*EDGE_COLUMNS).unionByName(und.select(
                F.col("dst_type").alias("src_type"), F.col("dst_id").alias("src_id"),
                F.col("src_type").alias("dst_type"), F.col("src_id").alias("dst_id"), "edge_type", "weight"))
            for col, expr in sampling_key_sql("spark", params.seed, "src_type", "src_id", "dst_type", "dst_id"):
                ent = ent.withColumn(col, F.expr(expr))
            key_col = "_k"
            if self.partitions:
                ent = ent.repartition(int(self.partitions), "src_type", "src_id")
            # Algorithm 2 per adjacency list: one window (partitioned by the node, ordered by the key and
            # the tie-break) gives both the degree d and the rank; keep rank <= d_target(d).
            w = Window.partitionBy("src_type", "src_id").orderBy(key_col, "dst_type", "dst_id")
            ranked = ent.select(
                *EDGE_COLUMNS,
                F.row_number().over(w).alias("_rn"),
                F.count(F.lit(1)).over(w.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing))
                .alias("_d"),
            )
            kept = ranked.join(F.broadcast(dt_df), on="_d").where(F.col("_rn") <= F.col("_d_target"))
            write_parquet_flat(_cast_edges(kept), out_dir, edge_schema())
        finally:
            und.unpersist()
            if flagged is not None:
                flagged.unpersist()

        written = self._read_edges(parquet_files(out_dir))
        edges_after, checks = summarize_edge_types(_edge_summary(written), undirected=False)
        stats = prune_stats(len(dirs), table1(nodes_before, edges_before), table1(nodes_after, edges_after),
                            checks)
        return {**stats, "held_out_edges": held_out_edges}


def _undirected_table1(df) -> dict[str, Any]:
    from pyspark.sql import functions as F

    endpoints = df.select(F.col("src_type").alias("t"), F.col("src_id").alias("i")) \
        .unionByName(df.select(F.col("dst_type").alias("t"), F.col("dst_id").alias("i")))
    nodes = {r[0]: (int(r[1]), int(r[2]))
             for r in endpoints.groupBy("t").agg(F.countDistinct("i"), F.count(F.lit(1))).collect()}
    edges, checks = summarize_edge_types(_edge_summary(df), undirected=True)
    return {"table1": table1(nodes, edges), "checks": checks}


def _count_where(cond):
    from pyspark.sql import functions as F

    return F.sum(F.when(cond, F.lit(1)).otherwise(F.lit(0))).cast("bigint")


def _edge_summary(df) -> list[tuple]:
    """(edge_type, rows, sum weight, self loops, bad weights) per edge type: see summarize_edge_types."""
    from pyspark.sql import functions as F

    w = F.col("weight")
    return [tuple(r) for r in df.groupBy("edge_type").agg(
        F.count(F.lit(1)),
        F.sum(w),
        _count_where((F.col("src_type") == F.col("dst_type")) & (F.col("src_id") == F.col("dst_id"))),
        _count_where(w.isNull() | F.isnan(w) | (w <= 0)),
    ).collect()]
