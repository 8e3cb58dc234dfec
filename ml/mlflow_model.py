"""The registered model as an MLflow model: a ``python_function`` flavor whose loader lives in the installed
package, a signature, pinned pip requirements and a LoggedModel linked to its training run. Dagster-free.

    info = log_pyfunc_model(tracking_uri, run_id, model_dir, step=steps, tags={...})
    ModelRegistry(...).register(run_id, MODEL_ARTIFACT_PATH, tags, model_id=info.model_id)

- Nothing is pickled: the flavor names a loader module (``PYFUNC_LOADER_MODULE``, imported from the installed
  ``omnisage-pipeline`` package at load time) and carries the ``ml.model_io`` directory (``config.json`` +
  ``weights.safetensors``) as its data, under ``data/model`` of the LoggedModel's artifacts.
- Signature: input a DataFrame of ``entity_type`` (string) and ``entity_id`` (long); params ``partition``
  (string, the published day whose graph and features embed the rows); output float32 [n, out_dim].
- The LoggedModel is created from the training run (``source_run_id``, the run's params), and the run's
  metrics at the model's step (the held-out ``eval/*`` and ``gate/*`` figures) are linked to it.
- A version registered before this (no ``MLmodel`` file) is a bare ``ml.model_io`` directory:
  ``ml.registry`` still loads both; only versions logged here load with ``mlflow.pyfunc.load_model``.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path
from typing import Any

#: The module MLflow imports to load the model (``_load_pyfunc(data_path)``): it reads OMNISAGE_HOME's
#: published days at predict time, so it lives with the embedding service, not in ``ml``.
PYFUNC_LOADER_MODULE = "omnisage_pipeline.embedding.pyfunc_model"
#: Where the model directory sits inside an MLflow model (``mlflow.pyfunc`` copies ``data_path`` there).
PYFUNC_DATA_DIR = "data/model"
MLMODEL_FILE = "MLmodel"
#: The distributions loading and predicting import, pinned to the versions that trained the model; the
#: package itself pulls in the rest of its (constraints.txt-pinned) dependencies.
REQUIRED_DISTRIBUTIONS = (
    "omnisage-pipeline",
    "mlflow",
    "torch",
    "safetensors",
    "numpy",
    "pandas",
    "pyarrow",
    "rocksdict",
    "numba",
)


def pip_requirements() -> list[str]:
    """``name==version`` of ``REQUIRED_DISTRIBUTIONS`` as installed here (a local build tag such as torch's
    ``+cpu`` dropped: the same release from any index)."""
    out = []
    for name in REQUIRED_DISTRIBUTIONS:
        version = importlib.metadata.version(name).split("+", 1)[0]
        out.append(f"{name}=={version}")
    return out


def model_signature(out_dim: int):
    """Input (entity_type string, entity_id long), params (partition string), output float32 [n, out_dim]."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("string", "entity_type"), ColSpec("long", "entity_id")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(out_dim)))]),
        params=ParamSchema([ParamSpec("partition", "string", None)]),
    )


def log_pyfunc_model(
    tracking_uri: str,
    run_id: str,
    model_dir: str | Path,
    *,
    name: str,
    step: int,
    tags: dict[str, str] | None = None,
    metadata: dict[str, Any] | None = None,
):
    """Log ``model_dir`` (``ml.model_io`` format) as an MLflow pyfunc model of run ``run_id``; -> ModelInfo
    (``model_id``, ``model_uri``). Metrics the run logged at ``step`` are linked to the LoggedModel."""
    import mlflow
    from mlflow.models import Model

    from ml.model_io import read_model_config

    out_dim = int(read_model_config(model_dir)["model_config"]["out_dim"])
    mlflow.set_tracking_uri(tracking_uri)  # Model.log resolves the store from the global URI
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(run_id)
    # Created here, in the run's experiment: without a fluent active run Model.log would create it in the
    # default experiment (and its artifacts under ./mlruns of the working directory).
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
        params=dict(run.data.params),
    )
    # ``mlflow.pyfunc.log_model`` is Model.log(flavor=mlflow.pyfunc) without a run id: called with one here
    # because the training run is driven through MlflowClient, and making it the fluent active run would
    # end (FINISH) it on exit.
    with warnings.catch_warnings():
        # no input example on purpose: MLflow would validate it by predicting, which reads a published day
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return Model.log(
            None,  # artifact_path: deprecated for ``name``, still positional
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            loader_module=PYFUNC_LOADER_MODULE,
            data_path=str(model_dir),
            signature=model_signature(out_dim),
            pip_requirements=pip_requirements(),
            metadata=metadata,
            step=int(step),
        )


def pyfunc_data_dir(local_model: str | Path) -> Path | None:
    """The ``ml.model_io`` directory inside a downloaded MLflow model (from its ``MLmodel``), or None when
    ``local_model`` is a bare model directory (a version registered before the MLflow model format)."""
    local_model = Path(local_model)
    if not (local_model / MLMODEL_FILE).is_file():
        return None
    from mlflow.models import Model

    flavor = Model.load(str(local_model)).flavors.get("python_function") or {}
    data = flavor.get("data")
    if not data:
        raise ValueError(f"{local_model / MLMODEL_FILE}: the python_function flavor has no field 'data'")
    return local_model / data
