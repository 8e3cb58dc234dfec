"""Dagster resources: storage paths, Spark, MLflow. Values come from the contract's environment variables.

The code location builds them from its one Settings object, except the MLflow tracking URI when it comes from
MLFLOW_TRACKING_URI: a tracking server's address may carry credentials (``https://user:token@host``), so it
is a ``dg.EnvVar`` there (``tracking_uri_field``): Dagster resolves it when a run or a sensor starts, and the
UI, the run config and the code location's snapshot show the variable's name, never its value."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import dagster as dg
from dagster_pyspark import LazyPySparkResource
from pydantic import Field

from ml.tracking import MlflowTarget
from omnisage_pipeline.settings import DEFAULT_WINDOW_DAYS, DEMO_START_DATE, Settings

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def default_tracking_uri(home: Path) -> str:
    """The tracking store when MLFLOW_TRACKING_URI is unset: sqlite under OMNISAGE_HOME (Settings.from_env)."""
    return f"sqlite:///{Path(home) / 'mlflow.db'}"


def tracking_uri_field(settings: Settings, secrets_from_env: bool) -> str:
    """What a resource's tracking URI field holds: ``dg.EnvVar(MLFLOW_TRACKING_URI)`` when
    ``secrets_from_env`` and the URI is not the sqlite default (then it came from that variable: the only
    other source in Settings.from_env), else the URI itself."""
    uri = settings.mlflow_tracking_uri
    if secrets_from_env and uri != default_tracking_uri(settings.home):
        return dg.EnvVar(TRACKING_URI_ENV)
    return uri


class StorageResource(dg.ConfigurableResource):
    """Where the pipeline reads input and writes everything (OMNISAGE_HOME / OMNISAGE_DATA_ROOT), and the
    other contract settings, copied from the code location's one Settings object (``from_settings``);
    ``settings`` rebuilds it from these fields alone, never from the environment."""

    home: str
    data_root: str
    data_root_is_default: bool = False
    engine: Literal["spark", "duckdb"] = "spark"
    window_days: int = Field(default=DEFAULT_WINDOW_DAYS, ge=1)
    retention_days: int | None = None  # None: OMNISAGE_WINDOW_DAYS (Settings)
    mlflow_tracking_uri: str = ""  # "": sqlite under home (Settings.from_env's default)
    spark_master: str = "local[*]"
    start_date: str = DEMO_START_DATE

    @classmethod
    def from_settings(cls, settings: Settings, *, secrets_from_env: bool = False) -> StorageResource:
        """The fields of ``settings``; ``secrets_from_env``: see ``tracking_uri_field``."""
        return cls(
            home=str(settings.home),
            data_root=str(settings.data_root),
            data_root_is_default=settings.data_root_is_default,
            engine=settings.engine,
            window_days=settings.window_days,
            retention_days=settings.retention_days,
            mlflow_tracking_uri=tracking_uri_field(settings, secrets_from_env),
            spark_master=settings.spark_master,
            start_date=settings.start_date,
        )

    @property
    def settings(self) -> Settings:
        home = Path(self.home)
        return Settings(
            home=home,
            data_root=Path(self.data_root),
            data_root_is_default=self.data_root_is_default,
            mlflow_tracking_uri=self.mlflow_tracking_uri or default_tracking_uri(home),
            engine=self.engine,
            spark_master=self.spark_master,
            start_date=self.start_date,
            window_days=self.window_days,
            retention_days=self.retention_days,
        )


def spark_config(settings: Settings) -> dict[str, str]:
    """Spark settings: master from OMNISAGE_SPARK_MASTER, scratch under OMNISAGE_HOME, UI off, and a
    session time zone of UTC so timestamps mean the same thing on every machine.

    No fixed ``spark.sql.shuffle.partitions``: the edge engine sizes each job's shuffle from its input rows
    (``graph_engine.spark_engine.shuffle_partitions_for``) unless a cluster's launch configuration (e.g.
    ``spark-submit --conf``) sets it; adaptive execution coalesces partitions that turn out small."""
    return {
        "spark.master": settings.spark_master,
        "spark.app.name": "omnisage",
        "spark.ui.enabled": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.local.dir": str(settings.scratch_dir / "spark"),
        "spark.sql.warehouse.dir": str(settings.scratch_dir / "spark-warehouse"),
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={settings.scratch_dir / 'derby'}",
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.adaptive.coalescePartitions.enabled": "true",
    }


def lazy_pyspark(settings: Settings) -> LazyPySparkResource:
    """Spark starts only when an asset touches ``.spark_session`` (the DuckDB engine never does)."""
    return LazyPySparkResource(spark_config=spark_config(settings))


class MlflowResource(dg.ConfigurableResource):
    """A thin wrapper around ``mlflow.MlflowClient`` (not dagster-mlflow's legacy resource).

    Artifacts go under OMNISAGE_HOME: with a sqlite tracking URI MLflow would otherwise write ``./mlruns``
    in the working directory, so every experiment is created with an explicit artifact location.
    Concurrent processes (runs of different partitions, two trainings) may share one sqlite store: the
    schema is created once under a file lock (``ml.tracking.prepare_store``) and so is a new experiment.
    """

    tracking_uri: str
    artifact_root: str
    experiment_name: str = "omnisage"
    registered_model_name: str = "omnisage"

    @classmethod
    def from_settings(cls, settings: Settings, *, secrets_from_env: bool = False) -> MlflowResource:
        """The tracking store of ``settings``; ``secrets_from_env``: see ``tracking_uri_field``."""
        return cls(
            tracking_uri=tracking_uri_field(settings, secrets_from_env),
            artifact_root=str(settings.home / "mlflow-artifacts"),
        )

    def target(self) -> MlflowTarget:
        """The Dagster-free handle the training library uses (ml.tracking)."""
        return MlflowTarget(self.tracking_uri, self.artifact_root, self.experiment_name, self.registered_model_name)

    def client(self):
        return self.target().client()

    def experiment_id(self, name: str | None = None) -> str:
        return self.target().experiment_id(name)
