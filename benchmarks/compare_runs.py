"""Paired comparison of two ``benchmarks/quality.py`` runs on the same data (e.g. paper Table 3's graph vs no
graph): entity-entity recall of one system in each run, the difference with a 95 % paired-bootstrap interval
over users (``ml.significance``; over pairs where the pairs carry no user).

    python benchmarks/quality.py --dataset synthetic --defaults --work /tmp/with
    python benchmarks/quality.py --dataset synthetic --defaults --no-graph --work /tmp/without
    python benchmarks/compare_runs.py /tmp/with/hits.npz /tmp/without/hits.npz --system model

The two runs must have scored the same pairs (same data, split and seeds of the evaluation sets): checked,
an error otherwise. ``--common-pairs`` compares them on the pairs both scored instead (e.g. the engagement
pairs, where a run without the graph has no graph-neighbourhood pairs to draw), provided their weights there
agree up to one factor. Last line: one JSON object ``{"system", "a", "b", "recall_a", "recall_b", "diff", "ci95",
"resampled", ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.significance import paired_bootstrap


def load(path: str, system: str) -> dict:
    data = np.load(path, allow_pickle=False)
    key = f"hits_{system}"
    if key not in data:
        raise SystemExit(
            f"{path}: no hits of system {system!r} (has {sorted(k[5:] for k in data if k.startswith('hits_'))})"
        )
    return {k: data[k] for k in data.files}


def _keys(run: dict) -> list[tuple]:
    """Each row's pair and its occurrence number among equal pairs (a pair may be scored twice)."""
    cols = sorted(k for k in run if k.startswith("pair_"))
    seen: dict[tuple, int] = {}
    out = []
    for pair in zip(*(run[c].tolist() for c in cols)):
        seen[pair] = seen.get(pair, -1) + 1
        out.append((*pair, seen[pair]))
    return out


def common_pairs(a: dict, b: dict) -> tuple[dict, dict, int]:
    """Both runs restricted to the rows whose pair the other run scored too, in one order; ValueError when
    their weights on those rows are not proportional. -> (a, b, rows dropped from the two)."""
    ka, kb = _keys(a), _keys(b)
    shared = sorted(set(ka) & set(kb))
    if not shared:
        raise ValueError("the two runs scored no pair in common")

    def rows(keys: list[tuple]) -> np.ndarray:
        where = {k: i for i, k in enumerate(keys)}
        return np.array([where[k] for k in shared], dtype=np.int64)

    a2 = {k: np.asarray(v)[rows(ka)] for k, v in a.items()}
    b2 = {k: np.asarray(v)[rows(kb)] for k, v in b.items()}
    wa, wb = a2["weights"] / a2["weights"].sum(), b2["weights"] / b2["weights"].sum()
    if not np.allclose(wa, wb, rtol=1e-6, atol=0):
        raise ValueError("the pairs both runs scored carry different relative weights: not comparable")
    b2["weights"] = a2["weights"]
    return a2, b2, len(ka) + len(kb) - 2 * len(shared)


def compare_runs(a: dict, b: dict, system: str, n_boot: int) -> dict:
    """-> the JSON object of the module docstring; ValueError naming the array when the runs' pairs differ."""
    for key in sorted(k for k in a if k.startswith("pair_") or k in ("users", "weights")):
        if key not in b or not np.array_equal(a[key], b[key]):
            raise ValueError(f"the two runs scored different pairs ({key} differs): not comparable")
    w = a["weights"]
    boot = paired_bootstrap(a[f"hits_{system}"], b[f"hits_{system}"], a.get("users"), weights=w, n_boot=n_boot)
    mean = lambda h: float((h * w).sum() / w.sum())
    return {
        "system": system,
        "recall_a": mean(a[f"hits_{system}"]),
        "recall_b": mean(b[f"hits_{system}"]),
        **boot.to_json(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="hits.npz of run A")
    ap.add_argument("b", help="hits.npz of run B")
    ap.add_argument("--system", default="model")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--common-pairs", action="store_true", help="compare on the pairs both runs scored")
    args = ap.parse_args(argv)
    a, b = load(args.a, args.system), load(args.b, args.system)
    result = {"a": args.a, "b": args.b}
    if args.common_pairs:
        a, b, dropped = common_pairs(a, b)
        result |= {"common_pairs": len(a["weights"]), "dropped_rows": dropped}
    result |= compare_runs(a, b, args.system, args.n_boot)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
