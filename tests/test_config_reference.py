"""The documentation stays true to the code: docs/configuration.md is what `gradfilter-ray config-reference`
generates from the config dataclasses, every field has its doc() text, every reject reason and scorer the code knows
is documented, every relative link in the Markdown documents resolves (to a file, and to a heading where it names
one), and no document cites issue numbers."""

from __future__ import annotations

import re
from pathlib import Path

from gradfilter_ray.cli import main
from gradfilter_ray.config import describe
from gradfilter_ray.config_reference import render
from gradfilter_ray.data.formats import REASONS
from gradfilter_ray.scoring.scorers import SCORERS

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [
        REPO / "README.md",
        REPO / "CHANGELOG.md",
        REPO / "benchmarks" / "README.md",
        REPO / "cluster" / "README.md",
        *(REPO / "docs").glob("*.md"),
    ]
)
# Saved by the report's screenshot step; the README links it before it exists on a fresh branch.
OPTIONAL_TARGETS = {REPO / "docs" / "images" / "report.png"}

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens and underscores dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8")))}


def test_committed_configuration_reference_is_the_generated_one():
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == render(), "docs/configuration.md is out of date: run `make docs`"


def test_cli_verb_prints_and_writes_the_reference(tmp_path, capsys):
    assert main(["config-reference"]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "configuration.md"
    assert main(["config-reference", "--output", str(out)]) == 0
    assert printed == out.read_text(encoding="utf-8") == render()


def test_every_config_field_is_documented_and_listed():
    listed: dict[str, set[str]] = {}
    section = None
    for line in render().splitlines():
        if heading := re.match(r"^#{2,3} (\S+)", line):
            section = "" if line == "## top level" else heading.group(1)
        elif row := re.match(r"^\| `(\w+)` \|", line):
            listed.setdefault(section, set()).add(row.group(1))
    fields = describe()
    sections = {dotted for dotted, _ in fields if any(other.startswith(dotted + ".") for other, _ in fields)}
    for dotted, doc in fields:
        assert doc.strip(), f"{dotted} has no doc() text"
        if dotted not in sections:
            parent, _, name = dotted.rpartition(".")
            assert name in listed.get(parent, set()), f"{dotted} is missing from its section's table"
    tables = sections | {""}
    assert sum(len(names) for section, names in listed.items() if section in tables) == len(fields) - len(sections)


def test_relative_links_in_the_documents_resolve():
    broken = []
    for doc in DOCUMENTS:
        for match in LINK.finditer(FENCE.sub("", doc.read_text(encoding="utf-8"))):
            target = match.group(1) or match.group(2)
            if re.match(r"^[a-z]+:", target):
                continue
            path_part, _, anchor = target.partition("#")
            path = (doc.parent / path_part).resolve() if path_part else doc
            if path in OPTIONAL_TARGETS and not path.exists():
                continue
            if not path.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_reject_reason_and_scorer_is_documented():
    inputs = (REPO / "docs" / "inputs.md").read_text(encoding="utf-8")
    method = (REPO / "docs" / "method.md").read_text(encoding="utf-8")
    assert [r for r in REASONS if f"`{r}`" not in inputs] == []
    assert [s for s in SCORERS if f"| `{s}` |" not in method] == []


def test_documents_cite_no_issue_numbers():
    configs = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    cited = [
        f"{path.relative_to(REPO)}: {m.group(0)}"
        for path in [*DOCUMENTS, *configs]
        for m in re.finditer(r"\bissues?\s*#?\d+|#\d+\b", path.read_text(encoding="utf-8"), re.IGNORECASE)
    ]
    assert not cited, "\n".join(cited)
