"""Checking a shard set against its manifest.

- `open_rank_file`: structure only (cheap, no data read): the rank file is
  an NE file whose header equals the manifest's hparams and whose tensors
  are exactly the ones the manifest gives this rank, in order, with the
  local shapes and types it says. The runtime and the shard stage use it.
- `check_shard_set` (`netp shard --check`): the above for every rank plus
  the size and sha256 of every file, hashed two files at a time (hashlib
  releases the GIL), reading into a reused buffer.
- `describe_shard_set`: the facts `netp inspect` shows for a shard set.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netp.errors import NetpError
from netp.formats.constants import TYPE_NAMES
from netp.formats.manifest import Manifest, load_manifest, local_nbytes
from netp.formats.ne import NEReader

_HASH_CHUNK = 8 << 20


def open_rank_file(folder: str | os.PathLike, manifest: Manifest, rank: int) -> NEReader:
    """Open rank `rank`'s file and check its structure against the manifest (no hashing)."""
    path = Path(folder) / manifest.ranks[rank].file
    reader = NEReader(path)
    try:
        expected_size = manifest.ranks[rank].size
        if reader.file_size != expected_size:
            raise NetpError(path, f"is {reader.file_size} bytes, the manifest says {expected_size}")
        header = dataclasses.asdict(reader.header)
        for name, value in manifest.hparams.items():
            if header[name] != value:
                raise NetpError(path, f"header field {name} is {header[name]}, the manifest says {value}")
        want = manifest.tensors_of(rank)
        got = list(reader.tensors.values())
        if [t.name for t in got] != [t.name for t in want]:
            missing = [t.name for t in want if t.name not in reader.tensors]
            extra = [t.name for t in got if t.name not in manifest.tensors or not manifest.tensors[t.name].held_by(rank)]
            what = f"lacks {missing[0]}" if missing else f"holds {extra[0]}" if extra else "has its tensors out of order"
            raise NetpError(path, f"does not match the manifest: {what}")
        for info, entry in zip(got, want):
            if TYPE_NAMES[info.ggml_type] != entry.type or info.shape != entry.local_shape(rank):
                raise NetpError(path, f"tensor {info.name} is {TYPE_NAMES[info.ggml_type]} {list(info.shape)}, "
                                      f"the manifest says {entry.type} {list(entry.local_shape(rank) or ())}")
    except BaseException:
        reader.close()
        raise
    return reader


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    name: str
    ok: bool
    problem: str = ""  # empty when ok


@dataclass(frozen=True)
class CheckReport:
    folder: Path
    manifest: Manifest
    files: list[FileCheck]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)

    def error(self) -> NetpError | None:
        """The first mismatch, as the one error line a check ends with (None when all match)."""
        bad = [f for f in self.files if not f.ok]
        if not bad:
            return None
        more = f" (and {len(bad) - 1} more mismatched files)" if len(bad) > 1 else ""
        return NetpError(self.folder / bad[0].name, f"{bad[0].problem}{more}")

    def lines(self) -> list[str]:
        out = [f"  {f.name}: {'ok' if f.ok else 'MISMATCH: ' + f.problem}" for f in self.files]
        bad = sum(not f.ok for f in self.files)
        verdict = "all checksums match" if not bad else f"{bad} of {len(self.files)} files do not match the manifest"
        return [f"{self.folder}/: {self.manifest.world_size} ranks, {self.manifest.architecture}, "
                f"from {self.manifest.source.name}"] + out + [verdict]


def _check_rank(folder: Path, manifest: Manifest, rank: int) -> FileCheck:
    entry = manifest.ranks[rank]
    path = folder / entry.file
    if not path.is_file():
        return FileCheck(entry.file, False, "missing")
    size = path.stat().st_size
    if size != entry.size:
        return FileCheck(entry.file, False, f"{size} bytes, the manifest says {entry.size}")
    digest = sha256_file(path)
    if digest != entry.sha256:
        return FileCheck(entry.file, False, f"sha256 mismatch: {digest[:16]}..., the manifest says "
                                            f"{entry.sha256[:16]}... (corrupt, or from another shard set)")
    try:
        open_rank_file(folder, manifest, rank).close()
    except NetpError as e:
        return FileCheck(entry.file, False, e.message)
    return FileCheck(entry.file, True)


def check_shard_set(folder: str | os.PathLike) -> CheckReport:
    """Re-hash every rank file and check it against the manifest (a bad manifest raises NetpError)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NetpError(folder, "no such folder" if not folder.exists() else "is not a folder (not a shard set)")
    manifest = load_manifest(folder)
    with ThreadPoolExecutor(max_workers=min(2, manifest.world_size)) as pool:
        files = list(pool.map(lambda r: _check_rank(folder, manifest, r), range(manifest.world_size)))
    if manifest.tokenizer is not None and not (folder / manifest.tokenizer).is_dir():
        files.append(FileCheck(manifest.tokenizer + "/", False, "tokenizer folder named by the manifest is missing"))
    return CheckReport(folder, manifest, files)


def describe_shard_set(folder: str | os.PathLike) -> dict[str, Any]:
    """What `netp inspect SHARDS` shows: the manifest's facts and a fresh checksum check."""
    from netp.inspect import _totals

    report = check_shard_set(folder)
    m = report.manifest
    tensors = []
    for t in m.tensors.values():
        stored = sum(local_nbytes(t, r) for r in range(m.world_size))
        if t.axis is None:
            where = t.split
        else:
            where = f"{t.split}@{t.axis} " + " ".join("-" if r is None else f"{r[0]}:{r[1]}" for r in t.ranges)
        tensors.append({"name": t.name, "type": t.type, "shape": list(t.shape), "nbytes": stored, "offset": where})
    summary = [f"world size: {m.world_size}   architecture: {m.architecture}   tokenizer: {m.tokenizer or 'none'}",
               f"source: {m.source.name} ({m.source.size} bytes, sha256 {m.source.sha256})",
               "rank files (the tensor table's last column is split@axis and per-rank [start:stop)):"]
    summary += report.lines()[1:]
    return {"kind": "shards", "path": str(report.folder), "file_size": sum(r.size for r in m.ranks),
            "manifest": m.to_json() | {"tensors": len(m.tensors)}, "summary_lines": summary,
            "tensors": tensors, "totals": _totals(tensors), "checksums_ok": report.ok,
            "check_error": None if (error := report.error()) is None else str(error)}
