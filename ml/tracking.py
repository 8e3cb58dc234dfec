"""MLflow tracking for the training library (Dagster-free): a sqlite store shared by processes, with its
schema created once under a file lock, and experiments whose artifacts live under OMNISAGE_HOME.

``omnisage_pipeline.resources.MlflowResource`` (the Dagster resource) hands an ``MlflowTarget`` to
``ml.training_run``; the CLI builds the same target from the settings.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


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


@dataclass(frozen=True)
class MlflowTarget:
    """Where a training run logs and registers: tracking (and registry) URI, the artifact root under which
    each experiment gets its folder, the experiment and the registered model's name."""

    tracking_uri: str
    artifact_root: str
    experiment_name: str = "omnisage"
    registered_model_name: str = "omnisage"

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
