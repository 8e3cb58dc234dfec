"""The planted truth of a synthetic data set (``omnisage_pipeline.tools.synthetic`` writes it under
``DIR/_truth/``), read back for the oracle baseline (ml.baselines.oracle_baseline) and the tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def user_latents_on_day(latent0: np.ndarray, drift_direction: np.ndarray, drift_rate: float, day_index: int):
    """Users' interests drift slowly: u_d = normalize(u_0 + drift_rate * d * centroid[drift_topic])."""
    x = latent0.astype(np.float64) + drift_rate * day_index * drift_direction
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class Truth:
    """The planted truth, read back from ``DIR/_truth`` (for oracle recall and tests)."""

    meta: dict
    pin_id: np.ndarray
    pin_topic: np.ndarray
    pin_subtopic: np.ndarray  # cluster id = topic * subtopics_per_topic + sub-topic
    pin_latent: np.ndarray
    board_id: np.ndarray
    board_topic: np.ndarray
    board_latent: np.ndarray
    board_owner: np.ndarray  # user_id of the board's owner
    user_id: np.ndarray
    user_topic: np.ndarray
    user_latent: np.ndarray
    user_drift_topic: np.ndarray
    centroids: np.ndarray

    def user_latents_on_day(self, day: str | date) -> np.ndarray:
        d = (date.fromisoformat(str(day)) - date.fromisoformat(self.meta["start_date"])).days
        return user_latents_on_day(self.user_latent, self.centroids[self.user_drift_topic], self.meta["drift_rate"], d)


def load_truth(data_root: str | Path) -> Truth:
    base = Path(data_root) / "_truth"
    if not (base / "meta.json").is_file():
        raise FileNotFoundError(f"{base / 'meta.json'} not found: {data_root} is not a synthetic data set")
    meta = json.loads((base / "meta.json").read_text())

    def vec(t, col="latent"):
        return np.asarray(t.column(col).combine_chunks().flatten(), dtype=np.float32).reshape(t.num_rows, -1)

    pins, boards, users, topics = (pq.read_table(base / f"{n}.parquet") for n in ("pins", "boards", "users", "topics"))
    return Truth(
        meta=meta,
        pin_id=pins["pin_id"].to_numpy(),
        pin_topic=pins["topic"].to_numpy(),
        pin_subtopic=pins["subtopic"].to_numpy(),
        pin_latent=vec(pins),
        board_id=boards["board_id"].to_numpy(),
        board_topic=boards["topic"].to_numpy(),
        board_latent=vec(boards),
        board_owner=boards["owner_user_id"].to_numpy(),
        user_id=users["user_id"].to_numpy(),
        user_topic=users["topic"].to_numpy(),
        user_latent=vec(users),
        user_drift_topic=users["drift_topic"].to_numpy(),
        centroids=vec(topics, "centroid").astype(np.float64),
    )
