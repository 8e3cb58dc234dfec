"""benchmarks/demo.py: the guard of make demo's figures (README table vs the run, model ahead or not)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "demo.py"
_spec = importlib.util.spec_from_file_location("demo_guard", _PATH)
demo_guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_guard)

README = """intro

| system | entity_entity | entity_feature | user_entity |
| --- | --- | --- | --- |
| model (300 CPU steps) | {model} | 0.0010 | 0.0485 |
| co-occurrence | 0.0511 | null | 0.1456 |
| EASE | null | null | null |
| ALS | 0.0981 | null | 0.2039 |
| PinSage-like | 0.0971 | null | null |

after the table
"""


def _files(tmp_path: Path, model_run: float, model_readme: str) -> list[str]:
    entry = lambda r: {"entity_entity": {"recall@10": r, "n": 10}}
    report = {
        "k": 10,
        "tasks": entry(model_run),
        "baselines": {
            "cooccurrence": entry(0.0511),
            "ease": entry(None),
            "als": entry(0.0981),
            "pinsage": entry(0.0971),
        },
    }
    (tmp_path / "recall.json").write_text(json.dumps(report))
    (tmp_path / "README.md").write_text(README.format(model=model_readme))
    return ["--report", str(tmp_path / "recall.json"), "--readme", str(tmp_path / "README.md")]


def test_the_readme_table_is_read_by_report_names(tmp_path):
    _files(tmp_path, 0.1, "0.1000")
    table = demo_guard.readme_table(tmp_path / "README.md")
    assert table == {"model": 0.1, "cooccurrence": 0.0511, "ease": None, "als": 0.0981, "pinsage": 0.0971}


def test_the_guard_passes_only_when_the_model_leads_and_the_readme_is_what_the_demo_prints(tmp_path, capsys):
    assert demo_guard.main(_files(tmp_path, 0.1, "0.1000")) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["behind"] == [] and last["readme_matches"] and last["ratios"]["als"] > 1
    # a regression of the defaults: the model behind ALS and PinSage-like, even with a matching README
    assert demo_guard.main(_files(tmp_path, 0.09, "0.0900")) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["behind"] == ["als", "pinsage"]
    # a stale README: the run leads, but the table shows other figures
    assert demo_guard.main(_files(tmp_path, 0.1, "0.1370")) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["readme_drift"]["model"] < -0.03
