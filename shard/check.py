"""`netp shard --check`: every file of a shard set against its manifest.

`check_shard_set` runs the rank-file validator (netp.formats.shardset) for
every rank plus the sha256 of every file, hashed two files at a time
(hashlib releases the GIL), reading into a reused buffer; and every
tokenizer file, with nothing unlisted beside them.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from netp.errors import NetpError
from netp.formats.fileio import sha256_file
from netp.formats.manifest import Manifest
from netp.formats.shardset import ShardSet
from netp.models import architecture_names


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


def _check_rank(shards: ShardSet, rank: int) -> FileCheck:
    entry = shards.manifest.ranks[rank]
    path = shards.rank_path(rank)
    if not path.is_file():
        return FileCheck(entry.file, False, "missing")
    try:
        shards.open_rank_file(rank).close()
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
    shards = ShardSet.load(folder, architecture_names())
    manifest = shards.manifest
    with ThreadPoolExecutor(max_workers=min(2, manifest.world_size)) as pool:
        files = list(pool.map(lambda r: _check_rank(shards, r), range(manifest.world_size)))
    if manifest.tokenizer is not None and not (folder / manifest.tokenizer).is_dir():
        files.append(FileCheck(manifest.tokenizer + "/", False, "tokenizer folder named by the manifest is missing"))
    elif manifest.tokenizer is not None:
        for entry in manifest.tokenizer_files:
            problem = shards.tokenizer_problem(entry)
            files.append(FileCheck(f"{manifest.tokenizer}/{entry.file}", not problem, problem))
        listed = {f.file for f in manifest.tokenizer_files}
        for extra in sorted(p.name for p in (folder / manifest.tokenizer).iterdir() if p.name not in listed):
            files.append(FileCheck(f"{manifest.tokenizer}/{extra}", False, "not listed by the manifest"))
    return CheckReport(folder, manifest, files)
