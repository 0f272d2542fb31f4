"""Crash-safe outputs: write under a recognisable temporary name, then rename.

Temporary names are `.<name>.netp-partial-<pid>` beside the target, so a
killed run leaves nothing under the output's name, and the next run that
writes the same target removes partials whose writer is no longer alive.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

PARTIAL_MARK = ".netp-partial-"


def partial_name(target: Path) -> Path:
    return target.with_name(f".{target.name}{PARTIAL_MARK}{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(target: Path) -> None:
    """Remove partial outputs for `target` left behind by dead writers."""
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        return
    prefix = f".{target.name}{PARTIAL_MARK}"
    for p in parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid = p.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace(tmp: Path, target: Path) -> None:
    """Move a finished temporary file or folder into place (replacing an old one)."""
    if target.is_dir() and not target.is_symlink() and tmp.is_dir():
        # os.replace cannot replace a non-empty directory: move the old one
        # aside first, so the target name never holds a half-written folder.
        old = target.with_name(f".{target.name}{PARTIAL_MARK}{os.getpid()}-old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent if str(target.parent) else Path("."))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `target` on success."""
    target = Path(target)
    clean_stale_partials(target)
    tmp = partial_name(target)
    remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace(tmp, target)
