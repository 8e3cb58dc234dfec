"""The MLflow ``python_function`` loader of the registered model (``ml.mlflow_model``). Dagster-free.

    model = mlflow.pyfunc.load_model("models:/omnisage@champion")
    emb = model.predict(pd.DataFrame({"entity_type": ["pin"], "entity_id": [42]}),
                        params={"partition": "2026-01-03"})              # float32 [1, d], unit rows

MLflow imports this module and calls ``_load_pyfunc(data_path)`` with the model directory (``config.json`` +
``weights.safetensors``, read by ``ml.model_io``: nothing is unpickled). ``predict`` embeds each row from the
published graph snapshot and feature store of day ``partition`` under OMNISAGE_HOME (``Settings.from_env``,
read at every call), with the same code as the daily ``entity_embeddings`` (``champion_builder`` +
``ml.inference.embed_entities``), so a row equals that day's published embedding when the same version
embedded it. The day's inputs are held under reader leases for the call (``DayInputs.leased``).

Refused with a ValueError that names them: a missing or malformed ``partition``, an ``entity_type`` other than
``pin`` / ``board``, a null id, and ids that are not entities of the day (neither in its metadata nor in its
graph: ``day_entities``, the set ``entity_embeddings`` publishes). A day that was never published is a
FileNotFoundError naming the dataset.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from graph_engine.batch import NODE_TYPES
from ml.model_io import LoadedModel, load_model_dir
from omnisage_pipeline.embedding.champion import champion_builder
from omnisage_pipeline.embedding.day import DayInputs, day_entities
from omnisage_pipeline.settings import Settings

#: Rows shown in an error about unknown ids.
SHOWN = 10


def _partition(params: dict | None) -> str:
    value = (params or {}).get("partition")
    try:
        ok = isinstance(value, str) and date.fromisoformat(value).isoformat() == value
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"params field 'partition' = {value!r}: expected a published day YYYY-MM-DD, e.g. "
            "predict(df, params={'partition': '2026-01-03'})"
        )
    return value


def _rows(model_input) -> tuple[np.ndarray, np.ndarray]:
    """(entity_type str [n], entity_id int64 [n]) of a DataFrame, checked."""
    missing = [c for c in ("entity_type", "entity_id") if c not in getattr(model_input, "columns", ())]
    if missing:
        raise ValueError(f"model input: columns {missing} required (entity_type string, entity_id long)")
    types, ids = model_input["entity_type"], model_input["entity_id"]
    if types.isna().any() or ids.isna().any():
        raise ValueError(
            f"model input: {int(types.isna().sum())} null entity_type and {int(ids.isna().sum())} null entity_id values"
        )
    if not pd.api.types.is_integer_dtype(ids):
        raise ValueError(f"model input field 'entity_id' is {ids.dtype}, expected integers (long)")
    types = types.astype(str).to_numpy()
    unknown = sorted(set(types) - set(NODE_TYPES))
    if unknown:
        raise ValueError(f"model input field 'entity_type': unknown {unknown}; expected one of {NODE_TYPES}")
    return types, ids.to_numpy().astype(np.int64)


def embed_rows(
    loaded: LoadedModel,
    settings: Settings,
    day: str,
    types: np.ndarray,
    ids: np.ndarray,
    batch_size: int = 512,
) -> np.ndarray:
    """f_t of each (type, id) row from day ``day``'s published inputs -> float32 [n, out_dim], in row order."""
    from ml.inference import embed_entities

    out = np.zeros((len(ids), loaded.model.config.out_dim), dtype=np.float32)
    with DayInputs.leased(settings, day, with_users=False) as inputs:
        builder = champion_builder(loaded, inputs.graph_dir, inputs.features_dir)
        try:
            known = day_entities(inputs.metadata_dir, builder.snapshot)
            unknown = [
                (t, int(i)) for t in NODE_TYPES for i in np.unique(ids[types == t][~np.isin(ids[types == t], known[t])])
            ]
            if unknown:
                shown = f"{unknown[:SHOWN]}{' ...' if len(unknown) > SHOWN else ''}"
                raise ValueError(
                    f"{len(unknown)} (entity_type, entity_id) of the input are not entities of dt={day} "
                    f"(neither in its entity_metadata nor in its graph): {shown}"
                )
            for t in NODE_TYPES:
                rows = np.flatnonzero(types == t)
                if rows.size:
                    out[rows] = embed_entities(loaded.model, builder, t, ids[rows], batch_size=batch_size)
        finally:
            builder.featurizer.close()
    return out


class OmniSageEmbeddings:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(df, params={"partition": day})`` (module docstring)."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    def predict(self, model_input, params: dict | None = None) -> np.ndarray:
        day = _partition(params)
        types, ids = _rows(model_input)
        return embed_rows(self.loaded, Settings.from_env(), day, types, ids)


def _load_pyfunc(data_path: str) -> OmniSageEmbeddings:
    """MLflow's loader hook: the model directory ``data_path`` (``ml.model_io``) on the CPU."""
    loaded = load_model_dir(Path(data_path), map_location="cpu")
    loaded.version = _model_id(Path(data_path)) or "unknown"  # named in errors only
    return OmniSageEmbeddings(loaded)


def _model_id(data_path: Path) -> str | None:
    """The LoggedModel id in the ``MLmodel`` two levels above the data directory (``data/model``)."""
    from mlflow.models import Model

    mlmodel = data_path.parent.parent
    if not (mlmodel / "MLmodel").is_file():
        return None
    return Model.load(str(mlmodel)).model_id
