"""Shared fixtures. One Spark session for the whole suite (a JVM start costs ~15 s here)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as ml/__init__.py, before anything loads torch

import pytest


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    """The suite's only SparkSession: local[2], UI off, UTC, small shuffle."""
    from pyspark.sql import SparkSession

    scratch = tmp_path_factory.mktemp("spark")
    session = (
        SparkSession.builder.master("local[2]")
        .appName("omnisage-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.local.dir", str(scratch / "local"))
        .config("spark.sql.warehouse.dir", str(scratch / "warehouse"))
        .config("spark.driver.extraJavaOptions", f"-Dderby.system.home={scratch / 'derby'}")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module: tiny tensors run faster that way, and on a loaded 2-core box
    intra-op threads spin-wait against each other (a training step was 15x slower; see test_learning)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def omnisage_env(tmp_path: Path, monkeypatch) -> dict[str, str]:
    """A private OMNISAGE_HOME (and MLflow store) for one test; DuckDB engine unless a test says otherwise."""
    home = tmp_path / "home"
    env = {
        "OMNISAGE_HOME": str(home),
        "OMNISAGE_ENGINE": "duckdb",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("OMNISAGE_DATA_ROOT", "OMNISAGE_FAULT_PHASE", "OMNISAGE_FAULT_DATASET"):
        monkeypatch.delenv(key, raising=False)
    return env


def pytest_configure(config):
    # Caches of numba/matplotlib stay out of the user's home during tests too.
    os.environ.setdefault("MPLBACKEND", "Agg")
