"""Where a file may be read from and written to (docs/design.md §8).

Every file netp reads is untrusted: a shard set travels between machines,
checkpoints and GGUFs come from anywhere. The rules kept here:
- names read from files (index entries, manifest names) are plain names
  inside their folder: no separator, no `..`, not absolute. The file they
  name may itself be a symlink (the Hugging Face cache links each snapshot
  file to its blob), so links are followed for the files a checkpoint
  names, never for names that lead elsewhere;
- FIFOs, devices and sockets are refused before they are opened (opening a
  FIFO blocks; /dev/zero never ends);
- JSON side files are read up to a size cap, and deep nesting is an error;
- an output is never written over, into or in place of an input.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Iterable

from netp.errors import NetpError

# Far above any real config.json / index / manifest (a 1000-tensor, 64-rank manifest is ~2 MB).
SIDE_JSON_CAP = 16 << 20
# tokenizer.json of the largest vocabularies is ~35 MB.
TOKENIZER_JSON_CAP = 128 << 20


def plain_name(name: Any, source: str | os.PathLike | None, what: str) -> str:
    """`name` if it is a plain file name (inside its folder), else a NetpError naming `source`."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name):
        raise NetpError(source, f"{what} {name!r:.80} is not a plain file name inside its folder "
                                "(no folders, '..' or absolute paths)")
    return name


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: str | os.PathLike, what: str = "a file") -> os.stat_result:
    """The stat of `path` (links followed) when it is a regular file; else a NetpError.
    Called before opening, so a FIFO or device is never read."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise NetpError(path, "no such file") from e
    except OSError as e:
        raise NetpError(path, f"cannot read it ({e.strerror})") from e
    if stat.S_ISDIR(st.st_mode):
        raise NetpError(path, f"is a directory, not {what}")
    if not stat.S_ISREG(st.st_mode):
        raise NetpError(path, f"is {_kind(st.st_mode)}, not {what}; netp reads regular files only")
    return st


def is_gguf(path: str | os.PathLike, what: str) -> bool:
    """Whether the regular file `path` (refused otherwise, `what` naming what it should be: a FIFO
    would block the read) starts with GGUF's magic."""
    regular_file(path, what)
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_capped(path: str | os.PathLike, cap: int, what: str = "a file") -> bytes:
    """The bytes of regular file `path`, refused when larger than `cap` (checked
    before and while reading: the file may grow)."""
    st = regular_file(path, what)
    if st.st_size > cap:
        raise NetpError(path, f"is {st.st_size} bytes, more than the {cap >> 20} MiB {what} may hold")
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as e:
        raise NetpError(path, f"cannot read it ({e.strerror})") from e
    if len(data) > cap:
        raise NetpError(path, f"grew past the {cap >> 20} MiB {what} may hold while being read")
    return data


def read_json(path: str | os.PathLike, cap: int = SIDE_JSON_CAP, what: str = "a JSON file") -> Any:
    """A JSON file read up to `cap` bytes, as UTF-8; every failure one NetpError naming it."""
    raw = read_capped(path, cap, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NetpError(path, "is not UTF-8 text (corrupt JSON)") from e
    return parse_json(path, text)


def parse_json(path: str | os.PathLike, text: str) -> Any:
    """JSON text parsed; a syntax error or too deep a nesting is one NetpError naming the file."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise NetpError(path, f"is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from e
    except RecursionError as e:
        raise NetpError(path, "is not usable JSON: nested too deeply") from e


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return _resolved(a) == _resolved(b)


def check_output_place(output: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                       what: str = "output") -> None:
    """Refuse an output that is an input, lies inside an input folder, or is a folder
    holding an input (replacing it would delete the input). Links are resolved."""
    out = _resolved(Path(output))
    for given in inputs:
        inp = Path(given)
        if not inp.exists():
            continue
        real = _resolved(inp)
        if _same(out, inp) if out.exists() else out == real:
            raise NetpError(output, f"is the input {given}; writing it would destroy the input: choose "
                                    f"another {what}")
        if inp.is_dir() and real in out.parents:
            raise NetpError(output, f"lies inside the input folder {given}; netp never writes into an "
                                    f"input: choose an {what} elsewhere")
        if out in real.parents:
            raise NetpError(output, f"holds the input {given}; replacing it would delete the input: "
                                    f"choose another {what}")


def refuse_indirect_dir(path: str | os.PathLike, what: str) -> None:
    """Refuse an output folder given through a symlink or with `..`/`.` as a component:
    where it lands is not what its name says (and `.` or `..` cannot be replaced)."""
    p = Path(path)
    if ".." in p.parts or p.name in ("", ".", ".."):
        raise NetpError(path, f"{what} must be named plainly (no '.' or '..' in its path)")
    if p.is_symlink():
        raise NetpError(path, f"{what} is a symlink; give the real folder")


__all__ = ["SIDE_JSON_CAP", "TOKENIZER_JSON_CAP", "plain_name", "regular_file", "read_capped",
           "read_json", "check_output_place", "refuse_indirect_dir"]
