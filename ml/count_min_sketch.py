"""Count-min sketch (Cormode & Muthukrishnan, paper ref [10]) of how often entities appear as positives.

Used for the logQ sampling-bias correction of in-batch negatives (paper section 3.3, ref [6]): the in-batch
candidates are drawn from the training-label distribution, whose per-entity frequency the sketch streams.

* Keys are ``ml.losses.entity_key(type_code, id)`` (``id * 4 + type_code``), i.e. the entity itself and not
  a dense graph index, so counts survive the daily re-indexing of the graph snapshot.
* ``depth`` rows of ``width`` int64 counters. ``update(keys)`` adds 1 per key occurrence to one counter per
  row - vectorised for a whole batch with ``index_add_`` (duplicates within the batch accumulate).
  ``estimate(keys)`` = min over the rows. Guarantees: est(x) >= true(x) always, and with probability
  >= 1 - delta, est(x) <= true(x) + eps * N, where N = ``total`` (number of keys added so far),
  eps = e / width, delta = e^-depth.

Hash functions: row r uses the multilinear (Carter-Wegman) universal family over the prime field
Z_p, p = 2^31 - 1:  the 64-bit key (two's complement, i.e. as an unsigned 64-bit number) is split into three
30-bit digits x_0 = bits 0-29, x_1 = bits 30-59, x_2 = bits 60-63 (each < 2^30 < p, so distinct keys give
distinct digit vectors), and

    h_r(x) = ((b_r + a_r0 * x_0 + a_r1 * x_1 + a_r2 * x_2) mod p) mod width

with a_rk, b_r drawn uniformly from [0, p) by a ``torch.Generator`` seeded with ``seed``. For x != y,
Pr[(b + a.x) mod p == (b + a.y) mod p] = 1/p, and the final ``mod width`` gives a collision probability of
about 1/width, which is what the CMS bound needs. All arithmetic stays inside int64 without overflow: the
accumulator is reduced mod p after every term, so it is < 2^31, and a_rk * x_k < 2^31 * 2^30 = 2^61; their
sum is < 2^62.

``state_dict()`` / ``load_state_dict()`` hold plain tensors (checkpoints load with ``weights_only=True``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["MERSENNE_P", "CountMinSketch"]

MERSENNE_P = (1 << 31) - 1
_DIGIT_BITS = 30
_DIGIT_MASK = (1 << _DIGIT_BITS) - 1
_N_DIGITS = 3  # 30 + 30 + 4 bits cover 64


def _as_keys(keys: Any, device: torch.device) -> torch.Tensor:
    t = keys if isinstance(keys, torch.Tensor) else torch.as_tensor(np.asarray(keys))
    if t.numel() and (t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex()):
        raise TypeError(f"CountMinSketch: keys must be integer entity keys (int64), got dtype {t.dtype}")
    return t.reshape(-1).to(device=device, dtype=torch.int64)


class CountMinSketch:
    """Streaming frequency estimates for int64 entity keys (see module docstring).

    width: counters per row (eps = e / width); depth: rows / hash functions (delta = e^-depth);
    seed: seeds the hash parameters (same seed -> same hashes, so a checkpoint stays meaningful).
    """

    def __init__(self, width: int = 1 << 20, depth: int = 4, seed: int = 0, device: str | torch.device = "cpu"):
        if int(width) < 1 or int(depth) < 1:
            raise ValueError(f"CountMinSketch: width and depth must be >= 1, got width={width}, depth={depth}")
        self.width = int(width)
        self.depth = int(depth)
        self.seed = int(seed)
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(self.seed)
        # a: [depth, 3] multipliers, b: [depth] offsets, uniform in [0, p).
        self.hash_a = torch.randint(0, MERSENNE_P, (self.depth, _N_DIGITS), generator=gen, dtype=torch.int64).to(
            self.device
        )
        self.hash_b = torch.randint(0, MERSENNE_P, (self.depth,), generator=gen, dtype=torch.int64).to(self.device)
        self.table = torch.zeros((self.depth, self.width), dtype=torch.int64, device=self.device)
        self._total = torch.zeros((), dtype=torch.int64, device=self.device)

    # ---------------------------------------------------------------- parameters of the guarantee
    @property
    def eps(self) -> float:
        """Additive error factor e / width (error <= eps * total with probability >= 1 - delta)."""
        return math.e / self.width

    @property
    def delta(self) -> float:
        """Failure probability e^-depth of the error bound, per queried key."""
        return math.exp(-self.depth)

    @property
    def total(self) -> int:
        """N: number of keys added so far (sum of all update counts)."""
        return int(self._total)

    # ---------------------------------------------------------------- hashing
    def buckets(self, keys: Any) -> torch.Tensor:
        """int64 [depth, n]: the counter column of every key in every row."""
        k = _as_keys(keys, self.device)
        # Digits of the key as an unsigned 64-bit number; & after >> discards the sign extension.
        digits = [
            k & _DIGIT_MASK,
            (k >> _DIGIT_BITS) & _DIGIT_MASK,
            (k >> (2 * _DIGIT_BITS)) & 0xF,
        ]
        acc = self.hash_b[:, None].expand(self.depth, k.shape[0]).clone()
        for j, x in enumerate(digits):
            acc = (acc + self.hash_a[:, j : j + 1] * x[None, :]) % MERSENNE_P
        return acc % self.width

    # ---------------------------------------------------------------- updates and queries
    def update(self, keys: Any, counts: Any | None = None) -> None:
        """Add one occurrence per key (or ``counts[i]`` for key i); duplicates in ``keys`` accumulate."""
        cols = self.buckets(keys)
        n = cols.shape[1]
        if n == 0:
            return
        if counts is None:
            c = torch.ones(n, dtype=torch.int64, device=self.device)
        else:
            c = _as_keys(counts, self.device)
            if c.shape[0] != n:
                raise ValueError(f"CountMinSketch.update: counts must have one entry per key ({n}), got {c.shape[0]}")
            if int(c.min()) < 0:
                raise ValueError("CountMinSketch.update: counts must be >= 0 (the estimate's lower bound needs it)")
        flat = (torch.arange(self.depth, device=self.device)[:, None] * self.width + cols).reshape(-1)
        self.table.view(-1).index_add_(0, flat, c.repeat(self.depth))
        self._total += c.sum()

    def estimate(self, keys: Any) -> torch.Tensor:
        """int64 [n]: min over rows of the keys' counters (never below the true count)."""
        cols = self.buckets(keys)
        if cols.shape[1] == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        return self.table.gather(1, cols).min(dim=0).values

    def in_batch_log_q(self, keys: Any, batch_size: int) -> torch.Tensor:
        """float32 [n]: log Q of in-batch candidates, log(1 - (1 - p)^B) with p = est(key) / total (ref [6]).

        Derivation (``ml/losses.py``, paper symbols): the in-batch candidates are the positives of B
        training examples, B independent draws from the label distribution, and p = est / total estimates
        one draw's probability of being the entity. The loss keeps one column per distinct entity, which is
        there iff at least one draw is the entity: Q = 1 - (1 - p)^B, the inclusion probability (~ B p for
        B p << 1, -> 1 for popular entities; never above 1, so no clamp is needed). Random negatives carry
        their sampler's log(M / N_t), the same quantity for M uniform draws up to a factor 1 - O(M / N_t).
        Computed as log(-expm1(B * log1p(-p))) in float64, accurate for tiny and for large B p. Clamps:
        est >= 1 (the key is in the current batch; call ``update`` with the batch first) and total >= 1, so
        the log is finite. An empty sketch gives 0 for every key, i.e. no correction.
        """
        out_device = keys.device if isinstance(keys, torch.Tensor) else self.device
        if _as_keys(keys, self.device).numel() == 0:  # e.g. no future-action query in this batch
            return torch.zeros(0, dtype=torch.float32, device=out_device)
        if int(batch_size) < 1:
            raise ValueError(f"CountMinSketch.in_batch_log_q: batch_size must be >= 1, got {batch_size}")
        est = self.estimate(keys).clamp_min(1).to(torch.float64)
        total = self._total.clamp_min(1).to(torch.float64)  # a tensor: no host sync on the device
        p = (est / total).clamp_max(1.0)  # est <= total for a count-min sketch; 1 with the clamps above
        log_q = torch.log(-torch.expm1(int(batch_size) * torch.log1p(-p)))
        return log_q.to(device=out_device, dtype=torch.float32)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "table": self.table.clone(),
            "total": self._total.clone(),
            "hash_a": self.hash_a.clone(),
            "hash_b": self.hash_b.clone(),
            "width": torch.tensor(self.width),
            "depth": torch.tensor(self.depth),
            "seed": torch.tensor(self.seed),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = {"table", "total", "hash_a", "hash_b"} - set(state)
        if missing:
            raise KeyError(f"CountMinSketch.load_state_dict: missing entries {sorted(missing)}")
        table = torch.as_tensor(state["table"])
        if tuple(table.shape) != (self.depth, self.width):
            raise ValueError(
                f"CountMinSketch.load_state_dict: table has shape {tuple(table.shape)}, this sketch is "
                f"(depth={self.depth}, width={self.width})"
            )
        if tuple(state["hash_a"].shape) != tuple(self.hash_a.shape):
            raise ValueError("CountMinSketch.load_state_dict: hash_a shape does not match depth")
        self.table = table.to(device=self.device, dtype=torch.int64).clone()
        self._total = torch.as_tensor(state["total"]).to(device=self.device, dtype=torch.int64).reshape(()).clone()
        # The hashes travel with the counts: counters are meaningless under other hash functions.
        self.hash_a = state["hash_a"].to(device=self.device, dtype=torch.int64).clone()
        self.hash_b = state["hash_b"].to(device=self.device, dtype=torch.int64).clone()
        if "seed" in state:
            self.seed = int(state["seed"])

    def to(self, device: str | torch.device) -> CountMinSketch:
        self.device = torch.device(device)
        for name in ("table", "_total", "hash_a", "hash_b"):
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    def __repr__(self) -> str:
        return f"CountMinSketch(width={self.width}, depth={self.depth}, seed={self.seed}, total={self.total})"
