"""The error type every layer raises, and its one-line rendering.

A user error is a NetpError naming the file and the problem; `error_line`
renders any exception as the one line `<prog>: error: <file>: <what>`
(prefixed `[rank r]` under MPI). Printing it and exiting belong to the CLI
layer (netp.cliutil.report_errors), so this module sits at the floor.
"""
from __future__ import annotations

import os
import re

from netp.hostenv import env_rank, env_world_size


class NetpError(Exception):
    """A problem with an input or output the user can act on."""

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


def rank_prefix() -> str:
    """'[rank r] ' when running as one rank of several under MPI, else ''."""
    if env_world_size() > 1:
        return f"[rank {env_rank() or '?'}] "
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
