"""benchmarks/compare_runs.py: two quality runs compared pair by pair (paper Table 3's graph vs no graph)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_runs.py"
_spec = importlib.util.spec_from_file_location("compare_runs", _PATH)
compare_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_runs)


def _run(tmp_path: Path, name: str, hits: np.ndarray, pos: np.ndarray) -> str:
    path = tmp_path / f"{name}.npz"
    users = np.repeat(np.arange(hits.size // 4), 4)
    np.savez_compressed(
        path,
        hits_model=hits,
        users=users,
        weights=np.ones(hits.size),
        pair_query_id=np.arange(hits.size),
        pair_pos_id=pos,
    )
    return str(path)


def test_a_run_ahead_on_every_user_has_an_interval_above_zero(tmp_path):
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.2).astype(float)
    better = np.maximum(base, (rng.random(400) < 0.3).astype(float))
    pos = np.arange(400) + 1
    out = compare_runs.main([_run(tmp_path, "a", better, pos), _run(tmp_path, "b", base, pos), "--n-boot", "500"])
    assert out["diff"] == pytest.approx(better.mean() - base.mean())
    assert out["ci95"][0] > 0 and out["resampled"] == "users" and out["units"] == 100


def test_runs_on_different_pairs_are_refused(tmp_path):
    hits = np.zeros(8)
    a = compare_runs.load(_run(tmp_path, "a", hits, np.arange(8)), "model")
    b = compare_runs.load(_run(tmp_path, "b", hits, np.arange(8) + 1), "model")
    with pytest.raises(ValueError, match="pair_pos_id differs"):
        compare_runs.compare_runs(a, b, "model", 100)
