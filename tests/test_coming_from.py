"""docs/coming-from.md and the tests agree: every row of its option tables names a test that
exists and mentions the option (their name or ours), and every seed system has its section."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "coming-from.md"
SYSTEMS = ("fastsparse 0.0.5", "Sup-tickets", "fasterai", "Cerebras", "Rare Gems")
_REF = re.compile(r"`?(tests/[\w/]+\.py)::(\w+)`?")


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def sections(path: Path) -> dict[str, list[list[str]]]:
    """{section title: table rows (cells)} for each ``## `` section of a markdown file."""
    out: dict[str, list[list[str]]] = {}
    title = None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            out[title] = []
        elif title is not None and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue                      # the separator row
            out[title].append(cells)
    return {t: rows[1:] for t, rows in out.items() if rows}   # rows[0] is the header


def _test_sources(file: Path) -> dict[str, str]:
    """{test function name: its source with decorators} of a test file."""
    text = file.read_text()
    lines = text.splitlines()
    out = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out[node.name] = "\n".join(lines[first - 1:node.end_lineno])
    return out


def check(path: Path | str) -> int:
    """Raise AssertionError listing every row whose test is missing or does not mention the option;
    return the number of rows checked."""
    path = Path(path)
    problems, n = [], 0
    cache: dict[Path, dict[str, str]] = {}
    for title, rows in sections(path).items():
        seen = set()
        for cells in rows:
            n += 1
            where = f"{path.name} § {title}, row {cells[0]!r}"
            if len(cells) < 3:
                problems.append(f"{where}: expected | their option | ours | test |")
                continue
            if cells[0] in seen:
                problems.append(f"{where}: listed twice")
            seen.add(cells[0])
            refs = _REF.findall(cells[-1])
            if not refs:
                problems.append(f"{where}: names no test (tests/test_x.py::test_name)")
            names = {_norm(t) for t in re.findall(r"`([^`]+)`", cells[0] + " " + cells[1])} - {""}
            names |= {_norm(cells[0])}
            mentioned = False
            for file, fn in refs:
                f = ROOT / file
                if f not in cache:
                    cache[f] = _test_sources(f) if f.is_file() else {}
                src = cache[f].get(fn)
                if src is None:
                    problems.append(f"{where}: {file}::{fn} does not exist")
                elif any(nm and nm in _norm(src) for nm in names):
                    mentioned = True
            if refs and not mentioned:
                problems.append(f"{where}: none of its tests mentions the option ({sorted(names)})")
    assert not problems, "\n".join(problems)
    return n


def test_every_row_names_a_test_that_exercises_it():
    assert check(DOC) > 100


def test_every_seed_system_has_a_section():
    titles = list(sections(DOC))
    for system in SYSTEMS:
        assert any(system.lower() in t.lower() for t in titles), f"no section for {system} in {titles}"


def test_the_checker_catches_a_row_without_a_test(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("## X\n\n| theirs | ours | test |\n|---|---|---|\n| `--foo` | `foo` | none |\n"
                   "| `--bar` | `bar` | `tests/test_coming_from.py::test_no_such_test` |\n")
    with pytest.raises(AssertionError) as e:
        check(doc)
    assert "names no test" in str(e.value) and "does not exist" in str(e.value)
