"""Promotion of a new model version: from reading the champion to moving the alias, for any tracking store.

Two trainings that gate at the same time must not both read champion vN, both win against it and both set
``champion`` (the second silently replacing a model it was never compared with). Two guards:

- ``promotion_lock``: an exclusive ``flock`` on ``<lock_dir>/.promotion.<key>.lock``, where ``lock_dir`` is under
  OMNISAGE_HOME (the training's checkpoint root) and the key names the tracking store and the registered
  model, so every training of this home that promotes into that model is serialised, whatever the store
  (sqlite, file, a tracking server). A sqlite store's own lock (``ml.tracking.store_lock``, next to the
  database) is taken too: it also covers other homes sharing that database.
- ``compare_and_set``: right before the alias moves, the champion is read again; when it is no longer the
  version the gate compared against (a training of another host, which no local lock sees), the new version
  is not promoted over a model it was never compared with: it becomes ``challenger`` and the decision says
  why. MLflow has no conditional alias update, so this narrows the cross-host race to the registration call
  itself; on one host the lock alone makes promotions strictly one after the other.
"""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ml.tracking import store_lock

CHAMPION, CHALLENGER = "champion", "challenger"


def promotion_lock_path(lock_dir: Path, tracking_uri: str, model_name: str) -> Path:
    """The lock file serialising promotions of ``model_name`` in ``tracking_uri`` for this home."""
    key = hashlib.sha256(f"{tracking_uri}\n{model_name}".encode()).hexdigest()[:16]
    return Path(lock_dir) / f".promotion.{key}.lock"


@contextmanager
def promotion_lock(lock_dir: Path, tracking_uri: str, model_name: str) -> Iterator[Path]:
    """Hold the promotion lock (module docstring) for the ``with`` block; yields the lock file."""
    path = promotion_lock_path(lock_dir, tracking_uri, model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        handle = stack.enter_context(open(path, "a+"))
        fcntl.flock(handle, fcntl.LOCK_EX)
        stack.callback(fcntl.flock, handle, fcntl.LOCK_UN)
        stack.enter_context(store_lock(tracking_uri))
        yield path


def compare_and_set(registry, gate: dict) -> dict:
    """``gate`` (the 3-key dict ``ml.promotion_gate.GateDecision.rechecked`` builds) if the champion is still
    ``gate["previous"]``; else the same gate demoted to challenger (only a promotion can overwrite another run's
    decision)."""
    if gate["alias"] != CHAMPION:
        return gate
    current = registry.version_for_alias(CHAMPION)
    if current == gate["previous"]:
        return gate
    was = f"v{gate['previous']}" if gate["previous"] else "none"
    decision = (
        f"challenger: the champion moved from {was} to v{current} while this run was gated; not promoted over "
        f"a model it was not compared with (gate: {gate['decision']})"
    )
    return {**gate, "alias": CHALLENGER, "decision": decision}
