"""Crash-safe outputs: write under a recognisable temporary name, then rename.

Temporary names are `.<name>.netp-partial-<pid>` beside the target, so a
killed run leaves nothing under the output's name, and the next run that
writes the same target removes partials whose writer is no longer alive.
A write that fails (a full disk...) is a NetpError naming the output, and
its temporary is removed (docs/design.md §8).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from netp.errors import NetpError

PARTIAL_MARK = ".netp-partial-"
# Failures of the output's disk, not of an input: reported against the output.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)


def write_error(target: str | os.PathLike, e: OSError) -> NetpError:
    """A failed write as a one-line error naming the output being written."""
    return NetpError(target, f"cannot write it: {e.strerror or e}")


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


def write_file(target: str | os.PathLike, data: bytes) -> Path:
    """Write `data` as file `target`: under a temporary name, synced, then renamed into place,
    so `target` is either absent (or its old self) or complete. A failed write is a NetpError
    naming `target`."""
    target = Path(target)
    clean_stale_partials(target)
    tmp = partial_name(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(target, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def claim(tmp: Path, target: Path) -> None:
    """Rename finished folder `tmp` to `target` only if `target` is absent or an
    empty folder, in one rename(2): a folder another run filled meanwhile is
    never replaced (rename fails with ENOTEMPTY/EEXIST)."""
    try:
        os.rename(tmp, target)
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise NetpError(target, "exists and is not a folder") from e
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise NetpError(target, "was filled by someone else while this run wrote it (another run "
                                    "into the same folder?); nothing was replaced") from e
        raise
    fsync_dir(target.parent if str(target.parent) else Path("."))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, may_replace: Callable[[Path], None] | bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `target` on success.

    may_replace: True replaces an existing `target`; False renames only onto an
    absent or empty `target` (see `claim`); a callable is called on an existing,
    non-empty `target` just before it is replaced, to refuse it by raising."""
    target = Path(target)
    clean_stale_partials(target)
    tmp = partial_name(target)
    remove(tmp)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise write_error(target, e) from e
    try:
        yield tmp
        if may_replace is False or not (target.is_dir() and any(target.iterdir())):
            claim(tmp, target)
            return
        if callable(may_replace):
            may_replace(target)
        replace(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None or e.errno in WRITE_ERRNOS:
            raise write_error(target, e) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
