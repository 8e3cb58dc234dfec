"""Spark implementation of the edge engine (OMNISAGE_ENGINE=spark, the default; runs on a cluster).

Same semantics as ``graph_engine.duckdb_engine`` (rules in ``graph_engine.pruning``). Everything is
DataFrame aggregations and window functions: a node's adjacency list is only ever ranked inside a window
partition on an executor, never collected. The driver only collects small things: the degree histogram
(distinct degrees per node type), per-edge-type counts and check counts.

Spark 4 runs with ANSI mode: the sampling key is built so no product exceeds 2**62, and every column is
cast explicitly. Inputs are read with an explicit schema (no inference, no schema merging); since Spark
would read a column missing from a file as nulls, files are checked for their columns first.

For a cluster: every path reaches Spark as an absolute ``file://`` URI (a scheme-less path would resolve
against the cluster's default filesystem, e.g. HDFS, not the shared POSIX storage of the contract), and
Spark's output committer writes the part files straight into the caller's staging directory (no
driver-side listing or renaming). Inputs may be given as paths or ``file://`` URIs. The number of shuffle
partitions of each job is the engine's ``shuffle_partitions``, else the session's launch configuration of
``spark.sql.shuffle.partitions``, else derived from the input rows (``shuffle_partitions_for``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from graph_engine.edge_engine_base import (
    EDGE_ARROW_TYPES,
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


#: Rows per shuffle partition when the partition count is derived from the input (~100-200 MB of edge rows
#: in Spark's memory); adaptive execution coalesces partitions that turn out smaller.
ROWS_PER_SHUFFLE_PARTITION = 2_000_000
_FILE_SCHEME = "file://"


def local_path(path: Path | str) -> Path:
    """The POSIX path of a path or ``file://`` URI (the driver reads Parquet footers through it)."""
    text = str(path)
    if text.startswith(_FILE_SCHEME):
        return Path(text[len(_FILE_SCHEME) :])
    if "://" in text:
        raise ValueError(f"{text}: only local paths and file:// URIs are supported (shared POSIX storage)")
    return Path(text)


def spark_uri(path: Path | str) -> str:
    """Absolute ``file://`` URI of a local path, unescaped: Hadoop's Path takes the characters literally
    (``Path.as_uri`` would write ``dt=D`` as ``dt%3DD``)."""
    return _FILE_SCHEME + os.path.abspath(local_path(path))


def read_parquet(spark, uris: Sequence[str], schema):
    return spark.read.schema(schema).parquet(*uris)


def write_parquet(df, uri: str) -> None:
    """Spark's committer writes ``part-*.parquet`` straight into ``uri``, an existing, empty staging
    directory (mode append: nothing in it is deleted); no ``_SUCCESS`` marker. An empty DataFrame still
    gets one typed part file (Spark writes the schema when there are no rows)."""
    df.write.mode("append").option("mapreduce.fileoutputcommitter.marksuccessfuljobs", "false").parquet(uri)


def shuffle_partitions_for(rows: int, parallelism: int, rows_per_partition: int = ROWS_PER_SHUFFLE_PARTITION) -> int:
    """Shuffle partitions for ``rows`` input rows: enough that one holds about ``rows_per_partition`` rows,
    and at least one per core (``parallelism``) so every executor core has work."""
    if rows_per_partition < 1:
        raise ValueError(f"rows_per_partition={rows_per_partition} must be >= 1")
    return max(1, int(parallelism), math.ceil(max(0, rows) / rows_per_partition))


