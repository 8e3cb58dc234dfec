"""Dagster resources: storage paths, Spark, MLflow. Values come from the contract's environment variables."""

from __future__ import annotations

from pathlib import Path

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

    @classmethod
    def from_settings(cls, settings: Settings) -> "StorageResource":
        return cls(
            home=str(settings.home),
            data_root=str(settings.data_root),
            data_root_is_default=settings.data_root_is_default,
            engine=settings.engine,
            window_days=settings.window_days,
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


class MlflowResource(dg.ConfigurableResource):
    """A thin wrapper around ``mlflow.MlflowClient`` (not dagster-mlflow's legacy resource).

    Artifacts go under OMNISAGE_HOME: with a sqlite tracking URI MLflow would otherwise write ``./mlruns``
    in the working directory, so every experiment is created with an explicit artifact location.
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

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def experiment_id(self, name: str | None = None) -> str:
        client = self.client()
        name = name or self.experiment_name
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        Path(self.artifact_root).mkdir(parents=True, exist_ok=True)
        return client.create_experiment(name, artifact_location=Path(self.artifact_root, name).as_uri())
