"""The documents' promises point at tests that exist; modules point readers only at files in the repository."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_REF = re.compile(r"`(test_\w+\.py)::(test_\w+)`")


def _defined_tests(path: Path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def _tested_rows(doc: Path) -> list[tuple[int, str]]:
    """(line number, row) of every body row of a table whose last header cell starts with 'test'."""
    rows, in_table = [], False
    for i, line in enumerate(doc.read_text().splitlines(), 1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if not cells:
            in_table = False
        elif not in_table and cells[-1].startswith("test"):
            in_table = True
        elif in_table and not set(line) <= set("|-: "):
            rows.append((i, line))
    return rows


def test_every_reliability_row_names_tests_that_exist():
    doc = ROOT / "docs" / "RELIABILITY.md"
    rows = _tested_rows(doc)
    assert len(rows) >= 60  # the tables are found at all
    problems = []
    for number, row in rows:
        refs = TEST_REF.findall(row.rstrip(" |").rsplit("|", 1)[-1])
        if not refs:
            problems.append(f"line {number}: no test named")
        for file, name in refs:
            path = ROOT / "tests" / file
            if not path.is_file() or name not in _defined_tests(path):
                problems.append(f"line {number}: {file}::{name} does not exist")
    assert not problems, "\n".join(problems)


def test_modules_point_only_at_files_in_the_repository():
    outside = re.compile(r"\.\./shared|DESIGN\.md|STYLE\.md|ACCURACY\.md")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "src").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if outside.search(line)]
    assert not hits, hits
