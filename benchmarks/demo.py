"""The guard of ``make demo``'s figures: run the demo in a scratch home, compare its last day's report with the
README's demo table, and say whether the model is ahead of co-occurrence, ALS and its PinSage-like
simplification on entity-entity.

    python benchmarks/demo.py                 # ~3-5 min on 2 cores: omnisage demo --days 3 --scale small
    python benchmarks/demo.py --report PATH   # check an existing recall.json instead of running the demo

Prints, per system, the run's entity-entity recall@10, the README's figure and the ratio model / system (the
anchor: each baseline in the same run); the last line is one JSON object ``{"wall_s", "model", "ratios",
"ahead_of", "behind", "readme_drift", "readme_matches"}``. Exit status 1 when the model is behind one of the
three or the README's table drifted from what the demo prints by more than ``--tolerance`` (training on CPU
threads is not bit-for-bit reproducible), so a regression of the defaults cannot pass silently.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The systems the model must lead on the demo (the issue's bar), in the report's names.
RIVALS = ("cooccurrence", "als", "pinsage")
#: README row labels -> report names.
README_NAMES = {
    "co-occurrence": "cooccurrence",
    "window co-occurrence": "window_cooccurrence",
    "PinSage-like": "pinsage",
}


def readme_table(readme: Path) -> dict[str, float | None]:
    """{system: entity-entity figure} of the README's demo table (the rows after its header)."""
    lines = readme.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| system | entity_entity |"))
    out: dict[str, float | None] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        label, value = [c.strip() for c in line.strip("|").split("|")][:2]
        name = "model" if label.startswith("model") else README_NAMES.get(label, label.lower())
        out[name] = None if value == "null" else float(value)
    return out


def run_demo(home: Path) -> tuple[Path, float]:
    env = {**os.environ, "OMNISAGE_HOME": str(home)}
    env.pop("DAGSTER_HOME", None)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "omnisage_pipeline.cli", "demo", "--days", "3", "--scale", "small"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    reports = sorted((home / "reports").glob("dt=*"))
    return reports[-1] / "recall.json", time.perf_counter() - t0


def entity_entity(report: dict) -> dict[str, float | None]:
    k = report.get("k", 10)
    rows = {"model": report["tasks"]["entity_entity"].get(f"recall@{k}")}
    rows |= {name: tasks["entity_entity"].get(f"recall@{k}") for name, tasks in report["baselines"].items()}
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", default=None, help="an existing recall.json (skip running the demo)")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--tolerance", type=float, default=0.01, help="largest |run - README| per figure")
    args = ap.parse_args(argv)
    wall = None
    if args.report:
        path = Path(args.report)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="omnisage-demo-"))
        path, wall = run_demo(scratch)
    ours, readme = entity_entity(json.loads(path.read_text())), readme_table(Path(args.readme))
    model = ours["model"] or 0.0
    ratios = {name: (model / v if v else None) for name, v in ours.items() if name != "model"}
    drift = {n: round(ours[n] - readme[n], 4) for n in ours if ours[n] is not None and readme.get(n) is not None}
    for name, value in ours.items():
        shown = "null" if value is None else f"{value:.4f}"
        ratio = "" if name == "model" or ratios[name] is None else f"  model / {name} = {ratios[name]:.3f}"
        print(f"{name:22s} {shown}  README {readme.get(name)}{ratio}")
    behind = [n for n in RIVALS if ours.get(n) is not None and model <= ours[n]]
    matches = set(readme) == set(ours) and all(abs(d) <= args.tolerance for d in drift.values())
    result = {
        "wall_s": None if wall is None else round(wall, 1),
        "model": model,
        "ratios": {n: round(r, 4) for n, r in ratios.items() if r is not None},
        "ahead_of": [n for n in RIVALS if n not in behind],
        "behind": behind,
        "readme_drift": drift,
        "readme_matches": matches,
    }
    print(json.dumps(result))
    return 0 if not behind and matches else 1


if __name__ == "__main__":
    sys.exit(main())
