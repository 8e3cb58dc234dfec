"""The registry's champion as the embedding and evaluation services use it: its stored layout, token width
and version, and a BatchBuilder over one day's graph and features that fits it. Dagster-free."""

from __future__ import annotations

import json
from pathlib import Path

from graph_engine.batch import NeighborhoodLayout, parse_blocks
from graph_engine.batch_builder import BatchBuilder
from graph_engine.feature_table import open_features
from graph_engine.featurizer import DEFAULT_MAX_TOKENS
from graph_engine.neighbor_sampler import NeighborhoodCache, NeighborSampler, layout_from_json
from graph_engine.snapshot import GraphSnapshot
from ml.layout import NEIGHBORHOODS_DIR


def load_champion(tracking_uri: str, model_name: str = "omnisage"):
    """The registry's champion (ml.registry.ModelRegistry.load_champion), whether it was registered as an
    MLflow model (``ml.mlflow_model``) or, by an older release, as a bare model directory (no ``MLmodel``: not
    loadable by ``mlflow.pyfunc``). Without one, ml.registry raises ChampionMissingError, whose message says to
    materialize ``omnisage_model`` first; it propagates as is."""
    from ml.registry import ModelRegistry

    return ModelRegistry(tracking_uri, model_name=model_name).load_champion()


def _extra(loaded) -> dict:
    """The champion's stored configuration (whatever the registry calls it), as one dict."""
    out: dict = {}
    for name in ("config", "extra"):
        value = getattr(loaded, name, None)
        if isinstance(value, dict):
            out.update(value)
    return out


def champion_layout(loaded, fallback: NeighborhoodLayout) -> NeighborhoodLayout:
    """The neighbourhood layout the champion was trained with (its block embeddings depend on it)."""
    value = getattr(loaded, "layout", None) or _extra(loaded).get("layout")
    if value is None:
        return fallback
    if isinstance(value, NeighborhoodLayout):
        return value
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, dict) and "blocks" in value:
        value = value["blocks"]
    if value and isinstance(value[0], str):
        return parse_blocks(list(value))
    return layout_from_json(list(value))


def champion_max_tokens(loaded) -> int:
    value = getattr(loaded, "max_tokens", None) or _extra(loaded).get("max_tokens")
    return int(value) if value else DEFAULT_MAX_TOKENS


def champion_version(loaded) -> str:
    return str(loaded.version)


def champion_training_partition(loaded) -> str | None:
    value = getattr(loaded, "training_partition", None) or _extra(loaded).get("training_partition")
    return str(value) if value else None


def champion_builder(loaded, graph_dir: Path, features_dir: Path, log=None) -> BatchBuilder:
    """A BatchBuilder over one day's graph snapshot and feature store with the neighbourhood layout and token
    width ``loaded`` was trained with (embeddings, the recall report). Checks the image width."""
    log = log or (lambda msg: None)
    model = loaded.model
    snapshot = GraphSnapshot.open(graph_dir)
    cache = NeighborhoodCache.open(graph_dir / NEIGHBORHOODS_DIR, snapshot)
    layout = champion_layout(loaded, cache.layout)
    if layout == cache.layout:
        neighborhoods = cache
    else:
        # The champion was trained with another layout: sample this day's neighbourhoods on the fly with the
        # champion's layout and the cache's random-walk settings (slower, but the model sees what it expects).
        log(f"champion layout {layout} differs from the cached {cache.layout}: sampling on the fly")
        neighborhoods = NeighborSampler(snapshot, layout, restart_prob=cache.restart_prob, budget=cache.budget)
    # in memory when the day's decoded features fit the default budget (graph_engine.feature_table)
    featurizer = open_features(features_dir, max_tokens=champion_max_tokens(loaded), snapshot=snapshot)
    model_image_dim = int(getattr(getattr(model, "config", None), "image_dim", 0) or 0)
    if model_image_dim and model_image_dim != featurizer.image_dim:
        raise ValueError(
            f"model version {champion_version(loaded)} expects image vectors of length {model_image_dim}, but "
            f"the feature store {features_dir} holds field 'image_embedding' of length {featurizer.image_dim}"
        )
    return BatchBuilder(snapshot, neighborhoods, featurizer, layout)
