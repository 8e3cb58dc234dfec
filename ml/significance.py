"""Paired bootstrap of a recall difference between two systems scored on the same rows.

Rows (query-positive pairs) of one user are not independent - a user who rates predictable movies makes every
system hit on many rows at once - so the resampling unit is the USER: a replicate draws the units with
replacement (each as often as a multinomial count says) and keeps all of a drawn unit's rows; the statistic is
the (weighted) mean of A's hits minus B's on the replicate, and the interval is the percentile interval of
``n_boot`` replicates around the observed difference. Without a unit per row (the synthetic evaluator's pairs
carry no user) every row is its own unit and the result says ``"resampled": "queries"``.

Hits may be fractions (a system trained on several seeds: its hit rate per row over the seeds); ``weights``
make the statistic a weighted mean sum(w h) / sum(w) (the evaluator's mean of per-source recalls). Vectorised:
per-unit sums, then the replicates' multinomial counts times them, in blocks of replicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BootstrapResult", "paired_bootstrap"]

_BLOCK = 1 << 22  # count entries per block of replicates


@dataclass
class BootstrapResult:
    diff: float  # observed mean(A) - mean(B)
    low: float
    high: float
    level: float
    resampled: str  # "users" or "queries"
    units: int
    rows: int
    n_boot: int
    seed: int

    def to_json(self) -> dict:
        return {
            "diff": self.diff,
            f"ci{round(self.level * 100)}": [self.low, self.high],
            "resampled": self.resampled,
            "units": self.units,
            "pairs": self.rows,
            "n_boot": self.n_boot,
            "seed": self.seed,
        }


def paired_bootstrap(
    hits_a,
    hits_b,
    units=None,
    *,
    weights=None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapResult:
    """Bootstrap of mean(hits_a) - mean(hits_b) over ``units`` (module docstring): ``units[i]`` is row i's
    user (any hashable ids; None: rows are resampled), ``weights[i]`` its weight (default 1)."""
    a, b = np.asarray(hits_a, dtype=np.float64).reshape(-1), np.asarray(hits_b, dtype=np.float64).reshape(-1)
    n = a.size
    if b.size != n:
        raise ValueError(f"paired_bootstrap: {n} hits of A but {b.size} of B (the rows must be the same)")
    if n == 0:
        raise ValueError("paired_bootstrap: no rows")
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"paired_bootstrap: n_boot={n_boot} must be >= 1 and level={level} in (0, 1)")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != n or (w < 0).any() or w.sum() <= 0:
        raise ValueError("paired_bootstrap: weights must be one non-negative number per row, not all 0")
    if units is None:
        unit, resampled = np.arange(n), "queries"
    else:
        units = np.asarray(units)
        if units.size != n:
            raise ValueError(f"paired_bootstrap: {units.size} units for {n} rows")
        unit, resampled = np.unique(units, return_inverse=True)[1].reshape(-1), "users"
    m = int(unit.max()) + 1
    sum_w = np.bincount(unit, w, minlength=m)
    sum_d = np.bincount(unit, w * (a - b), minlength=m)
    diff = float(sum_d.sum() / sum_w.sum())
    rng = np.random.default_rng([seed, 7])
    stats = np.empty(n_boot, dtype=np.float64)
    step = max(1, _BLOCK // m)
    for lo in range(0, n_boot, step):
        counts = rng.multinomial(m, np.full(m, 1.0 / m), size=min(step, n_boot - lo)).astype(np.float64)
        total = counts @ sum_w
        # a replicate that drew only zero-weight units has no mean: it counts as no difference
        stats[lo : lo + counts.shape[0]] = np.divide(counts @ sum_d, total, out=np.zeros_like(total), where=total > 0)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return BootstrapResult(diff, float(low), float(high), level, resampled, m, n, int(n_boot), int(seed))
