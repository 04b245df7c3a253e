"""The rules every `zooter` command keeps, in one place: what `flows/cli.py` registers its commands through.

- results on stdout; everything else (logs, warnings, progress bars, Ray actors' output, errors) on stderr. While
  a command works, stdout -- `sys.stdout` and file descriptor 1, where C code, child processes and Ray's log
  monitor write -- points at stderr; the result goes to the original stdout at the end.
- `--json`: stdout is exactly one JSON document, also on failure (`{"error": {"message", "type", "exit_code"}}`).
- exit codes: 0 ok, 1 internal error (a bug: any exception that is not a ZooterError, traceback on stderr),
  2 bad input (a ZooterError: one `error:` line on stderr), 3 store unavailable (StoreUnavailable).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import typer
from pydantic_core import to_jsonable_python
from rich.console import Console
from rich.markup import escape

from schemas.errors import ZooterError

messages = Console(stderr=True)  # everything that is not a result
# set by `zooter`'s main(): the process ends with the command, so stdout stays pointed at stderr to the end (Ray's
# log monitor may print an actor's last lines after the command has returned)
OWNS_PROCESS = False


@dataclass(frozen=True)
class Result:
    """What a command hands back: `data` for --json (models, dicts, lists), `show` for a person."""

    data: Any
    show: Callable[[Console], None]


@contextlib.contextmanager
def stdout_to_stderr(restore: bool = True) -> Iterator[IO[str]]:
    """Point stdout at stderr (sys.stdout, and fd 1 when sys.stdout is fd 1); yields the original stdout."""
    original = sys.stdout
    original.flush()
    try:
        real = original.fileno() == 1  # a test runner's buffer has no file descriptor
    except (AttributeError, OSError, ValueError):
        real = False
    saved = os.dup(1) if real else None
    results = os.fdopen(os.dup(saved), "w", encoding="utf-8") if saved is not None else original
    if saved is not None:
        os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield results
    finally:
        results.flush()
        if restore:
            sys.stdout.flush()
            sys.stdout = original
            if saved is not None:
                results.close()
                os.dup2(saved, 1)
        if saved is not None:
            os.close(saved)


def _emit_json(stream: IO[str], data: Any) -> None:
    stream.write(json.dumps(to_jsonable_python(data, fallback=str)) + "\n")


def _results_console(stream: IO[str]) -> Console:
    # A terminal's own width, else (a file, a CI log) wide enough that a result line with a long path stays one
    # line; flows/report.py draws its tables within 100 columns either way.
    return Console(file=stream, width=None if stream.isatty() else 150)


def command(on: typer.Typer, name: str | None = None) -> Callable[[Callable[..., Result | None]], Any]:
    """Register a command that returns a Result (or None) under the stream, JSON and exit-code rules above."""
    def register(fn: Callable[..., Result | None]) -> Any:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> None:
            as_json = bool(kwargs.get("json_out"))
            with stdout_to_stderr(restore=not OWNS_PROCESS) as results:
                try:
                    result = fn(*args, **kwargs)
                except Exception as e:
                    user = isinstance(e, ZooterError)
                    # notes: e.g. `in stage generate <expert>` (cluster.stage): the line names the stage
                    notes = "".join(f" ({n})" for n in getattr(e, "__notes__", None) or [])
                    msg = " ".join(str(e).splitlines()) + notes if user else str(e)
                    if as_json:
                        _emit_json(results, {"error": {"message": msg, "type": type(e).__name__,
                                                       "exit_code": e.exit_code if user else 1}})
                    if not user:
                        raise  # a bug: typer prints the traceback and exits 1
                    # one line, printed verbatim: messages hold paths and lists in brackets, never Rich markup
                    messages.print(f"[red]error:[/red] {escape(msg)}", highlight=False, soft_wrap=True)
                    raise typer.Exit(e.exit_code) from None
                if result is not None:
                    if as_json:
                        _emit_json(results, result.data)
                    else:
                        result.show(_results_console(results))
        return on.command(name)(run)
    return register
