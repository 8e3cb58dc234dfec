"""A pickle-free on-disk model format (the model loads without pickle).

A model directory holds exactly two files:

    config.json           {"format": "omnisage-model", "format_version": 1,
                           "model_config": ModelConfig.to_dict(), "layout": [{subset, node_type, k}, ...],
                           "max_tokens": L, "image_dim": D, "training_partition": "YYYY-MM-DD" | null,
                           "tensors": {name: {"dtype", "shape"}}, "extra": {...}}
    weights.safetensors   the model's state dict (safetensors: a JSON header + raw little-endian buffers)

Why this instead of ``torch.save``: a pickle can execute code when loaded, and a registry is exactly the
place a model is loaded from by processes that did not write it. ``load_model_dir`` reads JSON and
``safetensors.torch.load_file`` only - never ``torch.load`` or ``pickle``.

Everything inference needs to rebuild the input batches travels with the weights: the neighbourhood layout
(the embedder's block/rank columns are tied to it), the token width L (the feature store's records are
truncated to it) and the image dimension D (the image MLP's input width). The count-min sketches of the
logQ correction (eq. 1; training only) travel in the same safetensors file under ``sketch/<loss>/<type>/``
(listed in config.json's ``sketches``): a warm start from a registered model continues their counts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from graph_engine.batch import NeighborBlock, NeighborhoodLayout
from ml.config import ModelConfig
from ml.model import OmniSageModel

MODEL_FORMAT = "omnisage-model"
# 2: g_x of the entity-feature task reads one node's features (eq. 3 per node), sketches per positive type
MODEL_FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
SKETCH_PREFIX = "sketch/"
#: Keys of ``extra`` that are promoted to top-level fields of config.json.
TOP_LEVEL_KEYS = ("layout", "max_tokens", "training_partition")


class ModelFormatError(ValueError):
    """A model directory that is not a complete, consistent omnisage-model directory (names file and field)."""


def layout_to_json(layout: NeighborhoodLayout) -> list[dict[str, Any]]:
    return [{"subset": b.subset, "node_type": b.node_type, "k": int(b.k)} for b in layout.blocks]


def layout_from_json(blocks: list[dict[str, Any]], where: str = "layout") -> NeighborhoodLayout:
    try:
        return NeighborhoodLayout(
            tuple(NeighborBlock(str(b["subset"]), str(b["node_type"]), int(b["k"])) for b in blocks)
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{where}: not a list of {{subset, node_type, k}} blocks: {exc}") from exc


@dataclass
class LoadedModel:
    """A model read back from a model directory (and, through the registry, which version it is)."""

    model: OmniSageModel
    config: ModelConfig
    extra: dict[str, Any]
    layout: NeighborhoodLayout | None
    max_tokens: int | None
    image_dim: int
    training_partition: str | None
    path: Path
    raw_config: dict[str, Any] = field(default_factory=dict)
    version: str | None = None  # registry version (set by ml.registry)
    run_id: str | None = None  # MLflow run that produced it (set by ml.registry)
    sketches: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # "{loss}/{type}" -> state


def _state_dict_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses non-contiguous and shared storages: copy every tensor to its own contiguous buffer.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _sketch_tensors(model: OmniSageModel) -> dict[str, torch.Tensor]:
    out = {}
    for name, state in model.sketch_state_dict().items():
        for key, value in state.items():
            out[f"{SKETCH_PREFIX}{name}/{key}"] = torch.as_tensor(value).detach().to("cpu").contiguous().clone()
    return out


def _split_sketches(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Removes the ``sketch/`` entries from ``state`` (in place) -> {"{loss}/{type}": sketch state}."""
    sketches: dict[str, dict[str, torch.Tensor]] = {}
    for key in [k for k in state if k.startswith(SKETCH_PREFIX)]:
        name, _, field_name = key[len(SKETCH_PREFIX) :].rpartition("/")
        sketches.setdefault(name, {})[field_name] = state.pop(key)
    return sketches


