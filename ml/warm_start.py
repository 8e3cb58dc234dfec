"""Warm start of daily training from the registry's champion: its weights and its count-min sketches.

Daily retraining from scratch forgets what yesterday's model learned and starts the logQ correction (eq. 1)
with empty sketches, so the first steps of every run train against uncorrected popularity. A warm start
loads the champion's weights and sketch counts into the new model; the optimizer and the learning-rate
schedule start fresh (the warm-up then acts as a gentle re-entry). The champion is used only when it has
exactly the new configuration's tensors (names and shapes) and neighbourhood layout: anything else trains
from scratch and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHAMPION = "champion"


@dataclass
class WarmStart:
    version: str
    weights: dict[str, torch.Tensor]
    sketches: dict[str, dict[str, torch.Tensor]]


def _shape_mismatch(weights: dict[str, torch.Tensor], model_config) -> str:
    from ml.model import OmniSageModel

    expected = {k: tuple(v.shape) for k, v in OmniSageModel(model_config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        return f"tensors differ (missing {missing[:3]}, unexpected {unexpected[:3]})"
    bad = [k for k in expected if expected[k] != got[k]]
    return f"tensor {bad[0]!r} has shape {got[bad[0]]}, this config builds {expected[bad[0]]}" if bad else ""


def champion_warm_start(tracking_uri: str, model_name: str, model_config, layout) -> tuple[WarmStart | None, str]:
    """-> (the champion's weights and sketches, or None; a note saying what was used or why not)."""
    from ml.model_io import ModelFormatError
    from ml.registry import ModelRegistry

    registry = ModelRegistry(tracking_uri, model_name=model_name)
    version = registry.version_for_alias(CHAMPION)
    if version is None:
        return None, "warm start: no champion yet, trained from scratch"
    try:
        champ = registry.load_version(version, map_location="cpu")
    except ModelFormatError as exc:
        return None, f"warm start: champion v{version} cannot be loaded ({exc}), trained from scratch"
    if champ.layout is not None and champ.layout != layout:
        return None, f"warm start: champion v{version} has another neighbourhood layout, trained from scratch"
    weights = {k: v.detach().clone() for k, v in champ.model.state_dict().items()}
    mismatch = _shape_mismatch(weights, model_config)
    if mismatch:
        return (
            None,
            f"warm start: champion v{version} does not fit this configuration ({mismatch}), trained from scratch",
        )
    note = f"warm start from champion v{version} ({len(champ.sketches)} count-min sketches)"
    return WarmStart(version, weights, champ.sketches), note
