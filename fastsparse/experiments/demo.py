"""``make demo``: the built-in comparison on the embedded digits data.

Dense, static, SET, SNFS, RigL and every other registered method that runs in the standard
loop, at 90% and 98% sparsity, 3 seeds each, 100 epochs, two worker processes; then
``runs/demo/report.md`` with the table and the plots. The same as::

    fastsparse compare --seeds 3 --out runs/demo
"""
from __future__ import annotations

import sys
import time

from .cli import err_console, main as cli_main


def main(argv: list[str] | None = None) -> None:
    args = ["compare", "--seeds", "3", "--out", "runs/demo"] + list(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    try:
        cli_main(args)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    err_console.print(f"demo finished in {time.perf_counter() - start:.0f} s; the report is runs/demo/report.md")


if __name__ == "__main__":
    main()
