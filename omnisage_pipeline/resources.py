"""Dagster resources: storage paths, Spark, MLflow. Values come from the contract's environment variables."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import dagster as dg
from dagster_pyspark import LazyPySparkResource

from omnisage_pipeline.settings import Settings


class StorageResource(dg.ConfigurableResource):
    """Where the pipeline reads input and writes everything (OMNISAGE_HOME / OMNISAGE_DATA_ROOT)."""

    home: str
    data_root: str
    data_root_is_default: bool = False
    engine: str = "spark"
    window_days: int = 30
    retention_days: Optional[int] = None  # None: OMNISAGE_WINDOW_DAYS (Settings)

    @classmethod
    def from_settings(cls, settings: Settings) -> "StorageResource":
        return cls(
            home=str(settings.home),
            data_root=str(settings.data_root),
            data_root_is_default=settings.data_root_is_default,
            engine=settings.engine,
            window_days=settings.window_days,
            retention_days=settings.retention_days,
        )

    @property
    def settings(self) -> Settings:
        base = Settings.from_env()
        return Settings(
            home=Path(self.home),
            data_root=Path(self.data_root),
            data_root_is_default=self.data_root_is_default,
            mlflow_tracking_uri=base.mlflow_tracking_uri,
            engine=self.engine,
            spark_master=base.spark_master,
            start_date=base.start_date,
            window_days=self.window_days,
            retention_days=self.retention_days,
        )


def spark_config(settings: Settings) -> dict[str, str]:
    """Spark settings: master from OMNISAGE_SPARK_MASTER, scratch under OMNISAGE_HOME, UI off, and a
    session time zone of UTC so timestamps mean the same thing on every machine."""
    return {
        "spark.master": settings.spark_master,
        "spark.app.name": "omnisage",
        "spark.ui.enabled": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.local.dir": str(settings.scratch_dir / "spark"),
        "spark.sql.warehouse.dir": str(settings.scratch_dir / "spark-warehouse"),
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={settings.scratch_dir / 'derby'}",
        "spark.sql.shuffle.partitions": "8",
    }


def lazy_pyspark(settings: Settings) -> LazyPySparkResource:
    """Spark starts only when an asset touches ``.spark_session`` (the DuckDB engine never does)."""
    return LazyPySparkResource(spark_config=spark_config(settings))


def sqlite_store_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///...`` tracking URI (None for any other store)."""
    prefix = "sqlite:///"  # SQLAlchemy: sqlite:///relative/path, sqlite:////absolute/path
    if not tracking_uri.startswith(prefix):
        return None
    path = tracking_uri[len(prefix) :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """An exclusive lock, across processes of this host, on a sqlite MLflow store (no-op for other stores).

    The lock file sits next to the database (under OMNISAGE_HOME by default), so every process that writes
    the same store - concurrent Dagster runs, the CLI, a notebook using MlflowResource - serialises on it.
    """
    db = sqlite_store_path(tracking_uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: Tracking URIs whose schema this process has already created or checked.
_READY_STORES: set[str] = set()


def prepare_store(tracking_uri: str) -> None:
    """Create (or migrate) the tracking AND registry tables of a sqlite store once, under ``store_lock``.

    MLflow creates the schema of an empty sqlite database lazily, in the first process that opens it, and
    does so without a lock: two processes opening a fresh store at the same time (two concurrent runs on a
    new OMNISAGE_HOME) both run the alembic migrations and at least one fails ("duplicate column name",
    "UNIQUE constraint failed: alembic_version", "Online migration expected to match one row").
    """
    if tracking_uri in _READY_STORES:
        return
    if sqlite_store_path(tracking_uri) is not None:
        import mlflow

        with store_lock(tracking_uri):
            client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            client.search_experiments(max_results=1)  # the tracking store's tables
            client.search_registered_models(max_results=1)  # the model registry's tables
    _READY_STORES.add(tracking_uri)


class MlflowResource(dg.ConfigurableResource):
    """A thin wrapper around ``mlflow.MlflowClient`` (not dagster-mlflow's legacy resource).

    Artifacts go under OMNISAGE_HOME: with a sqlite tracking URI MLflow would otherwise write ``./mlruns``
    in the working directory, so every experiment is created with an explicit artifact location.
    Concurrent processes (runs of different partitions, two trainings) may share one sqlite store: the
    schema is created once under a file lock (``prepare_store``) and so is a new experiment.
    """

    tracking_uri: str
    artifact_root: str
    experiment_name: str = "omnisage"
    registered_model_name: str = "omnisage"

    @classmethod
    def from_settings(cls, settings: Settings) -> "MlflowResource":
        return cls(
            tracking_uri=settings.mlflow_tracking_uri,
            artifact_root=str(settings.home / "mlflow-artifacts"),
        )

    def client(self):
        import mlflow

        prepare_store(self.tracking_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def experiment_id(self, name: str | None = None) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client()
        name = name or self.experiment_name
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        # Get-or-create is two statements: another process may create the experiment in between.
        with store_lock(self.tracking_uri):
            experiment = client.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            Path(self.artifact_root).mkdir(parents=True, exist_ok=True)
            try:
                return client.create_experiment(name, artifact_location=Path(self.artifact_root, name).as_uri())
            except MlflowException as exc:  # a tracking server (no file lock) and another client won
                if "RESOURCE_ALREADY_EXISTS" not in f"{getattr(exc, 'error_code', '')} {exc}":
                    raise
                return client.get_experiment_by_name(name).experiment_id
