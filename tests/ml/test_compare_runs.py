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


def _weighted(tmp_path: Path, name: str, hits: np.ndarray, pos: np.ndarray, weights: np.ndarray) -> str:
    path = tmp_path / f"{name}.npz"
    np.savez_compressed(path, hits_model=hits, weights=weights, pair_query_id=np.zeros(hits.size, int), pair_pos_id=pos)
    return str(path)


def test_common_pairs_compares_the_pairs_both_runs_scored(tmp_path):
    """Run A scored pairs 0-199 (weight 2) and 1000-1099 (a family B lacks); B scored 0-199 (weight 5, one
    factor away): refused as they are, compared on the 200 shared pairs with --common-pairs."""
    rng = np.random.default_rng(1)
    shared = np.arange(200)
    hits_b = (rng.random(200) < 0.2).astype(float)
    hits_a = np.concatenate([np.maximum(hits_b, (rng.random(200) < 0.3).astype(float)), np.ones(100)])
    a = _weighted(tmp_path, "a", hits_a, np.concatenate([shared, 1000 + np.arange(100)]), np.full(300, 2.0))
    order = rng.permutation(200)  # B lists the same pairs in another order: aligned by pair
    b = _weighted(tmp_path, "b", hits_b[order], shared[order], np.full(200, 5.0))
    with pytest.raises(ValueError, match="different pairs"):
        compare_runs.main([a, b, "--n-boot", "200"])
    out = compare_runs.main([a, b, "--common-pairs", "--n-boot", "200"])
    assert out["common_pairs"] == 200 and out["dropped_rows"] == 100
    assert out["recall_a"] == pytest.approx(hits_a[:200].mean()) and out["recall_b"] == pytest.approx(hits_b.mean())
    assert out["diff"] == pytest.approx(hits_a[:200].mean() - hits_b.mean()) and out["ci95"][0] > 0
    skewed = _weighted(tmp_path, "c", hits_b, shared, np.linspace(1, 2, 200))
    with pytest.raises(ValueError, match="relative weights"):
        compare_runs.main([a, skewed, "--common-pairs", "--n-boot", "200"])
