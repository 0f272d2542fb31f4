"""Where one rank's tensor bytes come from: its shard file, or its slices of an
unsharded NE file.

Either way the rank opens exactly one model file and hands out its part of
each tensor in file form (f32/f16 typed arrays, quantized types as uint8
rows of blocks), memory-mapped or read into fresh buffers:
- `ShardSource`: rank r of a shard set opens only `rank-0000r-of-0000N.bin`,
  after checking it against the manifest (netp.shard.check.open_rank_file,
  then its sha256) and the manifest's split ranges against this netp's
  Mapping;
- `SliceSource`: neural-speed's way, `mpiexec -n N ne-run -m ne-q4_0.bin`:
  each rank takes its Mapping slices of the unsharded file, reading only
  those byte ranges.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from netp.errors import NetpError
from netp.formats.constants import GGMLType, block_geometry, type_from_name
from netp.formats.manifest import MANIFEST_NAME, Manifest
from netp.formats.ne import NEReader
from netp.formats.tokenizer_dir import tokenizer_dir_for
from netp.models import ne_model
from netp.models.architecture import Architecture
from netp.models.hparams import HParams
from netp.models.mapping import Mapping, SplitError
from netp.shard.check import load_shard_manifest, open_rank_file
from netp.shard.hashing import sha256_file


def check_world_size(folder: Path, manifest: Manifest, world_size: int) -> None:
    """Refuse to run a shard set on another number of ranks than it was cut for."""
    if world_size != manifest.world_size:
        raise NetpError(folder / MANIFEST_NAME, f"shard set is cut for {manifest.world_size} ranks but {world_size} "
                                                f"are running (start it with mpiexec -n {manifest.world_size})")


def make_mapping(world_size: int, rank: int, hp: HParams, arch: Architecture, path: Path) -> Mapping:
    try:
        return Mapping(world_size, rank, hp, arch)
    except SplitError as e:
        raise NetpError(path, f"cannot run on {world_size} ranks: {e}") from e


class RankSource:
    """One rank's view of the model; subclasses say where the bytes are."""

    path: Path  # the one model file this rank opened
    reader: NEReader
    arch: Architecture
    hp: HParams
    mapping: Mapping
    global_shapes: dict[str, tuple[int, ...]]
    types: dict[str, GGMLType]

    def has(self, name: str) -> bool:
        return name in self.global_shapes

    def type_of(self, name: str) -> GGMLType:
        return self.types[name]

    def part(self, name: str, mapped: bool) -> np.ndarray | None:
        """This rank's part of tensor `name` in file form; None when the rank holds none of it."""
        raise NotImplementedError

    def confirm(self) -> None:
        """Raise if the file turned out not to be the one expected (ShardSource: its sha256,
        computed while the weights load). Call once loading is done, or failed."""

    def close(self) -> None:
        self.reader.close()


class _Checksum:
    """A file's sha256 computed on a thread of its own (hashlib and the reads release the GIL), so
    the check overlaps loading the weights instead of preceding it (docs/design.md §5)."""

    def __init__(self, path: Path):
        self.digest: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(path,), daemon=True,
                                       name=f"{threading.current_thread().name}-sha256")  # the rank's own
        self.thread.start()

    def _run(self, path: Path) -> None:
        try:
            self.digest = sha256_file(path)
        except BaseException as e:  # noqa: BLE001 - handed to the loading thread by result()
            self.error = e

    def result(self) -> str:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.digest is not None
        return self.digest


class ShardSource(RankSource):
    """Rank `rank` of a shard set: its own rank file, checked against the manifest."""

    def __init__(self, folder: Path, manifest: Manifest, rank: int, world_size: int, check_sha256: bool = True):
        self.folder, self.manifest, self.rank = folder, manifest, rank
        manifest_path = folder / MANIFEST_NAME
        check_world_size(folder, manifest, world_size)
        self.reader = open_rank_file(folder, manifest, rank)
        self.path = self.reader.path
        self._checksum = _Checksum(self.path) if check_sha256 else None
        try:
            self.global_shapes = {t.name: t.shape for t in manifest.tensors.values()}
            self.types = {t.name: type_from_name(t.type) for t in manifest.tensors.values()}
            self.arch, self.hp = ne_model(manifest.ne_header(), self.global_shapes, str(manifest_path))
            if self.arch.name != manifest.architecture:
                raise NetpError(manifest_path, f"says architecture {manifest.architecture}, but its tensors are "
                                               f"a {self.arch.name} model's")
            self.mapping = make_mapping(world_size, rank, self.hp, self.arch, manifest_path)
            self._check_split_plan(manifest_path)
        except BaseException:
            self.reader.close()
            raise

    def confirm(self) -> None:
        checksum, self._checksum = self._checksum, None
        if checksum is None:
            return
        try:
            digest = checksum.result()
        except OSError as e:
            raise NetpError(self.path, f"cannot read: {e.strerror or e}") from e
        if digest != self.manifest.ranks[self.rank].sha256:
            raise NetpError(self.path, "sha256 differs from the manifest (corrupt, or from another shard set)")

    def _check_split_plan(self, manifest_path: Path) -> None:
        """The manifest cuts every tensor where this netp's Mapping cuts it (the rank
        file's contents against the manifest are open_rank_file's check)."""
        for t in self.manifest.tensors.values():
            mine = self.mapping.slice_of(t.name, t.shape)
            expect = None if not mine.held else (mine.start, mine.stop)
            if t.range_of(self.rank) != expect:
                raise NetpError(manifest_path, f"tensor {t.name}: rank {self.rank} holds {t.range_of(self.rank)}, "
                                               f"but netp's split plan gives {expect}")

    def part(self, name: str, mapped: bool) -> np.ndarray | None:
        if not self.manifest.tensors[name].held_by(self.rank):
            return None
        return self.reader.view(name) if mapped else self.reader.read(name)


