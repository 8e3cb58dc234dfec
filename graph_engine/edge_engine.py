"""The one interface the graph assets use for edge extraction and pruning (paper 4.1, appendix A.1).

Two engines implement it with the same semantics (README, "Data contract", "Edges"): Spark
(``graph_engine.spark_engine``, the default, runs on a cluster) and DuckDB (``graph_engine.duckdb_engine``,
embedded, one machine). The assets only call :func:`get_engine` and the two methods of :class:`EdgeEngine`;
for the same input and seed both engines write the same rows. The interface and the helpers both engines
share live in ``graph_engine.edge_engine_base``, which the engines import (never this module).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from graph_engine.edge_engine_base import EdgeEngine, EdgeInputError, parquet_files, table1
from graph_engine.pruning import EDGE_COLUMNS, EDGE_TYPES, PruningParams

ENGINE_NAMES = ("spark", "duckdb")


def get_engine(
    name: str, spark_session_factory: Callable[[], Any] | None = None, scratch_dir: Path | None = None
) -> EdgeEngine:
    """The engine named by ``OMNISAGE_ENGINE``. Spark is started (via the factory) only when first used."""
    if name == "duckdb":
        from graph_engine.duckdb_engine import DuckDBEdgeEngine

        return DuckDBEdgeEngine(scratch_dir=scratch_dir)
    if name == "spark":
        if spark_session_factory is None:
            raise ValueError("the spark engine needs a spark_session_factory")
        from graph_engine.spark_engine import SparkEdgeEngine

        return SparkEdgeEngine(spark_session_factory)
    raise ValueError(f"unknown edge engine {name!r}: expected one of {', '.join(ENGINE_NAMES)}")


__all__ = [
    "EDGE_COLUMNS",
    "EDGE_TYPES",
    "EdgeEngine",
    "EdgeInputError",
    "PruningParams",
    "get_engine",
    "parquet_files",
    "table1",
]
