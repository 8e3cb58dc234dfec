"""The MLflow model registry for OmniSage models: registered versions, aliases ``champion`` / ``challenger``.

Plain MLflow (no Dagster): the training asset registers and promotes, the inference asset loads the
champion, a notebook can do either.

- A version's ``source`` is the artifact URI of the model directory (``ml.model_io`` format) logged in the
  training run, so the registry never copies weights and a version always points back at its run.
- Promotion uses registered-model **aliases** (``champion``, ``challenger``), not the deprecated stages:
  an alias names exactly one version and moving it is one atomic registry update.
- Loading downloads the version's artifacts into a temporary directory and reads them with
  ``ml.model_io.load_model_dir`` (safetensors + JSON: nothing is unpickled).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ml.model_io import LoadedModel, load_model_dir

CHAMPION = "champion"
CHALLENGER = "challenger"


class ChampionMissingError(RuntimeError):
    """No model version holds the ``champion`` alias yet."""


def _is_missing(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "") or ""
    return (
        "RESOURCE_DOES_NOT_EXIST" in str(code)
        or "RESOURCE_DOES_NOT_EXIST" in str(exc)
        or "not found" in str(exc).lower()
    )


class ModelRegistry:
    def __init__(self, tracking_uri: str, model_name: str = "omnisage"):
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import mlflow

            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    # ----------------------------------------------------------------------------------------- writing
    def ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException as exc:
            if not _is_missing(exc):
                raise
            try:
                self.client.create_registered_model(
                    self.model_name, description="OmniSage entity/user embedding model (ml.model_io format)"
                )
            except MlflowException as exc2:  # created concurrently by another run: fine
                if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc2, "error_code", "")) + str(exc2):
                    raise

    def artifact_uri(self, run_id: str, artifact_path: str) -> str:
        base = self.client.get_run(run_id).info.artifact_uri.rstrip("/")
        return f"{base}/{artifact_path.strip('/')}"

    def register(self, run_id: str, model_dir_artifact_path: str, tags: dict[str, str] | None = None) -> str:
        """Register the model directory logged at ``model_dir_artifact_path`` of run ``run_id``; -> version."""
        self.ensure_registered_model()
        source = self.artifact_uri(run_id, model_dir_artifact_path)
        mv = self.client.create_model_version(
            self.model_name, source=source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}
        )
        return str(mv.version)

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.model_name, alias, str(version))

    def set_version_tag(self, version: str, key: str, value) -> None:
        self.client.set_model_version_tag(self.model_name, str(version), key, str(value))

    # ----------------------------------------------------------------------------------------- reading
    def version_for_alias(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.model_name, alias)
        except MlflowException as exc:
            if _is_missing(exc):
                return None
            raise
        return str(mv.version)

    def model_version(self, version: str):
        return self.client.get_model_version(self.model_name, str(version))

    def load_version(
        self, version: str, map_location="cpu", dst_dir: str | Path | None = None
    ) -> LoadedModel:
        """Download version ``version``'s model directory (into ``dst_dir`` or a temporary directory that is
        removed after loading: the weights are in memory by then) and load it."""
        import mlflow

        mv = self.model_version(version)
        if dst_dir is not None:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source, dst_path=str(dst_dir), tracking_uri=self.tracking_uri
            )
            loaded = load_model_dir(local, map_location=map_location)
        else:
            with tempfile.TemporaryDirectory(prefix="omnisage-model-") as tmp:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=mv.source, dst_path=tmp, tracking_uri=self.tracking_uri
                )
                loaded = load_model_dir(local, map_location=map_location)
        loaded.version = str(mv.version)
        loaded.run_id = mv.run_id
        return loaded

    def load_run_model(self, run_id: str, artifact_path: str, map_location="cpu") -> LoadedModel | None:
        """A model directory logged as an artifact of run ``run_id`` but not registered (the PinSage-like
        baseline beside each model); None when the run has no such artifact."""
        import mlflow

        listed = self.client.list_artifacts(run_id, artifact_path)
        if not listed:
            return None
        with tempfile.TemporaryDirectory(prefix="omnisage-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=tmp, tracking_uri=self.tracking_uri
            )
            loaded = load_model_dir(local, map_location=map_location)
        loaded.run_id = run_id
        return loaded

    def load_alias(self, alias: str, map_location="cpu") -> LoadedModel | None:
        version = self.version_for_alias(alias)
        return None if version is None else self.load_version(version, map_location=map_location)

    def load_champion(self, map_location="cpu") -> LoadedModel:
        version = self.version_for_alias(CHAMPION)
        if version is None:
            raise ChampionMissingError(
                f"no model version holds alias '{CHAMPION}': materialize omnisage_model first"
            )
        return self.load_version(version, map_location=map_location)
