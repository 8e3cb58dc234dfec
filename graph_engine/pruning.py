"""Degree-based graph pruning (paper appendix A.1, Algorithm 2) and its portable sampling key.

Semantics (README, "Data contract", "Edges"), identical in every engine:

* An undirected edge {u, v} is one entry in u's adjacency list and one in v's. ``d`` is the number of
  entries in a node's list (all edge types together).
* Each node keeps ``d_target = max(min(floor(d ** alpha), d_max), d_min)`` entries (Algorithm 2, line 5;
  the paper leaves the rounding open, we floor), all of them when ``d <= d_target`` (line 6,
  p_sample = 1).
* Algorithm 2 line 7 samples *uniformly*; we make the sample deterministic and engine independent: the
  kept entries are the ``d_target`` entries with the smallest :func:`sampling key <sampling_key_numpy>`,
  ties broken by ``(dst_type, dst_id)``. A fixed-size sample drawn by the order of a hash is a uniform
  sample without replacement, and the same input + seed give the same kept set on any engine and any
  number of partitions.
* ``d_target`` is never computed with the engine's own ``pow``: Spark's JVM ``Math.pow`` and DuckDB's C
  ``pow`` may differ by one ulp, which flips ``floor`` when ``d ** alpha`` is (nearly) an integer. The
  engines collect the small set of distinct degrees, and :func:`d_target` (numpy, one implementation)
  maps each to its target; the table is joined back.

The sampling key (documented here so any engine can reproduce it; :func:`sampling_key_sql` renders it
for Spark SQL and DuckDB, :func:`sampling_key_numpy` is the reference):

    P      = 2**31 - 1                                 (a Mersenne prime)
    limbs(x) for an int64 x (two's complement bits):  hi = (x >> 62) & 3,
                                                       mid = (x >> 31) & (2**31 - 1),
                                                       lo = x & (2**31 - 1)
    type code: pin = 1, board = 2, user = 3
    step(h, v) = ((h XOR v) * M1) mod P
    h  = INIT; for v in limbs(seed): h = step(h, v)                    (a constant, folded in Python)
    for v in (code(src_type), limbs(src_id), code(dst_type), limbs(dst_id)):  h = step(h, v)
    finalizer: h = ((h XOR (h >> 15)) * M2) mod P
               h = ((h XOR (h >> 13)) * M3) mod P
               key = h XOR (h >> 16)

Every intermediate value is in [0, 2**31) before a multiplication by a constant < 2**31, so every
product is < 2**62: no int64 overflow in numpy, DuckDB, or Spark's ANSI mode (where overflow raises). The
shifts of ``limbs`` keep the same bits whether a shift is arithmetic or logical, so the key is defined for
negative ids too. ``key`` is in [0, 2**31).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

#: Column order and types of daily_edges and pruned_edges (contract "Edges").
EDGE_COLUMNS = ("src_type", "src_id", "dst_type", "dst_id", "edge_type", "weight")
EDGE_TYPES = ("pin_board", "pin_pin")
#: Node types an edge endpoint may have, with their code in the sampling key.
KEY_TYPE_CODE = {"pin": 1, "board": 2, "user": 3}

P = 2_147_483_647  # 2**31 - 1
MASK31 = 2_147_483_647
INIT = 0x2545F491
M1 = 0x5BD1E995  # 1540483477
M2 = 0x27D4EB2D  # 668265261
M3 = 0x165667B1  # 374761393
_FINALIZER_SHIFTS = ((15, M2), (13, M3))
_LAST_SHIFT = 16
assert max(M1, M2, M3, INIT) < 2**31

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class PruningParams:
    """Algorithm 2's hyper-parameters (paper A.1; the paper's values, also A.3: alpha=0.86, d_min=10,
    d_max=10000) and the seed of the sampling key."""

    alpha: float = 0.86
    d_min: int = 10
    d_max: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0.0 <= float(self.alpha) <= 1.0):
            raise ValueError(f"PruningParams.alpha={self.alpha}: Algorithm 2 needs alpha in [0, 1]")
        if int(self.d_min) != self.d_min or self.d_min < 0:
            raise ValueError(f"PruningParams.d_min={self.d_min}: must be an integer >= 0")
        if int(self.d_max) != self.d_max or self.d_max < 1:
            raise ValueError(f"PruningParams.d_max={self.d_max}: must be an integer >= 1")
        if int(self.seed) != self.seed or not (0 <= self.seed <= MAX_SEED):
            raise ValueError(f"PruningParams.seed={self.seed}: must be an integer in [0, 2**63)")

    def to_dict(self) -> dict:
        return asdict(self)


def d_target(degree, params: PruningParams) -> np.ndarray:
    """d_target = max(min(floor(d ** alpha), d_max), d_min) (Algorithm 2 line 5, floored), int64.

    The only implementation: engines send their distinct degrees here instead of using their own pow.
    """
    d = np.asarray(degree, dtype=np.int64)
    powered = np.floor(np.power(d.astype(np.float64), float(params.alpha)))
    return np.maximum(np.minimum(powered, float(params.d_max)), float(params.d_min)).astype(np.int64)


# --------------------------------------------------------------------------------------------- the key


def _limbs_int(x: int) -> tuple[int, int, int]:
    x = int(x) & 0xFFFF_FFFF_FFFF_FFFF  # two's complement bits, like the engines see them
    return (x >> 62) & 3, (x >> 31) & MASK31, x & MASK31


def seed_state(seed: int) -> int:
    """The key's state after folding in the seed (a constant for one run, inlined as a literal)."""
    if not (0 <= int(seed) <= MAX_SEED):
        raise ValueError(f"seed={seed}: must be an integer in [0, 2**63)")
    h = INIT
    for v in _limbs_int(seed):
        h = ((h ^ v) * M1) % P
    return h


