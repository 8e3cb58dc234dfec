"""The paired bootstrap over users (ml.significance): a known answer, coverage of the true difference on
simulated users, users (not rows) as the resampling unit, weights, and determinism with the seed."""

from __future__ import annotations

import numpy as np
import pytest

from ml.significance import paired_bootstrap


def test_a_always_hits_b_never():
    users = np.repeat(np.arange(30), 4)
    r = paired_bootstrap(np.ones(120), np.zeros(120), users, n_boot=500)
    assert r.diff == 1.0 and (r.low, r.high) == (1.0, 1.0)
    out = r.to_json()
    assert out["ci95"] == [1.0, 1.0] and out["resampled"] == "users" and out["units"] == 30 and out["pairs"] == 120
    assert paired_bootstrap(np.ones(5), np.zeros(5)).resampled == "queries"


def simulate(rng, users: int = 150, true_diff: float = 0.05) -> tuple[np.ndarray, ...]:
    """Users with their own base rate and 1..40 rows: A hits with base + true_diff, B with base."""
    base = rng.uniform(0.05, 0.6, users)
    rows = rng.integers(1, 41, users)
    owner = np.repeat(np.arange(users), rows)
    p = base[owner]
    return rng.random(owner.size) < p + true_diff, rng.random(owner.size) < p, owner


def test_the_interval_covers_the_true_difference():
    """Over 100 simulated data sets the 95 % interval holds the true difference about 95 times; the true
    difference of the simulation is 0.05 per row, and rows of a user are weighted by the user's row count."""
    rng = np.random.default_rng(0)
    covered = 0
    for i in range(100):
        a, b, owner = simulate(rng)
        r = paired_bootstrap(a, b, owner, n_boot=400, seed=i)
        covered += r.low <= 0.05 <= r.high
        assert r.low <= r.diff <= r.high
    assert 88 <= covered <= 100


def test_users_not_rows_are_resampled():
    """Hits that are shared by all rows of a user: resampling rows treats them as independent and gives a
    too narrow interval; resampling users does not."""
    rng = np.random.default_rng(1)
    users, rows = 40, 50
    owner = np.repeat(np.arange(users), rows)
    a = np.repeat(rng.random(users) < 0.5, rows)  # a user's rows all hit or all miss
    b = np.zeros(users * rows)
    by_user = paired_bootstrap(a, b, owner, n_boot=1000)
    by_row = paired_bootstrap(a, b, None, n_boot=1000)
    assert by_user.diff == by_row.diff
    assert (by_user.high - by_user.low) > 4 * (by_row.high - by_row.low)


def test_weights_make_a_weighted_mean_and_fractions_are_hits():
    a = np.array([1.0, 0.0, 0.5, 1.0])  # per-seed hit rates
    b = np.zeros(4)
    w = np.array([3.0, 1.0, 1.0, 1.0])
    r = paired_bootstrap(a, b, ["u", "u", "v", "w"], weights=w, n_boot=200)
    assert r.diff == pytest.approx((3 + 0 + 0.5 + 1) / 6)
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap(a, b[:3])
    with pytest.raises(ValueError, match="weights"):
        paired_bootstrap(a, b, weights=-w)


def test_deterministic_with_the_seed():
    a, b, owner = simulate(np.random.default_rng(2))
    one, two = paired_bootstrap(a, b, owner, seed=3), paired_bootstrap(a, b, owner, seed=3)
    other = paired_bootstrap(a, b, owner, seed=4)
    assert (one.low, one.high) == (two.low, two.high) and one.n_boot == 2000
    assert (one.low, one.high) != (other.low, other.high)