class SparkEdgeEngine:
    name = "spark"

    def __init__(
        self,
        spark_session_factory: Callable[[], Any],
        partitions: int | None = None,
        shuffle_partitions: int | None = None,
        rows_per_shuffle_partition: int = ROWS_PER_SHUFFLE_PARTITION,
    ):
        """``partitions``: hash-partition the adjacency entries by node into this many partitions before
        ranking (default: the shuffle partitions). ``shuffle_partitions``: spark.sql.shuffle.partitions of
        every job (default: the session's launch setting, else ``shuffle_partitions_for`` the input rows
        with ``rows_per_shuffle_partition``). The output does not depend on either."""
        if shuffle_partitions is not None and shuffle_partitions < 1:
            raise ValueError(f"shuffle_partitions={shuffle_partitions} must be >= 1")
        self._factory = spark_session_factory
        self._session = None
        self.partitions = partitions
        self.shuffle_partitions = shuffle_partitions
        self.rows_per_shuffle_partition = rows_per_shuffle_partition

    @contextmanager
    def _shuffle(self, input_rows: int) -> Iterator[int]:
        """Set spark.sql.shuffle.partitions for one job (restored afterwards: the session may be shared)."""
        conf = self.spark.conf
        configured = self.spark.sparkContext.getConf().get("spark.sql.shuffle.partitions", None)
        n = self.shuffle_partitions or (int(configured) if configured else None)
        if n is None:
            n = shuffle_partitions_for(
                input_rows, self.spark.sparkContext.defaultParallelism, self.rows_per_shuffle_partition
            )
        before = conf.get("spark.sql.shuffle.partitions")
        conf.set("spark.sql.shuffle.partitions", str(n))
        try:
            yield n
        finally:
            conf.set("spark.sql.shuffle.partitions", before)

    @property
    def spark(self):
        if self._session is None:
            self._session = self._factory()
        return self._session

    def _read_edges(self, files: Sequence[Path]):
        schema = edge_schema()
        if not files:
            return self.spark.createDataFrame([], schema)
        return _cast_edges(read_parquet(self.spark, [spark_uri(f) for f in files], schema))

    def _read_written(self, out_uri: str):
        """The engine's own output, listed by Spark (part files only; hidden .crc files are skipped)."""
        return _cast_edges(read_parquet(self.spark, [out_uri], edge_schema()))

    # ------------------------------------------------------------------------------- daily edges

    def extract_daily_edges(
        self, events_dir: Path | None, out_dir: Path, held_out_users: Holdout | None = None
    ) -> dict[str, Any]:
        files = parquet_files(None if events_dir is None else local_path(events_dir))
        n_events = require_parquet_columns(files, EVENT_COLUMNS)
        with self._shuffle(n_events):
            return self._extract(files, n_events, spark_uri(out_dir), held_out_users)

    def _extract(self, files: list[Path], n_events: int, out_uri: str, held_out_users: Holdout | None):
        from pyspark.sql import functions as F

        schema = event_schema()
        if files:
            ev = read_parquet(self.spark, [spark_uri(f) for f in files], schema)
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
            .select(
                F.lit("pin").alias("src_type"),
                "src_id",
                F.lit("board").alias("dst_type"),
                "dst_id",
                F.lit("pin_board").alias("edge_type"),
                "weight",
            )
        )
        q, p = F.col("query_pin_id"), F.col("pin_id")
        pin_pin = (
            ev.where(
                (F.col("surface") == "related_pins")
                & F.col("action").isin("save", "click")
                & q.isNotNull()
                & p.isNotNull()
                & (q != p)
            )
            .groupBy(F.least(q, p).alias("src_id"), F.greatest(q, p).alias("dst_id"))
            .agg(F.count(one).cast("double").alias("weight"))
            .select(
                F.lit("pin").alias("src_type"),
                "src_id",
                F.lit("pin").alias("dst_type"),
                "dst_id",
                F.lit("pin_pin").alias("edge_type"),
                "weight",
            )
        )
        write_parquet(_cast_edges(pin_board.unionByName(pin_pin)), out_uri)
        written = self._read_written(out_uri)
        return {"events": int(n_events), "held_out_user_events": int(dropped), **_undirected_table1(written)}

    # ---------------------------------------------------------------------------------- pruning

    def prune_window(
        self,
        daily_edge_dirs: Sequence[Path],
        out_dir: Path,
        params: PruningParams,
        holdout: Holdout | None = None,
    ) -> dict[str, Any]:
        dirs = [local_path(d) for d in daily_edge_dirs]
        files = [f for d in dirs for f in parquet_files(d)]
        rows = require_parquet_columns(files, EDGE_COLUMNS)
        with self._shuffle(2 * rows):  # each undirected edge is an entry in both endpoints' lists
            return self._prune(dirs, files, spark_uri(out_dir), params, holdout)

    def _prune(
        self,
        dirs: list[Path],
        files: list[Path],
        out_uri: str,
        params: PruningParams,
        holdout: Holdout | None,
    ) -> dict[str, Any]:
        from pyspark import StorageLevel
        from pyspark.sql import Window
        from pyspark.sql import functions as F

        raw = self._read_edges(files)

        # Window sum per undirected edge; same-type pairs re-canonicalised (src_id < dst_id).
        swap = (F.col("src_type") == F.col("dst_type")) & (F.col("src_id") > F.col("dst_id"))
        und = (
            raw.select(
                "src_type",
                F.when(swap, F.col("dst_id")).otherwise(F.col("src_id")).alias("src_id"),
                "dst_type",
                F.when(swap, F.col("src_id")).otherwise(F.col("dst_id")).alias("dst_id"),
                "edge_type",
                "weight",
            )
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
                [
                    tuple(r)
                    for r in und.groupBy("edge_type", "src_type", "dst_type")
                    .agg(F.count(F.lit(1)), F.sum("weight"), _count_where(null_row))
                    .collect()
                ],
                dirs,
            )
            # Degree histogram: small (distinct degrees per node type), the only per-node figure the
            # driver sees.
            endpoints = und.select(F.col("src_type").alias("node_type"), F.col("src_id").alias("node_id")).unionByName(
                und.select(F.col("dst_type").alias("node_type"), F.col("dst_id").alias("node_id"))
            )
            hist = [
                (r[0], int(r[1]), int(r[2]))
                for r in endpoints.groupBy("node_type", "node_id")
                .agg(F.count(F.lit(1)).alias("d"))
                .groupBy("node_type", "d")
                .agg(F.count(F.lit(1)))
                .collect()
            ]
            nodes_before, nodes_after = nodes_before_after(hist, params)
            degrees = sorted({h[1] for h in hist})
            # d_target from the one numpy implementation (never the JVM's pow; see pruning.py).
            targets = d_target(degrees, params).tolist() if degrees else []
            from pyspark.sql import types as T

            dt_schema = T.StructType(
                [T.StructField("_d", T.LongType(), False), T.StructField("_d_target", T.LongType(), False)]
            )
            dt_df = self.spark.createDataFrame(list(zip(degrees, targets)), dt_schema)

            # Each undirected edge is one entry in each endpoint's adjacency list.
            ent = und.select(*EDGE_COLUMNS).unionByName(
                und.select(
                    F.col("dst_type").alias("src_type"),
                    F.col("dst_id").alias("src_id"),
                    F.col("src_type").alias("dst_type"),
                    F.col("src_id").alias("dst_id"),
                    "edge_type",
                    "weight",
                )
            )
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
                F.count(F.lit(1)).over(w.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)).alias("_d"),
            )
            kept = ranked.join(F.broadcast(dt_df), on="_d").where(F.col("_rn") <= F.col("_d_target"))
            write_parquet(_cast_edges(kept), out_uri)
        finally:
            und.unpersist()
            if flagged is not None:
                flagged.unpersist()

        written = self._read_written(out_uri)
        edges_after, checks = summarize_edge_types(_edge_summary(written), undirected=False)
        stats = prune_stats(len(dirs), table1(nodes_before, edges_before), table1(nodes_after, edges_after), checks)
        return {**stats, "held_out_edges": held_out_edges}


