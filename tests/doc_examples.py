"""Run the code blocks of docs/integrations.md marked ``<!-- example: name -->`` exactly as written."""
from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


README = Path(__file__).resolve().parents[1] / "README.md"


def example(name: str, doc: Path = DOC) -> str:
    """The source of the example block ``name`` of ``doc``."""
    found = re.search(rf"<!-- example: {re.escape(name)} -->\s*```python\n(.*?)```", doc.read_text(), re.S)
    if found is None:
        raise LookupError(f"{doc.name} has no example {name!r}")
    return found.group(1)


def run_example(name: str, namespace: dict | None = None, doc: Path = DOC) -> dict:
    """Execute the example in ``namespace`` (a fresh one by default) and return it."""
    namespace = {"__name__": f"example_{name}"} if namespace is None else namespace
    exec(compile(example(name, doc), f"{doc.name}[{name}]", "exec"), namespace)
    return namespace
