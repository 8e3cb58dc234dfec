"""The README and docs/ hold together: every relative link reaches a file, every #anchor a heading of it.

Anchors follow GitHub's heading slugs (lowercase, punctuation other than '-' and '_' dropped, spaces -> '-',
a repeated slug gets '-1', '-2', ...). The README stays a newcomer's page: at most 400 lines.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest


def _repo_root() -> Path:
    # Found by walking up, so the test keeps working wherever it sits under tests/.
    for folder in Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").is_file() and (folder / "README.md").is_file():
            return folder
    raise FileNotFoundError(f"no repository root (pyproject.toml + README.md) above {__file__}")


REPO = _repo_root()
README_MAX_LINES = 400

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (markdown emphasis and code marks are punctuation)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of a markdown file."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every relative link (code spans and fenced blocks are not links)."""
    found = []
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            target = match.group(1)
            if not _EXTERNAL.match(target):
                found.append((number, target))
    return found


def broken_links(path: Path) -> list[str]:
    """One message per relative link of a markdown file whose file or #anchor does not exist."""
    problems = []
    for number, target in links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no file {dest}")
        elif anchor and (dest.suffix != ".md" or unquote(anchor) not in anchors(dest)):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest}")
    return problems


def _documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(doc):
    assert not broken_links(doc), "\n".join(broken_links(doc))


def test_docs_exist_and_readme_links_every_one():
    docs = sorted((REPO / "docs").glob("*.md"))
    assert docs, "docs/ holds no markdown file"
    linked = {(REPO / t.partition("#")[0]).resolve() for _, t in links(REPO / "README.md")}
    assert not [d.name for d in docs if d.resolve() not in linked], "docs/ files the README does not link"


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("Data contract (v1)", "data-contract-v1"),
        ("Retention (`OMNISAGE_RETENTION_DAYS`)", "retention-omnisage_retention_days"),
        (
            "Serving (paper 1, 4.3): `ann_index`, `omnisage neighbors`, `omnisage serve`",
            "serving-paper-1-43-ann_index-omnisage-neighbors-omnisage-serve",
        ),
        (
            "History: exploratory, test-tuned results (not comparable)",
            "history-exploratory-test-tuned-results-not-comparable",
        ),
        ("Why **this** -- and that", "why-this----and-that"),
    ],
)
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected


def test_checker_reports_missing_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Same\n\n## Same\n\n```\n# not a heading\n```\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/a.md#title) [dup](docs/a.md#same-1) [self](#top) [web](https://example.com/x#y)\n"
        "`[code](missing.md)` [gone](docs/b.md) [bad anchor](docs/a.md#same-2) [fenced](docs/a.md#not-a-heading)\n"
        "\n## Top\n\n```\n[in a fence](nowhere.md)\n```\n"
    )
    problems = broken_links(readme)
    assert len(problems) == 3, problems
    assert "docs/b.md: no file" in problems[0]
    assert "#same-2" in problems[1] and "#not-a-heading" in problems[2]
