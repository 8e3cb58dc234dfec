"""The MLflow model registry for OmniSage models: registered versions, aliases ``champion`` / ``challenger``.

Plain MLflow (no Dagster): the training asset registers and promotes, the inference asset loads the
champion, a notebook can do either.

- A version's ``source`` is the MLflow model the training run logged (``models:/<model_id>``, a LoggedModel
  whose ``source_run_id`` is the run: ``ml.mlflow_model``), so the registry never copies weights and a version
  always points back at its run. Such a version also loads with ``mlflow.pyfunc.load_model``.
- Versions registered before the MLflow model format point at a bare model directory logged as run
  artifacts (``runs/<run>/artifacts/model``: no ``MLmodel`` file, so not loadable by ``mlflow.pyfunc``).
  This loader reads both: it is the way to load such old versions.
- Promotion uses registered-model **aliases** (``champion``, ``challenger``), not the deprecated stages:
  an alias names exactly one version and moving it is one atomic registry update.
- Loading downloads the version's artifacts into a temporary directory and reads the model directory with
  ``ml.model_io.load_model_dir`` (safetensors + JSON: nothing is unpickled).
"""

from __future__ import annotations

import json
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

    def register(
        self,
        run_id: str,
        model_dir_artifact_path: str,
        tags: dict[str, str] | None = None,
        model_id: str | None = None,
    ) -> str:
        """Register the model run ``run_id`` logged as ``model_dir_artifact_path``; -> version. The source is
        the LoggedModel ``model_id`` (default: the run's LoggedModel of that name), else, for a run without
        one (older releases), the model directory among the run's artifacts."""
        self.ensure_registered_model()
        model_id = model_id or self.logged_model_id(run_id, model_dir_artifact_path)
        source = f"models:/{model_id}" if model_id else self.artifact_uri(run_id, model_dir_artifact_path)
        mv = self.client.create_model_version(
            self.model_name,
            source=source,
            run_id=run_id,
            tags={k: str(v) for k, v in (tags or {}).items()},
            model_id=model_id,
        )
        if model_id:
            self._link_logged_model(model_id, str(mv.version))
        return str(mv.version)

    def logged_model_id(self, run_id: str, name: str) -> str | None:
        """The id of the LoggedModel named ``name`` that run ``run_id`` logged (the newest), or None."""
        outputs = self.client.get_run(run_id).outputs
        for output in sorted(getattr(outputs, "model_outputs", None) or [], key=lambda o: -o.step):
            if self.client.get_logged_model(output.model_id).name == name:
                return output.model_id
        return None

    def _link_logged_model(self, model_id: str, version: str) -> None:
        # what mlflow.register_model records: the LoggedModel page lists its registered versions
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        existing = self.client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
        linked = (json.loads(existing) if existing else []) + [{"name": self.model_name, "version": version}]
        self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})

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

    def load_version(self, version: str, map_location="cpu", dst_dir: str | Path | None = None) -> LoadedModel:
        """Download version ``version`` (into ``dst_dir`` or a temporary directory that is removed after
        loading: the weights are in memory by then) and load its model directory, whether the version is an
        MLflow model (``MLmodel`` + ``data/model``) or a bare model directory of an older release."""
        mv = self.model_version(version)
        uri = self.client.get_model_version_download_uri(self.model_name, str(mv.version))
        if dst_dir is not None:
            loaded = self._download_and_load(uri, dst_dir, map_location)
        else:
            with tempfile.TemporaryDirectory(prefix="omnisage-model-") as tmp:
                loaded = self._download_and_load(uri, tmp, map_location)
        loaded.version = str(mv.version)
        loaded.run_id = mv.run_id
        return loaded

    def _download_and_load(self, artifact_uri: str, dst: str | Path, map_location) -> LoadedModel:
        import mlflow

        from ml.mlflow_model import pyfunc_data_dir

        local = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=self.tracking_uri
        )
        return load_model_dir(pyfunc_data_dir(local) or local, map_location=map_location)

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
            raise ChampionMissingError(f"no model version holds alias '{CHAMPION}': materialize omnisage_model first")
        return self.load_version(version, map_location=map_location)
