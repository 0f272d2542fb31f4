"""One error convention for every entry point.

A user error is a NetpError naming the file and the problem. Entry points
wrap their work in `report_errors`, which prints exactly one line
`<prog>: error: <file>: <what>` (prefixed `[rank r]` under MPI), exits
non-zero, and shows a traceback only with --debug.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Iterator, NoReturn


class NetpError(Exception):
    """A problem with an input or output the user can act on."""

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


def rank_prefix() -> str:
    """'[rank r] ' when running as one rank of several under MPI, else ''."""
    # The launchers export these; reading them avoids importing mpi4py just to
    # print an error.
    for size_var, rank_var in (("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")):
        if int(os.environ.get(size_var, "1") or 1) > 1:
            return f"[rank {os.environ.get(rank_var, '?')}] "
    return ""


def error_line(prog: str, exc: BaseException) -> str:
    if isinstance(exc, NetpError):
        what = str(exc)
    elif isinstance(exc, OSError) and exc.filename is not None:
        what = f"{exc.filename}: {exc.strerror or exc}"
    elif isinstance(exc, MemoryError):
        what = "out of memory"
    else:
        what = f"internal error: {type(exc).__name__}: {exc}"
    what = re.sub(r"\s*\n\s*", " ", what.strip())  # one line, whatever a library put in its message
    return f"{rank_prefix()}{prog}: error: {what}"


def fail(prog: str, exc: BaseException, debug: bool = False) -> NoReturn:
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(error_line(prog, exc), file=sys.stderr, flush=True)
    raise SystemExit(1)


@contextlib.contextmanager
def report_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn any exception escaping the block into the one-line error and exit 1."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure ends in one line
        fail(prog, exc, debug)


def prog_name(argv0: str | None = None) -> str:
    return Path(argv0 or sys.argv[0]).name
