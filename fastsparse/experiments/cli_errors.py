"""What the command line prints when something goes wrong: one line per problem (what was wrong,
what is allowed), a non-zero exit status, never a traceback.

Exit status: 2 for a problem with the input (a config, a file, a folder, a checkpoint), 1 when
the run itself fails (no space left, a disagreement between ranks, out of memory, an internal
error), 130 when interrupted. Each known error type has its own line; the last resort turns
anything unexpected into ``internal error: <type>: <message>; please report it``.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["err_console", "fail", "message_of", "one_line_errors", "REPORT"]

err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
REPORT = "please report it, with the command line that caused it"


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` (each line unwrapped, however long) and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0][:300] if lines else ""


def message_of(e: BaseException) -> tuple[str, int]:
    """(the line to print, the exit status) for an exception raised by a command."""
    from ..deploy.format import SparseFileError
    from ..engine.distributed import MaskDisagreement
    from .checkpoint import ResumeError
    from .config import ConfigError
    from .convert import ConversionError
    from .imagefolder import UnreadableImage
    from .rundir import RunFolderBlocked, RunFolderError

    if isinstance(e, ConfigError):
        if len(e.problems) == 1:
            return (f"{e.source}: {e.problems[0]}" if e.source else str(e.problems[0])), 2
        return str(e), 2
    if isinstance(e, (ResumeError, RunFolderBlocked, SparseFileError, ConversionError, UnreadableImage)):
        return str(e), 2
    if isinstance(e, (RunFolderError, MaskDisagreement)):
        return str(e), 1
    if isinstance(e, MemoryError):
        return f"out of memory ({_first_line(e) or 'MemoryError'}): use a smaller batch_size or model", 1
    if isinstance(e, FileNotFoundError):
        return f"no such file or folder: {e.filename or _first_line(e)}", 2
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or _first_line(e) or type(e).__name__}{where}", 1
    if isinstance(e, RuntimeError) and any(w in str(e).lower() for w in ("out of memory", "can't allocate memory")):
        return f"out of memory ({_first_line(e)}): use a smaller batch_size or model", 1
    return f"internal error: {type(e).__name__}: {_first_line(e)}; {REPORT}", 1


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; turn any exception into one line and an exit status (typer's own exits pass)."""
    @functools.wraps(command)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the last resort: a line, never a traceback
            import click

            if isinstance(e, click.exceptions.ClickException):
                raise
            message, code = message_of(e)
            fail(message, code)
    return guarded
