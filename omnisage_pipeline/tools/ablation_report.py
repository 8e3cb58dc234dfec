"""The results of an ablation: one row per variant, the directions against the paper, the tables.

Every number is recall@10 on the training day's held-out sets; a direction (+ / − / ≈) of a row against its
study's reference row is compared with the paper's. Ours counts only beyond ``NOISE_SE`` binomial standard
errors, the paper's only beyond ``PAPER_TOLERANCE`` relative (what the paper itself calls insignificant).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ml.config import TASK_NAMES
from omnisage_pipeline.tools.ablation_studies import EE_ALL, EE_ENGAGEMENT, TASK_SHORT, PaperRow, Study

#: Paper differences smaller than this (relative) are what the paper itself calls insignificant (Table 4:
#: "no significant gain", Table 13: -0.1% "insignificant").
PAPER_TOLERANCE = 0.01
#: Our difference counts only beyond this many standard errors (binomial, unpaired: conservative).
NOISE_SE = 2.0


@dataclass
class Row:
    """One row of a study's table: a variant, its run (or the run it shares) and its numbers."""

    study: str
    variant: str
    label: str
    run_key: str
    run_id: str = ""
    home: str = ""
    shared_with: str = ""  # "<study>/<variant>" whose run this row reuses
    recall: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> {"recall", "n"}
    train_seconds: float = 0.0
    data_seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    paper: str = ""
    directions: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""  # why the variant failed (its numbers are then missing)
    graph_entries: int = 0  # kept adjacency entries of the training day's pruned graph (Table 10's |E|)


def metric_label(metric: str) -> str:
    """The metric's column name in the tables (EE, EE eng., EF, UE)."""
    return "EE eng." if metric == EE_ENGAGEMENT else TASK_SHORT[metric]


def recall_by_metric(outcome) -> dict[str, dict[str, Any]]:
    """{metric: {"recall", "n"}} from a TrainingOutcome: the three tasks and the engagement-pair EE."""
    out = {t: dict(outcome.new_recall.get(t, {"recall": None, "n": 0})) for t in TASK_NAMES}
    ee = (outcome.evaluation or {}).get("new", {}).get("entity_entity", {})
    eng = ee.get("engagement") or {}
    out[EE_ENGAGEMENT] = {"recall": eng.get("recall"), "n": int(eng.get("n", 0) or 0)}
    return out


def _sign(d: float, tol: float) -> int:
    return 0 if abs(d) <= tol else (1 if d > 0 else -1)


def ours_sign(value: dict, ref: dict) -> int | None:
    """+1 / -1 when the difference exceeds NOISE_SE binomial standard errors, else 0; None if missing."""
    if value.get("recall") is None or ref.get("recall") is None or not value.get("n") or not ref.get("n"):
        return None
    p1, n1, p2, n2 = float(value["recall"]), int(value["n"]), float(ref["recall"]), int(ref["n"])
    # Laplace-smoothed proportions so 0/n and n/n still get a standard error
    q1, q2 = (p1 * n1 + 1) / (n1 + 2), (p2 * n2 + 1) / (n2 + 2)
    se = math.sqrt(q1 * (1 - q1) / n1 + q2 * (1 - q2) / n2)
    return _sign(p1 - p2, NOISE_SE * se)


def paper_sign(row: PaperRow | None, ref: PaperRow | None, task: str) -> int | None:
    """The paper's direction of ``row`` vs the reference row on ``task``: +1 / -1 beyond PAPER_TOLERANCE
    relative, else 0; None when the paper gives no number for it."""
    if row is None:
        return None
    if row.kind == "lift":
        if task not in row.values:
            return None
        return _sign(row.values[task], PAPER_TOLERANCE)
    if ref is None or task not in row.values or task not in ref.values:
        return None
    return _sign((row.values[task] - ref.values[task]) / ref.values[task], PAPER_TOLERANCE)


SYMBOL = {1: "+", -1: "−", 0: "≈", None: "?"}


def directions(study: Study, rows: list[Row]) -> None:
    """Fill every row's ``directions``: per compared metric, the paper's and our sign vs the reference."""
    ref_row = next(r for r in rows if r.variant == study.reference)
    ref_paper = study.variant(study.reference).paper
    for row in rows:
        if row.variant == study.reference:
            continue
        paper = study.variant(row.variant).paper
        for metric in study.compare:
            task = "entity_entity" if metric == EE_ENGAGEMENT else metric
            p = paper_sign(paper, ref_paper, task)
            o = ours_sign(row.recall.get(metric, {}), ref_row.recall.get(metric, {}))
            if p is None or o is None:
                continue
            agree = "same" if p == o else ("opposite" if p * o == -1 else "unresolved")
            row.directions[metric] = {"paper": p, "ours": o, "agree": agree}


def n_consistency(study: Study, rows: list[Row]) -> dict[str, Any]:
    """Per compared metric: the set of n over the variants that report it (must be one value)."""
    out = {}
    for metric in study.compare:
        reported = [r.recall.get(metric, {}) for r in rows]
        ns = sorted({int(rec.get("n", 0)) for rec in reported if rec.get("recall") is not None})
        out[metric] = {"n": ns, "consistent": len(ns) <= 1}
    return out


def fmt_recall(v: float | None) -> str:
    """A recall as the tables print it (a dash when missing)."""
    return "–" if v is None else f"{v:.3f}"


COLUMNS = (EE_ALL, EE_ENGAGEMENT, "entity_feature", "user_entity")