def save_model_dir(
    model: OmniSageModel,
    directory: str | Path,
    extra: dict[str, Any] | None = None,
    *,
    layout: NeighborhoodLayout | None = None,
    max_tokens: int | None = None,
    training_partition: str | None = None,
) -> Path:
    """Write ``config.json`` + ``weights.safetensors`` into ``directory`` (created; must be empty or absent).

    ``layout`` / ``max_tokens`` / ``training_partition`` may also be given as keys of ``extra`` (a
    ``NeighborhoodLayout`` or its JSON form); keyword arguments win. ``extra`` must be JSON-serialisable.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise FileExistsError(f"save_model_dir: {directory} is not empty")
    extra = dict(extra or {})
    layout = layout if layout is not None else extra.pop("layout", None)
    max_tokens = max_tokens if max_tokens is not None else extra.pop("max_tokens", None)
    training_partition = training_partition if training_partition is not None else extra.pop("training_partition", None)
    for key in TOP_LEVEL_KEYS:
        extra.pop(key, None)
    if isinstance(layout, NeighborhoodLayout):
        layout_json = layout_to_json(layout)
    elif layout is None:
        layout_json = None
    else:
        layout_json = layout_to_json(layout_from_json(layout, "save_model_dir: extra['layout']"))

    state = _state_dict_cpu(model)
    sketches = _sketch_tensors(model)
    config = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "layout": layout_json,
        "max_tokens": None if max_tokens is None else int(max_tokens),
        "image_dim": int(model.config.image_dim),
        "training_partition": training_partition,
        "tensors": {
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in state.items()
        },
        "sketches": sorted(model.sketches),
        "extra": extra,
    }
    try:
        text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"save_model_dir: extra is not JSON-serialisable: {exc}") from exc
    # Weights first, config last: a directory with config.json is complete (the loader checks both anyway).
    save_file({**state, **sketches}, str(directory / WEIGHTS_FILE), metadata={"format": MODEL_FORMAT})
    tmp = directory / f".{CONFIG_FILE}.tmp{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, directory / CONFIG_FILE)
    return directory


def read_model_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ModelFormatError(f"{path} not found: {directory} is not an omnisage model directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path}: not valid JSON: {exc}") from exc
    if raw.get("format") != MODEL_FORMAT:
        raise ModelFormatError(f"{path}: field 'format' is {raw.get('format')!r}, expected {MODEL_FORMAT!r}")
    if raw.get("format_version") != MODEL_FORMAT_VERSION:
        raise ModelFormatError(
            f"{path}: field 'format_version' is {raw.get('format_version')!r}, this code reads {MODEL_FORMAT_VERSION}"
        )
    if not isinstance(raw.get("model_config"), dict):
        raise ModelFormatError(f"{path}: field 'model_config' is missing or not an object")
    return raw


def load_model_dir(directory: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model from ``config.json`` and load ``weights.safetensors`` (strict: every parameter and
    persistent buffer must be present with its shape). Returns the model in eval mode on ``map_location``."""
    directory = Path(directory)
    raw = read_model_config(directory)
    cfg_path = directory / CONFIG_FILE
    try:
        config = ModelConfig.from_dict(raw["model_config"])
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(f"{cfg_path}: field 'model_config' does not describe a model: {exc}") from exc
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFormatError(f"{weights} not found: incomplete model directory")
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        raise ModelFormatError(f"{weights}: not a readable safetensors file: {exc}") from exc
    sketches = _split_sketches(state)
    model = OmniSageModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFormatError(
            f"{weights}: tensors do not match field 'model_config' of {cfg_path}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise ModelFormatError(
            f"{weights}: tensor {k!r} has shape {tuple(state[k].shape)}, the config builds {tuple(expected[k].shape)}"
        )
    model.load_state_dict(state, strict=True)
    model = model.to(map_location).eval()
    layout = None if raw.get("layout") is None else layout_from_json(raw["layout"], f"{cfg_path}: field 'layout'")
    return LoadedModel(
        model=model,
        config=config,
        extra=dict(raw.get("extra") or {}),
        layout=layout,
        max_tokens=raw.get("max_tokens"),
        image_dim=int(raw.get("image_dim", config.image_dim)),
        training_partition=raw.get("training_partition"),
        path=directory,
        raw_config=raw,
        sketches=sketches,
    )
