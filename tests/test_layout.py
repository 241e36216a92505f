"""The package's layout: imports run downward only, module-level imports form no cycle, every
module imports first in a fresh interpreter, and no module is over 500 lines.

Layers, from the ground up: core (masks, distributions, scores, schedules) -> algorithms ->
engine -> recipes -> deploy -> experiments (config, runner, CLI) -> integrations (callbacks that
take an algorithm or a config) -> the package's flat API (``fastsparse/__init__.py``).
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fastsparse"
LAYERS = {"core": 0, "algorithms": 1, "engine": 2, "recipes": 3, "deploy": 4, "experiments": 5, "integrations": 6}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 7) if len(parts) > 1 else 7


def _imports(module: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported fastsparse module, at module level?, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    top |= {id(n) for stmt in tree.body if isinstance(stmt, (ast.If, ast.Try)) for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            targets = [name] + [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t in MODULES and t != module:
                found.append((t, id(node) in top, node.lineno))
                break
    return found


def test_imports_run_downward_only():
    upward = []
    for module, path in MODULES.items():
        for target, _, line in _imports(module, path):
            if _layer(target) > _layer(module):
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert upward == []


def test_module_level_imports_form_no_cycle():
    graph = {m: {t for t, at_top, _ in _imports(m, p) if at_top} for m, p in MODULES.items()}
    # a package imports its own submodules; a submodule importing its package's __init__ is the cycle to find
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1 and not t.startswith(m + "."):
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]) if t in stack else f"{m} -> {t}")
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    real = [c for c in cycles if not all(b.startswith(a + ".") or a.startswith(b + ".")
                                         for a, b in zip(c.split(" -> "), c.split(" -> ")[1:]))]
    assert real == []


def test_every_module_imports_first_in_a_fresh_interpreter():
    # torch is imported once; each module is then imported first in a forked child, where no
    # fastsparse module is loaded yet
    script = textwrap.dedent(f"""
        import importlib, os, sys, traceback
        import torch
        failed = []
        for name in {sorted(m for m in MODULES if m != "fastsparse.__main__")!r}:   # __main__ runs the CLI
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except ImportError as e:
                    if "fastai" in str(e) or "lightning" in str(e):   # an optional framework
                        os._exit(0)
                    traceback.print_exc()
                    os._exit(1)
                except Exception:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                failed.append(name)
        print("FAILED", failed)
        sys.exit(1 if failed else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_500_lines(module):
    assert len(MODULES[module].read_text().splitlines()) < 500


def test_no_hard_coded_cuda_calls():
    # a device comes from the config or the tensors, never `.cuda()`
    offenders = [f"{p.relative_to(ROOT.parent)}:{i}" for p in MODULES.values()
                 for i, line in enumerate(p.read_text().splitlines(), 1) if ".cuda()" in line]
    assert offenders == []
