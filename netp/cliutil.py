"""Shared click plumbing: one-line errors, --debug/--quiet, progress bars.

The CLI layer: it prints netp.errors' one-line rendering and exits; stages
raise NetpError and report progress through callbacks.

Stage commands live in <stage>/cli.py, import only click and this module at
the top (heavy imports go inside the command), and run their work inside
`run_reporting`, so every entry point answers a bad input with one line
`<prog>: error: <file>: <what>` and a non-zero exit.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, NoReturn, TypeVar

import click

from netp.errors import NetpError, error_line, rank_prefix

F = TypeVar("F", bound=Callable[..., Any])


def said_by_another_rank(exc: BaseException | None = None) -> bool:
    """Under MPI, whether this rank keeps quiet about an error every rank meets alike:
    one about the command line (a NetpError naming no file, a usage error) is the same
    on every rank, so rank 0 alone prints it (one line per failure, docs/design.md §8)."""
    from netp.hostenv import env_rank, env_world_size

    alike = exc is None or (isinstance(exc, NetpError) and exc.path is None)
    return alike and env_world_size() > 1 and env_rank() not in (None, "0")


def fail(prog: str, exc: BaseException, debug: bool = False, input_status: int = 1) -> NoReturn:
    """Print exc as the one error line (after its traceback with --debug) and exit 1,
    or `input_status` when exc is a NetpError (a bad input)."""
    status = input_status if isinstance(exc, NetpError) else 1
    if said_by_another_rank(exc):
        raise SystemExit(status)
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(error_line(prog, exc), file=sys.stderr, flush=True)
    raise SystemExit(status)


@contextlib.contextmanager
def report_errors(prog: str, debug: bool = False, input_status: int = 1) -> Iterator[None]:
    """Turn any exception escaping the block into the one-line error and exit 1
    (`input_status` for a NetpError)."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        raise
    except BrokenPipeError:
        stdout_closed()
    except BaseException as exc:  # noqa: BLE001 - every failure ends in one line
        fail(prog, exc, debug, input_status)


def stdout_closed() -> NoReturn:
    """The reader of stdout went away (`ne-run ... | head -1`): end quietly, as cat does.
    stdout goes to /dev/null first, so the interpreter's final flush cannot complain."""
    import os

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(141)  # 128 + SIGPIPE, what a shell reports for a writer killed by the pipe


class OneLineErrors(click.Command):
    """Base of netp's click commands and groups: usage errors become one line."""

    def main(self, args: Any = None, prog_name: str | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        prog = prog_name or self.name or "netp"
        try:
            rv = super().main(args=args, prog_name=prog, **kwargs)
        except click.exceptions.Exit as e:
            raise SystemExit(e.exit_code) from None
        except click.Abort:
            print(f"{rank_prefix()}{prog}: error: aborted", file=sys.stderr)
            raise SystemExit(1) from None
        except click.UsageError as e:
            command = e.ctx.command if e.ctx is not None else self
            hint = getattr(command, "usage_hint", None)
            text = hint(e) if hint else e.format_message()
            # The command that refused the arguments: `netp convert`, not `netp`,
            # so its --help is the one that lists the flag that was wrong.
            where = e.ctx.command_path if e.ctx is not None else prog
            if said_by_another_rank():
                raise SystemExit(2) from None
            print(f"{rank_prefix()}{where}: error: {text} (see {where} --help)", file=sys.stderr)
            raise SystemExit(2) from None
        if isinstance(rv, int) and rv:
            raise SystemExit(rv)
        return rv


class NetpCommand(OneLineErrors):
    """A stage command. Subclasses may override `usage_hint` to add a corrected line."""

    def usage_hint(self, e: click.UsageError) -> str:
        return e.format_message()


def common_options(f: F) -> F:
    """--debug (tracebacks) and --quiet (no progress bars)."""
    f = click.option("--debug", is_flag=True, help="Show a full traceback on errors.")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bars or informational output.")(f)
    return f


def run_reporting(prog: str, debug: bool, fn: Callable[..., Any], *args: Any, input_status: int = 1,
                  **kwargs: Any) -> Any:
    """Call fn, turning any failure into the one-line error and exit 1 (`input_status` for a NetpError)."""
    with report_errors(prog, debug, input_status):
        return fn(*args, **kwargs)


@contextlib.contextmanager
def progress_bar(desc: str, *, unit: str = "B", quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A stage's progress callback `(units just done, total units)` drawn as a tqdm
    bar on a terminal; silent when stderr is not a terminal or with --quiet. The
    bar opens on the first call, when the stage knows its total."""
    from tqdm import tqdm

    bar = None

    def update(n: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", dynamic_ncols=True, leave=False,
                       disable=quiet or not sys.stderr.isatty())
        bar.update(n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


__all__ = ["OneLineErrors", "NetpCommand", "common_options", "run_reporting", "progress_bar", "fail", "report_errors"]