def _undirected_table1(df) -> dict[str, Any]:
    from pyspark.sql import functions as F

    endpoints = df.select(F.col("src_type").alias("t"), F.col("src_id").alias("i")).unionByName(
        df.select(F.col("dst_type").alias("t"), F.col("dst_id").alias("i"))
    )
    nodes = {
        r[0]: (int(r[1]), int(r[2]))
        for r in endpoints.groupBy("t").agg(F.countDistinct("i"), F.count(F.lit(1))).collect()
    }
    edges, checks = summarize_edge_types(_edge_summary(df), undirected=True)
    return {"table1": table1(nodes, edges), "checks": checks}


def _count_where(cond):
    from pyspark.sql import functions as F

    return F.sum(F.when(cond, F.lit(1)).otherwise(F.lit(0))).cast("bigint")


def _edge_summary(df) -> list[tuple]:
    """(edge_type, rows, sum weight, self loops, bad weights) per edge type: see summarize_edge_types."""
    from pyspark.sql import functions as F

    w = F.col("weight")
    return [
        tuple(r)
        for r in df.groupBy("edge_type")
        .agg(
            F.count(F.lit(1)),
            F.sum(w),
            _count_where((F.col("src_type") == F.col("dst_type")) & (F.col("src_id") == F.col("dst_id"))),
            _count_where(w.isNull() | F.isnan(w) | (w <= 0)),
        )
        .collect()
    ]