def study_markdown(study: Study, rows: list[Row], consistency: dict[str, Any]) -> str:
    """One study's table: our numbers beside the paper's, the directions, the n check and the notes."""
    lines = [f"## {study.title}", "", f"**Paper:** {study.statement}", ""]
    compared = ", ".join(metric_label(m) for m in study.compare)
    lines.append(f"Compared with the paper: {compared}, each variant against the reference row `{study.reference}`.")
    lines += [
        "",
        (
            "| variant | recall@10 EE | EE eng. | EF | UE | n (EE / eng. / EF / UE) | data s | train s "
            "| paper | direction vs reference: paper / ours |"
        ),
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        vals = [fmt_recall(r.recall.get(m, {}).get("recall")) for m in COLUMNS]
        ns = " / ".join(str(r.recall.get(m, {}).get("n", 0)) for m in COLUMNS)
        if r.variant == study.reference:
            dirs = "reference"
        elif not r.directions:
            dirs = "–"
        else:
            mark = {"same": "✓", "opposite": "✗", "unresolved": "~"}
            dirs = "; ".join(
                f"{metric_label(m)} {SYMBOL[d['paper']]} / {SYMBOL[d['ours']]} {mark[d['agree']]}"
                for m, d in r.directions.items()
            )
        label = r.label + (f" (same run as {r.shared_with})" if r.shared_with else "")
        data_s = f"{r.data_seconds:.1f}" if r.data_seconds else "–"
        lines.append(f"| {label} | {' | '.join(vals)} | {ns} | {data_s} | {r.train_seconds:.1f} | {r.paper} | {dirs} |")
    lines.append("")
    bad = {m: c["n"] for m, c in consistency.items() if not c["consistent"]}
    if bad:
        which = ", ".join(f"{metric_label(m)} {n}" for m, n in bad.items())
        lines.append(f"**n differs across variants** for {which}: these numbers are not on the same held-out set.")
    else:
        lines.append("Same held-out set for every compared number (n equal across variants).")
    notes = [f"`{r.variant}`: {n}" for r in rows for n in r.notes]
    if study.kind == "data":
        entries = ", ".join(f"`{r.variant}` {r.graph_entries:,}" for r in rows if r.graph_entries)
        notes.append(f"kept adjacency entries of the pruned graph: {entries}")
    notes += [f"`{r.variant}` **failed**: {r.error}" for r in rows if r.error and not r.shared_with]
    if study.note:
        notes.insert(0, study.note)
    for n in notes:
        lines.append(f"- {n}")
    agree = [d["agree"] for r in rows for d in r.directions.values()]
    if agree:
        lines.append(
            f"- Directions: {agree.count('same')} same, {agree.count('opposite')} opposite, "
            f"{agree.count('unresolved')} unresolved (one side within noise) of {len(agree)} compared."
        )
    return "\n".join(lines)


HOW_TO_READ = (
    "How to read: recall@10 on the held-out sets of the training day (4.2.1), against the whole negative "
    "pool. *EE* averages graph-neighbourhood and engagement pairs; *EE eng.* is engagement pairs only (the "
    "same pairs for every graph, so the graph studies compare it, as the paper does in 4.2.3). *paper* is the "
    "paper's row (absolute recall@10, or the lift over the reference row). *direction*: + / − / ≈ for the "
    "row vs the reference; ours counts only beyond "
    f"{NOISE_SE:g} binomial standard errors, the paper's only beyond {PAPER_TOLERANCE:.0%} relative; "
    "✓ same, ✗ opposite, ~ one side within noise. *train s*: wall seconds of the optimizer steps."
)


def report_markdown(summary: dict, sections: list[str]) -> str:
    """ablations.md: the run's summary, how to read the tables, then one section per study."""
    s = summary
    head = [
        f"# OmniSage ablations ({s['stamp']})",
        "",
        (
            f"- data: `{s['scale']}` synthetic, {len(s['days'])} days ({s['days'][0]} .. {s['days'][-1]}), "
            f"trained and evaluated on dt={s['days'][-1]}; input {s['data_root']}"
        ),
        (
            f"- training: {s['steps']} steps, batch {s['batch_size']}, {s['negatives']} random negatives (outside the "
            f"negatives study), seed {s['seed']}, preset {s['preset']}, device {s['device']}; engine {s['engine']}"
        ),
        f"- neighbourhood layout (subset:node_type:k_t): {', '.join(s['layout'])}"
        + (" (--blocks; the graph_snapshot default is the paper's 25/75/50)" if s.get("blocks") else " (the default)"),
        (
            f"- universe: {s['universe'].get('pin', 0)} pins, {s['universe'].get('board', 0)} boards; MLflow experiment "
            f"`{s['experiment']}`, parent run `{s['parent_run_id']}`"
        ),
        f"- {s['unique_runs']} trained runs for {s['rows']} rows; wall time {s['wall_seconds']:.0f} s"
        + (f"; **{len(s['failed'])} failed**" if s.get("failed") else ""),
        "",
        HOW_TO_READ,
    ]
    return "\n".join(head + [""] + [sec + "\n" for sec in sections]).rstrip() + "\n"


def study_sections(rows_by_study) -> tuple[list[str], list[dict]]:
    """(markdown section, ablations.json entry) of every study, in order."""
    sections, studies_json = [], []
    for study, rows in rows_by_study:
        consistency = n_consistency(study, rows)
        sections.append(study_markdown(study, rows, consistency))
        studies_json.append(
            {
                "id": study.id,
                "title": study.title,
                "paper": study.statement,
                "reference": study.reference,
                "compare": list(study.compare),
                "n_consistency": consistency,
                "variants": [dataclasses.asdict(r) for r in rows],
            }
        )
    return sections, studies_json