def sampling_key_numpy(seed: int, src_type, src_id, dst_type, dst_id) -> np.ndarray:
    """Reference implementation of the sampling key (int64 in [0, 2**31)).

    ``src_type``/``dst_type`` are arrays (or scalars) of type names; ids are int64.
    """
    src_id = np.asarray(src_id, dtype=np.int64)
    dst_id = np.asarray(dst_id, dtype=np.int64)
    n = np.broadcast_shapes(src_id.shape, dst_id.shape)
    h = np.full(n, seed_state(seed), dtype=np.int64)

    def step(h: np.ndarray, v: np.ndarray) -> np.ndarray:
        return (np.bitwise_xor(h, v) * M1) % P

    for types, ids in ((src_type, src_id), (dst_type, dst_id)):
        h = step(h, type_codes(types))
        # numpy's >> on int64 is arithmetic; the masks make the result the same as a logical shift.
        h = step(h, (ids >> 62) & 3)
        h = step(h, (ids >> 31) & MASK31)
        h = step(h, ids & MASK31)
    for shift, mult in _FINALIZER_SHIFTS:
        h = (np.bitwise_xor(h, h >> shift) * mult) % P
    return np.bitwise_xor(h, h >> _LAST_SHIFT)


def type_codes(types) -> np.ndarray:
    arr = np.asarray(types)
    codes = np.zeros(arr.shape, dtype=np.int64)
    seen = np.zeros(arr.shape, dtype=bool)
    for name, code in KEY_TYPE_CODE.items():
        hit = arr == name
        codes[hit] = code
        seen |= hit
    if not seen.all():
        bad = sorted(set(np.asarray(arr[~seen]).ravel().tolist()))[:5]
        raise ValueError(f"unknown node type(s) {bad}: expected one of {sorted(KEY_TYPE_CODE)}")
    return codes


Dialect = Literal["spark", "duckdb"]


def _ops(dialect: Dialect):
    if dialect == "spark":
        return (lambda a, b: f"(({a}) ^ ({b}))"), (lambda a, n: f"shiftright({a}, {n})")
    if dialect == "duckdb":
        return (lambda a, b: f"xor({a}, {b})"), (lambda a, n: f"(({a}) >> {n})")
    raise ValueError(f"unknown SQL dialect {dialect!r}")


def _big(value: int) -> str:
    return f"CAST({int(value)} AS BIGINT)"


def type_code_sql(column: str) -> str:
    """The node-type code as a BIGINT; unknown types give NULL (engines reject them before keying)."""
    whens = " ".join(f"WHEN '{name}' THEN {_big(code)}" for name, code in KEY_TYPE_CODE.items())
    return f"(CASE {column} {whens} END)"


def sampling_key_sql(
    dialect: Dialect, seed: int, src_type: str, src_id: str, dst_type: str, dst_id: str, prefix: str = "_k"
) -> list[tuple[str, str]]:
    """The sampling key as successive projections ``[(column, expression), ...]``.

    Apply them in order (each may reference the columns before it); the last column is the key. Stages
    keep the text small: the finalizer reads its input twice, so a single nested expression would grow
    eightfold. Every literal and CASE is cast to BIGINT so DuckDB never multiplies in INTEGER.
    """
    xor, shr = _ops(dialect)

    def step(h: str, v: str) -> str:
        return f"(({xor(h, v)} * {_big(M1)}) % {_big(P)})"

    h = _big(seed_state(seed))
    for t, i in ((src_type, src_id), (dst_type, dst_id)):
        h = step(h, type_code_sql(t))
        h = step(h, f"({shr(i, 62)} & {_big(3)})")
        h = step(h, f"({shr(i, 31)} & {_big(MASK31)})")
        h = step(h, f"({i} & {_big(MASK31)})")
    stages = [(f"{prefix}0", h)]
    prev = f"{prefix}0"
    for n, (shift, mult) in enumerate(_FINALIZER_SHIFTS, start=1):
        stages.append((f"{prefix}{n}", f"(({xor(prev, shr(prev, shift))} * {_big(mult)}) % {_big(P)})"))
        prev = f"{prefix}{n}"
    stages.append((f"{prefix}", xor(prev, shr(prev, _LAST_SHIFT))))
    return stages


