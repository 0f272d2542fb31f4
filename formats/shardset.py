"""A shard set on disk, resolved once: its folder and validated manifest, and
checked access to the files it lists (docs/design.md §4).

A host running rank r needs only its rank file, the manifest and the
tokenizer folder (Manifest.files_for_rank); nothing here touches another
rank's file unless asked for that rank.

- `ShardSet.load`: the manifest, read and validated once.
- `open_rank_file`: the one rank-file validator (cheap, no data hashed): the
  file is there, has the manifest's size, and is an NE file whose header
  equals the manifest's hparams and whose tensors are exactly the ones the
  manifest gives that rank, in order, with the local shapes and types it
  says. Shard, `shard --check`, `netp inspect` and the runtime all use it.
- `check_rank_sha256`: a rank file's sha256 against the manifest's.
- `tokenizer_file`: one file of the tokenizer folder, checked against the
  manifest's size and sha256 before anything reads it (docs/design.md §8).
- `check_world_size`: the set runs on the number of ranks it was cut for.
"""
from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Callable, Collection

from netp.errors import NetpError
from netp.formats.constants import TYPE_NAMES
from netp.formats.fileio import sha256_file
from netp.formats.manifest import Manifest, RankFile, load_manifest
from netp.formats.names import MANIFEST_NAME
from netp.formats.ne import NEReader


class ShardSet:
    """A shard-set folder and its manifest (validated when loaded, never re-read)."""

    def __init__(self, folder: str | os.PathLike, manifest: Manifest):
        self.folder, self.manifest = Path(folder), manifest

    @classmethod
    def load(cls, folder: str | os.PathLike, architectures: Collection[str] | None = None) -> "ShardSet":
        """`folder/manifest.json`, validated; `architectures`: the names the caller can run
        (netp.models.architecture_names(); formats does not import models), None: unchecked."""
        return cls(folder, load_manifest(folder, architectures))

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST_NAME

    @property
    def world_size(self) -> int:
        return self.manifest.world_size

    def check_world_size(self, running: int) -> None:
        """Refuse to run the set on another number of ranks than it was cut for."""
        if running != self.manifest.world_size:
            raise NetpError(self.manifest_path, f"shard set is cut for {self.manifest.world_size} ranks but "
                                                f"{running} are running (start it with mpiexec -n "
                                                f"{self.manifest.world_size})")

    # -- rank files ----------------------------------------------------------------
    def rank_path(self, rank: int) -> Path:
        return self.folder / self.manifest.ranks[rank].file

    def open_rank_file(self, rank: int, on_open: Callable[[int, int], None] | None = None) -> NEReader:
        """Open rank `rank`'s file and check it against the manifest (no hashing; on_open: NEReader's)."""
        entry = self.manifest.ranks[rank]
        path = self.rank_path(rank)
        if not path.is_file():
            raise NetpError(path, f"rank file of rank {rank} is missing")
        size = path.stat().st_size
        if size != entry.size:
            raise NetpError(path, f"is {size} bytes, the manifest says {entry.size} (truncated or replaced?)")
        reader = NEReader(path, on_open)
        try:
            self._check_header(reader)
            self._check_tensors(reader, rank)
        except BaseException:
            reader.close()
            raise
        return reader

    def check_rank_sha256(self, rank: int, path: Path, digest: str) -> None:
        """Refuse rank `rank`'s file (at `path`, its bytes hashing to `digest`: formats.fileio.sha256_fd)
        unless that is the manifest's sha256."""
        if digest != self.manifest.ranks[rank].sha256:
            raise NetpError(path, "sha256 differs from the manifest (corrupt, or from another shard set)")

    def _check_header(self, reader: NEReader) -> None:
        header = dataclasses.asdict(reader.header)
        for name, value in self.manifest.hparams.items():
            if header[name] != value:
                raise NetpError(reader.path, f"header field {name} is {header[name]}, the manifest says {value}")

    def _check_tensors(self, reader: NEReader, rank: int) -> None:
        manifest = self.manifest
        want = manifest.tensors_of(rank)
        got = list(reader.tensors.values())
        if [t.name for t in got] != [t.name for t in want]:
            missing = [t.name for t in want if t.name not in reader.tensors]
            extra = [t.name for t in got if t.name not in manifest.tensors or not manifest.tensors[t.name].held_by(rank)]
            what = f"lacks {missing[0]}" if missing else f"holds {extra[0]}" if extra else "has its tensors out of order"
            raise NetpError(reader.path, f"does not match the manifest: {what}")
        for info, entry in zip(got, want):
            if TYPE_NAMES[info.ggml_type] != entry.type or info.shape != entry.local_shape(rank):
                raise NetpError(reader.path, f"tensor {info.name} is {TYPE_NAMES[info.ggml_type]} "
                                             f"{list(info.shape)}, the manifest says {entry.type} "
                                             f"{list(entry.local_shape(rank) or ())}")

    # -- the tokenizer folder -----------------------------------------------------------
    @property
    def tokenizer_dir(self) -> Path | None:
        """The tokenizer folder the manifest names (None: the set has none)."""
        return None if self.manifest.tokenizer is None else self.folder / self.manifest.tokenizer

    def tokenizer_problem(self, entry: RankFile) -> str:
        """What is wrong with one listed tokenizer file ('' when it matches)."""
        path = self.folder / str(self.manifest.tokenizer) / entry.file
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

    def tokenizer_file(self, name: str) -> Path:
        """Path of tokenizer file `name`, after checking it is the one the manifest
        lists (size, sha256, a regular file); NetpError otherwise."""
        manifest = self.manifest
        entry = next((f for f in manifest.tokenizer_files if f.file == name), None)
        if manifest.tokenizer is None or entry is None:
            raise NetpError(self.manifest_path, f"lists no tokenizer file {name}")
        path = self.folder / manifest.tokenizer / name
        problem = self.tokenizer_problem(entry)
        if problem:
            raise NetpError(path, problem)
        return path
