"""Paired comparison of two ``benchmarks/quality.py`` runs on the same data (e.g. paper Table 3's graph vs no
graph): entity-entity recall of one system in each run, the difference with a 95 % paired-bootstrap interval
over users (``ml.significance``; over pairs where the pairs carry no user).

    python benchmarks/quality.py --dataset synthetic --defaults --work /tmp/with
    python benchmarks/quality.py --dataset synthetic --defaults --no-graph --work /tmp/without
    python benchmarks/compare_runs.py /tmp/with/hits.npz /tmp/without/hits.npz --system model

The two runs must have scored the same pairs (same data, split and seeds of the evaluation sets): checked,
an error otherwise. Last line: one JSON object ``{"system", "a", "b", "recall_a", "recall_b", "diff", "ci95",
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
    args = ap.parse_args(argv)
    result = {
        "a": args.a,
        "b": args.b,
        **compare_runs(load(args.a, args.system), load(args.b, args.system), args.system, args.n_boot),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
