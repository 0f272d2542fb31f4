"""Checking a shard set against its manifest.

- `load_shard_manifest`: the manifest, validated, naming an architecture
  this netp knows.
- `open_rank_file`: the one rank-file validator (cheap, no data hashed):
  the file is there, has the manifest's size, and is an NE file whose
  header equals the manifest's hparams and whose tensors are exactly the
  ones the manifest gives this rank, in order, with the local shapes and
  types it says. The shard stage, `shard --check`, `netp inspect` and the
  runtime all use it.
- `tokenizer_file`: one file of the tokenizer folder, checked against the
  manifest's size and sha256 before anything reads it (docs/design.md §8).
- `check_shard_set` (`netp shard --check`): the above for every rank plus
  the sha256 of every file, hashed two files at a time (hashlib releases
  the GIL), reading into a reused buffer; and every tokenizer file.
"""
from __future__ import annotations

import dataclasses
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from netp.errors import NetpError
from netp.formats.constants import TYPE_NAMES
from netp.formats.manifest import Manifest, RankFile, load_manifest
from netp.formats.names import MANIFEST_NAME
from netp.formats.ne import NEReader
from netp.models import architecture_names
from netp.shard.hashing import sha256_file


def load_shard_manifest(folder: str | os.PathLike) -> Manifest:
    """`folder/manifest.json`, validated, refusing an architecture this netp does not know."""
    return load_manifest(folder, architecture_names())


def open_rank_file(folder: str | os.PathLike, manifest: Manifest, rank: int) -> NEReader:
    """Open rank `rank`'s file and check it against the manifest (no hashing)."""
    entry = manifest.ranks[rank]
    path = Path(folder) / entry.file
    if not path.is_file():
        raise NetpError(path, f"rank file of rank {rank} is missing")
    size = path.stat().st_size
    if size != entry.size:
        raise NetpError(path, f"is {size} bytes, the manifest says {entry.size} (truncated or replaced?)")
    reader = NEReader(path)
    try:
        _check_header(reader, manifest)
        _check_tensors(reader, manifest, rank)
    except BaseException:
        reader.close()
        raise
    return reader


def _check_header(reader: NEReader, manifest: Manifest) -> None:
    header = dataclasses.asdict(reader.header)
    for name, value in manifest.hparams.items():
        if header[name] != value:
            raise NetpError(reader.path, f"header field {name} is {header[name]}, the manifest says {value}")


def _check_tensors(reader: NEReader, manifest: Manifest, rank: int) -> None:
    want = manifest.tensors_of(rank)
    got = list(reader.tensors.values())
    if [t.name for t in got] != [t.name for t in want]:
        missing = [t.name for t in want if t.name not in reader.tensors]
        extra = [t.name for t in got if t.name not in manifest.tensors or not manifest.tensors[t.name].held_by(rank)]
        what = f"lacks {missing[0]}" if missing else f"holds {extra[0]}" if extra else "has its tensors out of order"
        raise NetpError(reader.path, f"does not match the manifest: {what}")
    for info, entry in zip(got, want):
        if TYPE_NAMES[info.ggml_type] != entry.type or info.shape != entry.local_shape(rank):
            raise NetpError(reader.path, f"tensor {info.name} is {TYPE_NAMES[info.ggml_type]} {list(info.shape)}, "
                                         f"the manifest says {entry.type} {list(entry.local_shape(rank) or ())}")


def _tokenizer_problem(folder: Path, manifest: Manifest, entry: RankFile) -> str:
    """What is wrong with one listed tokenizer file ('' when it matches)."""
    path = folder / str(manifest.tokenizer) / entry.file
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    if not stat.S_ISREG(st.st_mode):
        return "is a symlink or special file, not the regular file the manifest lists"
    if st.st_size != entry.size:
        return f"is {st.st_size} bytes, the manifest says {entry.size} (replaced?)"
    digest = sha256_file(path)
    if digest != entry.sha256:
        return f"sha256 mismatch: {digest[:16]}..., the manifest says {entry.sha256[:16]}... (replaced?)"
    return ""


def tokenizer_file(folder: str | os.PathLike, manifest: Manifest, name: str) -> Path:
    """Path of tokenizer file `name` of a shard set, after checking it is the one the
    manifest lists (size, sha256, a regular file); NetpError otherwise."""
    folder = Path(folder)
    entry = next((f for f in manifest.tokenizer_files if f.file == name), None)
    if manifest.tokenizer is None or entry is None:
        raise NetpError(folder / MANIFEST_NAME, f"lists no tokenizer file {name}")
    path = folder / manifest.tokenizer / name
    problem = _tokenizer_problem(folder, manifest, entry)
    if problem:
        raise NetpError(path, problem)
    return path


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
    try:
        open_rank_file(folder, manifest, rank).close()
    except NetpError as e:
        return FileCheck(entry.file, False, e.message)
    digest = sha256_file(path)
    if digest != entry.sha256:
        return FileCheck(entry.file, False, f"sha256 mismatch: {digest[:16]}..., the manifest says "
                                            f"{entry.sha256[:16]}... (corrupt, or from another shard set)")
    return FileCheck(entry.file, True)


def check_shard_set(folder: str | os.PathLike) -> CheckReport:
    """Re-hash every rank file and check it against the manifest (a bad manifest raises NetpError)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NetpError(folder, "no such folder" if not folder.exists() else "is not a folder (not a shard set)")
    manifest = load_shard_manifest(folder)
    with ThreadPoolExecutor(max_workers=min(2, manifest.world_size)) as pool:
        files = list(pool.map(lambda r: _check_rank(folder, manifest, r), range(manifest.world_size)))
    if manifest.tokenizer is not None and not (folder / manifest.tokenizer).is_dir():
        files.append(FileCheck(manifest.tokenizer + "/", False, "tokenizer folder named by the manifest is missing"))
    elif manifest.tokenizer is not None:
        for entry in manifest.tokenizer_files:
            problem = _tokenizer_problem(folder, manifest, entry)
            files.append(FileCheck(f"{manifest.tokenizer}/{entry.file}", not problem, problem))
        listed = {f.file for f in manifest.tokenizer_files}
        for extra in sorted(p.name for p in (folder / manifest.tokenizer).iterdir() if p.name not in listed):
            files.append(FileCheck(f"{manifest.tokenizer}/{extra}", False, "not listed by the manifest"))
    return CheckReport(folder, manifest, files)
