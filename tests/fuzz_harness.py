"""Seeded fuzzing of every stage's inputs (issue 17).

Each case mutates a valid input (truncation at a section boundary or at a
random point, or random byte flips in the header region), runs one stage's
command in-process, and classifies the outcome:
- "ok": exit 0 (the mutation hit bytes the stage does not depend on, e.g. a
  tensor's data), and the output, if any, is present and complete;
- "error": non-zero exit with exactly one stderr line `<prog>: error: ...`
  that is not an "internal error", and nothing left under the output name.
Anything else — a traceback, a multi-line or internal error, a half-written
output, a case that runs past its time limit or allocates far more memory
than its input needs — is a failure.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import re
import resource
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ERROR_LINE = re.compile(r"^(\[rank \d+\] )?[\w.\- ]+: error: .+$")


@dataclass
class Outcome:
    kind: str  # ok | error | FAIL
    detail: str = ""


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):  # pragma: no cover - only on a hang
    raise CaseTimeout()


MAX_CASE_GROWTH = 512 << 20  # bytes of peak-RSS growth one case may cause (the inputs are ~100 KB)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_command(command, args: list[str], prog: str, timeout: int = 20) -> tuple[int, str, str]:
    """Run a click command's main in-process; return (exit code, stdout, stderr).
    A case that raises the process's peak RSS by more than MAX_CASE_GROWTH is a
    failure: a corrupt header must be refused before any large allocation."""
    peak = _peak_rss()
    code, out, err = _run(command, args, prog, timeout)
    grown = _peak_rss() - peak
    if grown > MAX_CASE_GROWTH:
        return -997, out, f"peak RSS grew by {grown >> 20} MB; stderr: {err}"
    return code, out, err


def _run(command, args: list[str], prog: str, timeout: int) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                command.main(args=args, prog_name=prog)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except CaseTimeout:
        return -999, out.getvalue(), "timed out"
    except BaseException as e:  # an exception escaping the command is a failure
        import traceback

        return -998, out.getvalue(), "".join(traceback.format_exception(e))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, out.getvalue(), err.getvalue()


def classify(code: int, stderr: str, output: Path | None, output_ok: Callable[[Path], bool] | None) -> Outcome:
    lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith("WARNING")]
    if code == 0:
        if output is not None and output_ok is not None and not output_ok(output):
            return Outcome("FAIL", f"exit 0 but output {output} is missing or invalid")
        return Outcome("ok")
    if code < 0:
        return Outcome("FAIL", stderr[-2000:])
    if len(lines) != 1 or not ERROR_LINE.match(lines[0]) or "internal error" in lines[0] or "Traceback" in stderr:
        return Outcome("FAIL", f"exit {code}, stderr: {stderr[-2000:]!r}")
    if output is not None and output.exists():
        return Outcome("FAIL", f"error exit but output {output} exists: {lines[0]}")
    leftovers = [p.name for p in (output.parent.iterdir() if output is not None and output.parent.exists() else [])
                 if ".netp-partial-" in p.name]
    if leftovers:
        return Outcome("FAIL", f"error exit left partial files {leftovers}")
    return Outcome("error", lines[0])


def truncation_points(data_len: int, boundaries: list[int], rng: random.Random, n_random: int) -> list[int]:
    points = {b for b in boundaries if 0 <= b < data_len}
    points |= {max(0, b - 1) for b in boundaries if 0 < b < data_len}
    points |= {rng.randrange(data_len) for _ in range(n_random)}
    return sorted(points)


def flip_bytes(data: bytes, region: int, rng: random.Random, n_flips: int) -> bytes:
    buf = bytearray(data)
    for _ in range(n_flips):
        i = rng.randrange(min(region, len(buf)))
        buf[i] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
    return bytes(buf)
