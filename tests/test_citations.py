"""Each rule's docstring cites where it comes from; docs/index.md agrees.

The docstrings are the one source: the table "Where the rules come from" in
``docs/index.md`` must repeat, for every rule it names, a reference that is in
that rule's ``References`` section.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import agnosticopt

INDEX = Path(__file__).resolve().parents[1] / "docs" / "index.md"
HEADING = "### Where the rules come from"


def exported_rules() -> list[type]:
    """Every concrete Rule subclass exported by agnosticopt."""
    found = []
    for name in agnosticopt.__all__:
        obj = getattr(agnosticopt, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, agnosticopt.Rule)
            and obj is not agnosticopt.Rule
        ):
            found.append(obj)
    return found


def references(rule: type) -> str:
    """The ``References`` section of ``rule``'s docstring, whitespace collapsed."""
    doc = inspect.getdoc(rule) or ""
    match = re.search(
        r"^References\n-{10}\n(.*?)(?=^\w[\w ]*\n-{3,}\n|\Z)",
        doc,
        re.MULTILINE | re.DOTALL,
    )
    if match is None:
        return ""
    return " ".join(match.group(1).split())


def table_rows() -> list[tuple[list[str], str]]:
    """The (rule names, paper) rows of the docs/index.md table."""
    text = INDEX.read_text(encoding="utf-8")
    assert HEADING in text, f"{INDEX} lost its heading {HEADING!r}"
    block = text.split(HEADING, 1)[1].strip().split("\n\n", 1)[0]
    lines = block.splitlines()
    assert lines[0].startswith("| rule | paper |"), lines[0]
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 2, f"bad row in {INDEX}: {line!r}"
        rows.append((re.findall(r"`(\w+)`", cells[0]), " ".join(cells[1].split())))
    return rows


@pytest.mark.parametrize("rule", exported_rules(), ids=lambda rule: rule.__name__)
def test_rule_docstring_has_references(rule: type) -> None:
    assert references(rule), f"{rule.__name__}'s docstring has no References section"


def test_table_covers_rules_and_rows_are_nonempty() -> None:
    rows = table_rows()
    assert len(rows) >= 10
    named = [name for names, _ in rows for name in names]
    assert named, "the table names no rule"
    assert len(named) == len(set(named)), f"a rule appears twice: {named}"


@pytest.mark.parametrize(
    ("names", "paper"), table_rows(), ids=lambda row: str(row)[:30]
)
def test_table_row_is_in_the_docstring(names: list[str], paper: str) -> None:
    for name in names:
        rule = getattr(agnosticopt, name, None)
        assert rule is not None, f"docs/index.md names {name}, not exported"
        assert paper in references(rule), (
            f"docs/index.md cites {paper!r} for {name}; its docstring's"
            f" References section does not: {references(rule)!r}"
        )