# ------------------------------------------------------------------------------- the numpy reference


def canonical_undirected(src_type, src_id, dst_type, dst_id, edge_type, weight) -> dict[str, np.ndarray]:
    """Sum duplicate undirected edges (both orientations of a same-type pair are one edge); returns the
    canonical edges (same-type pairs with src_id < dst_id) sorted by (edge_type, src, dst)."""
    st = np.asarray(src_type, dtype=object)
    dt = np.asarray(dst_type, dtype=object)
    si = np.asarray(src_id, dtype=np.int64)
    di = np.asarray(dst_id, dtype=np.int64)
    et = np.asarray(edge_type, dtype=object)
    w = np.asarray(weight, dtype=np.float64)
    swap = (st == dt) & (si > di)
    si, di = np.where(swap, di, si), np.where(swap, si, di)
    codes = np.stack([_codes_of(et), type_codes(st), si, type_codes(dt), di], axis=1)
    uniq, inverse = np.unique(codes, axis=0, return_inverse=True)
    summed = np.zeros(len(uniq), dtype=np.float64)
    np.add.at(summed, inverse.ravel(), w)
    return {
        "src_type": _names_of(uniq[:, 1]),
        "src_id": uniq[:, 2].astype(np.int64),
        "dst_type": _names_of(uniq[:, 3]),
        "dst_id": uniq[:, 4].astype(np.int64),
        "edge_type": np.asarray([EDGE_TYPES[c] for c in uniq[:, 0]], dtype=object),
        "weight": summed,
    }


def _codes_of(edge_types: np.ndarray) -> np.ndarray:
    out = np.full(edge_types.shape, -1, dtype=np.int64)
    for code, name in enumerate(EDGE_TYPES):
        out[edge_types == name] = code
    if (out < 0).any():
        raise ValueError(f"unknown edge type(s) {sorted(set(edge_types[out < 0].tolist()))[:5]}")
    return out


def _names_of(codes: np.ndarray) -> np.ndarray:
    by_code = {c: n for n, c in KEY_TYPE_CODE.items()}
    return np.asarray([by_code[int(c)] for c in codes], dtype=object) if len(codes) else np.zeros(0, object)


def prune_reference(edges: dict, params: PruningParams) -> dict[str, np.ndarray]:
    """Numpy reference of the whole pruning: window-summed undirected ``edges`` (any orientation,
    duplicates allowed) -> kept directed entries, sorted by (src_type, src_id, dst_type, dst_id)."""
    und = canonical_undirected(*(edges[c] for c in EDGE_COLUMNS))
    # Each undirected edge is one entry in each endpoint's list.
    ent = {
        "src_type": np.concatenate([und["src_type"], und["dst_type"]]),
        "src_id": np.concatenate([und["src_id"], und["dst_id"]]),
        "dst_type": np.concatenate([und["dst_type"], und["src_type"]]),
        "dst_id": np.concatenate([und["dst_id"], und["src_id"]]),
        "edge_type": np.concatenate([und["edge_type"], und["edge_type"]]),
        "weight": np.concatenate([und["weight"], und["weight"]]),
    }
    n = len(ent["src_id"])
    if n == 0:
        return {c: ent[c] for c in EDGE_COLUMNS}
    key = sampling_key_numpy(params.seed, ent["src_type"], ent["src_id"], ent["dst_type"], ent["dst_id"])
    s_code, d_code = type_codes(ent["src_type"]), type_codes(ent["dst_type"])
    # The tie-break compares dst_type as a string (like SQL ORDER BY does), so rank the names
    # alphabetically rather than by their key code.
    name_rank = {name: r for r, name in enumerate(sorted(KEY_TYPE_CODE))}
    d_rank = np.asarray([name_rank[t] for t in ent["dst_type"]], dtype=np.int64)
    order = np.lexsort((ent["dst_id"], d_rank, key, ent["src_id"], s_code))
    s_sorted, i_sorted = s_code[order], ent["src_id"][order]
    new_node = np.ones(n, dtype=bool)
    new_node[1:] = (s_sorted[1:] != s_sorted[:-1]) | (i_sorted[1:] != i_sorted[:-1])
    starts = np.flatnonzero(new_node)
    lengths = np.diff(np.append(starts, n))
    rank = np.arange(n) - np.repeat(starts, lengths)
    keep_sorted = rank < np.repeat(d_target(lengths, params), lengths)
    kept = order[keep_sorted]
    out = {c: ent[c][kept] for c in EDGE_COLUMNS}
    final = np.lexsort((out["dst_id"], d_code[kept], out["src_id"], s_code[kept]))
    return {c: out[c][final] for c in EDGE_COLUMNS}
