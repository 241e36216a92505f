"""``make demo``: the built-in comparisons on the embedded digits data.

1. Dense, static, SET, SNFS, RigL and every other registered method that runs in the standard
   loop, at 90% and 98% sparsity, 3 seeds each, 100 epochs, two worker processes;
2. sparse execution where it pays: a wide MLP (64-2048-2048-10, 30 epochs, 2 seeds) trained
   dense, and with SET and RigL at 98% both masked and sparse-executed, so that the wall-time
   column shows the saving next to the FLOPs column;

then ``runs/demo/report.md`` with a table per setup and the plots. The same as::

    fastsparse compare --seeds 3 --out runs/demo
    fastsparse compare wide --out runs/demo
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .cli import err_console, main as cli_main

OUT = "runs/demo"
COMMANDS = (["compare", "--seeds", "3", "--out", OUT], ["compare", "wide", "--out", OUT])


def main(argv: list[str] | None = None) -> None:
    from .report import write_report
    from .suite import remember_skipped

    extra = list(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    for args in COMMANDS:
        try:
            cli_main(args + extra)
        except SystemExit as e:
            if e.code not in (0, None):
                raise
    command = "; ".join("fastsparse " + " ".join(args + extra) for args in COMMANDS)
    write_report(Path(OUT) / "runs", OUT, skipped=remember_skipped(OUT, {}), command=command)
    err_console.print(f"demo finished in {time.perf_counter() - start:.0f} s; the report is {OUT}/report.md")


if __name__ == "__main__":
    main()