class SliceSource(RankSource):
    """Rank `rank`'s Mapping slices of an unsharded NE file, read by byte range."""

    def __init__(self, path: Path, rank: int, world_size: int):
        self.path = Path(path)
        self.reader = NEReader(self.path)
        try:
            tensors = self.reader.tensors
            self.global_shapes = self.reader.shapes
            self.types = {n: t.ggml_type for n, t in tensors.items()}
            self.arch, self.hp = ne_model(self.reader.header, self.global_shapes, str(self.path))
            self.mapping = make_mapping(world_size, rank, self.hp, self.arch, self.path)
        except BaseException:
            self.reader.close()
            raise

    def part(self, name: str, mapped: bool) -> np.ndarray | None:
        info = self.reader.info(name)
        try:
            sl = self.mapping.slice_of(name, info.shape)
        except (SplitError, KeyError) as e:
            raise NetpError(self.path, str(e)) from e
        if not sl.held:
            return None
        if sl.axis is None:
            return self.reader.view(name) if mapped else self.reader.read(name)
        if sl.axis == 0:
            return self.reader.view(name)[sl.start:sl.stop] if mapped else \
                self.reader.read(name, rows=(sl.start, sl.stop))
        return self._columns(info, sl.start, sl.stop, mapped)

    def _columns(self, info: Any, start: int, stop: int, mapped: bool) -> np.ndarray:
        """Columns [start, stop) of a 2-D tensor: a byte range of every row."""
        block, block_bytes = block_geometry(info.ggml_type)
        if start % block or stop % block:
            raise NetpError(self.path, f"tensor {info.name}: columns {start}:{stop} cut {info.ggml_type.name} "
                                       f"blocks of {block} values; this model cannot be split over "
                                       f"{self.mapping.world_size} ranks in this type")
        b0, b1 = start // block * block_bytes, stop // block * block_bytes
        if mapped:  # f32/f16 views are typed (columns = values), quantized ones are block bytes
            return self.reader.view(info.name)[:, b0:b1] if info.is_quantized else \
                self.reader.view(info.name)[:, start:stop]
        rows = info.n_rows
        out = np.empty((rows, b1 - b0), dtype=np.uint8)
        for r in range(rows):  # one pread per row: only this rank's bytes are read
            self.reader.read_into(info.offset + r * info.row_nbytes + b0, out[r])
        if info.ggml_type == GGMLType.F32:
            return out.view("<f4")
        if info.ggml_type == GGMLType.F16:
            return out.view("<f2")
        return out


def open_source(model: Path, rank: int, world_size: int, check_sha256: bool = True) -> RankSource:
    """This rank's source for an NE file or a shard-set folder."""
    model = Path(model)
    if model.is_dir():
        return ShardSource(model, load_shard_manifest(model), rank, world_size, check_sha256)
    if not model.exists():
        raise NetpError(model, "no such file or shard set")
    return SliceSource(model, rank, world_size)


def source_world_size(model: Path) -> int | None:
    """The world size a shard set was cut for (None for an NE file)."""
    model = Path(model)
    if model.is_dir():
        return load_shard_manifest(model).world_size
    return None


def tokenizer_dir(model: Path) -> Path | None:
    """The tokenizer folder travelling with a model: `<stem>.tokenizer/` beside an
    NE file, the manifest's folder inside a shard set."""
    model = Path(model)
    if model.is_dir():
        name = load_shard_manifest(model).tokenizer
        return model / name if name else None
    candidate = tokenizer_dir_for(model)
    return candidate if candidate.is_dir() else None
