"""Where one rank's tensor bytes come from: its shard file, or its slices of an
unsharded NE file.

A model is resolved once (`resolve_model`: a ShardSet, its manifest read
and validated once, or an NEFile, opened once) and handed to whatever reads
it; nothing downstream finds it again on disk. Either way the rank opens
exactly one model file and hands out its part of each tensor in file form
(f32/f16 typed arrays, quantized types as uint8 rows of blocks),
memory-mapped or read into fresh buffers:
- `ShardSource`: rank r of a shard set opens only `rank-0000r-of-0000N.bin`,
  after checking it against the manifest (ShardSet.open_rank_file, then its
  sha256) and the manifest's split ranges against this netp's Mapping;
- `SliceSource`: neural-speed's way, `mpiexec -n N ne-run -m ne-q4_0.bin`:
  each rank takes its Mapping slices of the unsharded file, reading only
  those byte ranges.
"""
from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import threading
from pathlib import Path
from typing import Any, Union

import numpy as np

from netp.errors import NetpError
from netp.formats.constants import GGMLType, block_geometry, type_from_name
from netp.formats.fileio import drop_mapped_pages, read_exact_at
from netp.formats.ne import NEReader
from netp.formats.shardset import ShardSet
from netp.formats.tokenizer_dir import tokenizer_dir_for
from netp.models import architecture_names, ne_model
from netp.models.architecture import Architecture
from netp.models.hparams import HParams
from netp.models.mapping import Mapping, SplitError


class NEFile:
    """An unsharded NE file, opened once: every pass over it and every check of it
    (verify runs its reference twice and hashes it) reads through this reader."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = NEReader(self.path)

    def close(self) -> None:
        self.reader.close()


# A model as the runtime takes it: found and checked once, then handed on.
ResolvedModel = Union[NEFile, ShardSet]


def resolve_model(model: str | os.PathLike) -> ResolvedModel:
    """A shard-set folder (its manifest read and validated) or an NE file (opened)."""
    path = Path(model)
    if path.is_dir():
        return ShardSet.load(path, architecture_names())
    if not path.exists():
        raise NetpError(path, "no such file or shard set")
    return NEFile(path)


def close_model(model: ResolvedModel) -> None:
    """Close what resolve_model opened (a shard set holds no open file)."""
    if isinstance(model, NEFile):
        model.close()


def model_path(model: ResolvedModel) -> Path:
    """The path the user gave: the shard-set folder or the NE file."""
    return model.folder if isinstance(model, ShardSet) else model.path


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

    @property
    def checking(self) -> bool:
        """A thread is checking the file while the weights load (ShardSource: its sha256)."""
        return False

    def confirm(self) -> None:
        """Raise if the file turned out not to be the one expected (ShardSource: its sha256,
        computed while the weights load). Call once loading is done, or failed."""

    def close(self) -> None:
        self.reader.close()


_HASH_CHUNK = 8 << 20  # bytes per read of what the hash reads only for itself (formats.fileio's chunk)
_MAP_CHUNK = 32 << 20  # bytes hashed at once from the hash's own map: fewer hand-backs of the GIL than 8 MB
_AHEAD = 64 << 20  # bytes either side may hold for the other before it stops handing more over


class _Checksum:
    """The sha256 of the file a rank's reader opened, computed on a thread of its own while the
    weights load, so the check overlaps the load instead of preceding it (docs/design.md §5).

    - It hashes the open file (a duplicate of the reader's descriptor, from the moment it is
      opened, before its parse), never the path again: a file put in the path's place after the
      open cannot stand in for the bytes loaded.
    - Where the loader maps the file (`mapped`), the hash maps it too and hashes the pages in
      place, dropping each chunk once hashed: no copy, and never more than a chunk of the rank's
      RSS. Not under --no_mmap, which promises no SIGBUS if the file is truncated under the load.
    - Under --no_mmap (`share`) the file is read once, every tensor by whichever side
      gets to it first: the hash thread, walking the file in order, reads a tensor the loader has
      not asked for yet whole and hands it to the loader (`take`); the loader reads the others
      and hands them to the hash (`feed`). Either way the bytes hashed are the bytes loaded. What
      the hash reads only for itself: the header, vocabulary and tensor records, and tensors once
      _AHEAD bytes it read wait for the loader. The loader waits in `feed` while more than
      _AHEAD bytes it read wait for the hash; the hash waits only for a tensor the loader is
      reading at that moment (until `finish`). Both bounds keep what the overlap adds to the
      load's memory small.
    """

    def __init__(self, fd: int, size: int, path: Path, mapped: bool = False):
        self.size, self.path = size, path
        self.digest: str | None = None
        self.error: BaseException | None = None
        self._fd = os.dup(fd)  # the reader may close its own before the hash is done
        self._mapped = mapped
        self._cond = threading.Condition()
        self._tensors: dict[int, int] = {}  # offset -> bytes of each tensor the loader will read
        self._starts: list[int] = []  # their offsets, in order
        self._reading: dict[int, str] = {}  # offset -> "hash" or "loader": who reads that tensor
        self._ready: dict[int, np.ndarray] = {}  # read by the hash, not yet taken by the loader
        self._ready_bytes = 0
        self._fed: dict[int, memoryview] = {}  # offset -> read by the loader, not yet hashed
        self._fed_bytes = 0
        self._taken = 0  # the hash has every byte before this, or is reading it
        self._loader_done = False
        self._stopped = False  # cancelled, failed or finished: nothing more changes hands
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"{threading.current_thread().name}-sha256")  # the rank's own
        self.thread.start()

    # -- the loader's side --------------------------------------------------------------
    def share(self, tensors: dict[int, int]) -> None:
        """The loader reads these tensors (offset -> bytes) into memory: hand them over both ways."""
        with self._cond:
            self._tensors, self._starts = dict(tensors), sorted(tensors)

    def take(self, offset: int) -> np.ndarray | None:
        """The tensor at `offset` as the hash read it (flat uint8, read-only), or None: the loader
        reads it itself, then feeds it."""
        with self._cond:
            if offset not in self._tensors:
                return None
            while self._reading.get(offset) == "hash" and offset not in self._ready and not self._stopped:
                self._cond.wait()  # the hash is reading it now
            data = self._ready.pop(offset, None)
            if data is not None:
                self._ready_bytes -= data.nbytes
                self._cond.notify_all()
            self._reading[offset] = "loader"  # asked for: another ask reads it again
            return data

    def feed(self, offset: int, data: np.ndarray) -> None:
        """Bytes [offset, offset + data.nbytes) of the file as the loader read them (C-contiguous,
        never changed after: they are hashed later)."""
        view = data.data.cast("B")
        with self._cond:
            if not self._stopped and offset in self._tensors and offset + view.nbytes > self._taken:
                self._fed[offset] = view
                self._fed_bytes += view.nbytes
                self._cond.notify_all()
            while self._fed_bytes > _AHEAD and not self._stopped:
                self._cond.wait()

    def finish(self) -> None:
        """The loader reads no more: the hash reads the rest itself."""
        with self._cond:
            self._loader_done = True
            self._cond.notify_all()

    def cancel(self) -> None:
        """Stop hashing (a load that failed) and let a waiting loader go."""
        with self._cond:
            self._stopped = True
            self._fed.clear()
            self._ready.clear()
            self._fed_bytes = self._ready_bytes = 0
            self._cond.notify_all()

    def result(self) -> str:
        self.finish()
        self.thread.join()
        if self.error is not None:
            raise self.error
        if self.digest is None:
            raise RuntimeError("the sha256 was cancelled")
        return self.digest

    # -- the hash's side --------------------------------------------------------------------
    def _next(self, pos: int) -> tuple[str, memoryview | None, int]:
        """Under the lock, what to hash from `pos` on: ("fed", bytes, end): the loader's; ("tensor",
        None, end): read the tensor there whole, for the loader too; ("chunk", None, end): read
        [pos, end) for the hash only; ("stop", None, pos): cancelled."""
        while not self._stopped:
            i = bisect.bisect_right(self._starts, pos)  # tensor i - 1 starts at or before pos
            if i and self._starts[i - 1] in self._fed:  # the loader's bytes of the tensor the hash is at
                offset = self._starts[i - 1]
                view = self._fed.pop(offset)
                self._fed_bytes -= view.nbytes
                self._cond.notify_all()
                if offset + view.nbytes > pos:  # always: feed() keeps only bytes past _taken
                    self._taken = offset + view.nbytes
                    return "fed", view[pos - offset:], self._taken
            nbytes = self._tensors.get(pos)
            reader = self._reading.get(pos)
            if nbytes is not None and reader is None and (not self._ready_bytes
                                                          or self._ready_bytes + nbytes <= _AHEAD):
                self._reading[pos] = "hash"
                self._taken = pos + nbytes
                return "tensor", None, self._taken
            if reader == "loader" and not self._loader_done:
                self._cond.wait()  # the loader is reading it: its bytes come next
                continue
            # up to the next tensor at most, where the loader's bytes may be waiting
            self._taken = min(pos + _HASH_CHUNK, self.size, *self._starts[i:i + 1])
            return "chunk", None, self._taken
        return "stop", None, pos

    def _run(self) -> None:
        mapped = None
        try:
            h = hashlib.sha256()
            buf = np.empty(min(_HASH_CHUNK, self.size), dtype=np.uint8)
            if self._mapped:
                mapped = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            pos = 0
            while pos < self.size:
                if mapped is not None:  # the loader maps the file too: nothing changes hands
                    if self._stopped:
                        return
                    pos = self._hash_mapped(h, mapped, pos)
                    continue
                with self._cond:
                    kind, piece, end = self._next(pos)
                if kind == "stop":
                    return
                if piece is None:
                    out = buf[:end - pos] if kind == "chunk" else np.empty(end - pos, dtype=np.uint8)
                    read_exact_at(self._fd, out, pos, self.path, f"truncated: short read at offset {pos}")
                    if kind == "tensor":
                        out.flags.writeable = False
                        with self._cond:
                            if not self._stopped:
                                self._ready[pos] = out
                                self._ready_bytes += out.nbytes
                                self._cond.notify_all()
                    piece = out.data
                h.update(piece)  # hashlib releases the GIL for large buffers
                pos = end
            self.digest = h.hexdigest()
        except BaseException as e:  # noqa: BLE001 - handed to the loading thread by result()
            self.error = e
        finally:
            if mapped is not None:
                mapped.close()
            os.close(self._fd)
            self.cancel()

    def _hash_mapped(self, h: Any, mapped: mmap.mmap, pos: int) -> int:
        """Hash the next _MAP_CHUNK bytes from `pos` out of the hash's own map of the file, where the
        loader maps it too (a file truncated under the load ends in SIGBUS either way, docs/design.md
        §8): no copy. The pages are dropped once hashed, so the map never holds more than a chunk of
        the rank's RSS."""
        end = min(pos + _MAP_CHUNK, self.size)
        with memoryview(mapped) as whole, whole[pos:end] as part:
            h.update(part)
        drop_mapped_pages(mapped, pos, end - pos)
        return end


class ShardSource(RankSource):
    """Rank `rank` of a shard set: its own rank file, checked against the manifest."""

    def __init__(self, shards: ShardSet, rank: int, world_size: int, check_sha256: bool = True,
                 use_mmap: bool = True):
        manifest = self.manifest = shards.manifest
        self.rank = rank
        manifest_path = shards.manifest_path
        shards.check_world_size(world_size)
        self.shards = shards
        self._checksum: _Checksum | None = None
        path = shards.rank_path(rank)

        def start_checksum(fd: int, size: int) -> None:  # as soon as the file is open, before its parse
            self._checksum = _Checksum(fd, size, path, mapped=use_mmap)

        try:
            self.reader = shards.open_rank_file(rank, on_open=start_checksum if check_sha256 else None)
        except BaseException:
            self._cancel_checksum()
            raise
        self.path = self.reader.path
        if self._checksum is not None and not use_mmap:  # the loader reads every tensor: the file is read once
            self._checksum.share({t.offset: t.nbytes for t in self.reader.tensors.values()})
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
            self.close()
            raise

    @property
    def checking(self) -> bool:
        return self._checksum is not None

    def _cancel_checksum(self) -> None:
        if self._checksum is not None:
            self._checksum.cancel()

    def close(self) -> None:
        self._cancel_checksum()  # a load that ends before confirm() needs no hash
        self.reader.close()

    def confirm(self) -> None:
        checksum, self._checksum = self._checksum, None
        if checksum is None:
            return
        try:
            digest = checksum.result()
        except OSError as e:
            raise NetpError(self.path, f"cannot read: {e.strerror or e}") from e
        self.shards.check_rank_sha256(self.rank, self.path, digest)

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
        if mapped:
            return self.reader.view(name)
        checksum = self._checksum
        if checksum is None:
            return self.reader.read(name)
        info = self.reader.info(name)
        hashed = checksum.take(info.offset)  # the hash read it first
        if hashed is not None:
            return self.reader.shaped(info, hashed)
        data = self.reader.read(name)
        data.flags.writeable = False  # hashed after it is handed over: the bytes loaded are the bytes checked
        checksum.feed(info.offset, data)
        return data


class SliceSource(RankSource):
    """Rank `rank`'s Mapping slices of an unsharded NE file, read by byte range.
    `owned`: closing the source closes the file (else its opener does)."""

    def __init__(self, file: NEFile, rank: int, world_size: int, owned: bool = False):
        self.file, self.owned = file, owned
        self.path, self.reader = file.path, file.reader
        try:
            tensors = self.reader.tensors
            self.global_shapes = self.reader.shapes
            self.types = {n: t.ggml_type for n, t in tensors.items()}
            self.arch, self.hp = ne_model(self.reader.header, self.global_shapes, str(self.path))
            self.mapping = make_mapping(world_size, rank, self.hp, self.arch, self.path)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.owned:
            self.file.close()

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


def open_rank_source(model: str | os.PathLike | ResolvedModel, rank: int, world_size: int,
                check_sha256: bool = True, use_mmap: bool = True) -> RankSource:
    """This rank's source for a resolved model (or a path, resolved here and owned by the source)."""
    owned = not isinstance(model, (NEFile, ShardSet))
    resolved = resolve_model(model) if not isinstance(model, (NEFile, ShardSet)) else model
    if isinstance(resolved, ShardSet):
        return ShardSource(resolved, rank, world_size, check_sha256, use_mmap)
    return SliceSource(resolved, rank, world_size, owned)


def _shard_set_or_path(model: str | os.PathLike | ResolvedModel) -> ShardSet | Path:
    """A resolved model's shard set or NE path; a path names a shard set when it is a folder
    (read here: pass a resolved model where one is at hand)."""
    if isinstance(model, ShardSet):
        return model
    path = model.path if isinstance(model, NEFile) else Path(model)
    return ShardSet.load(path, architecture_names()) if path.is_dir() else path


def source_world_size(model: str | os.PathLike | ResolvedModel) -> int | None:
    """The world size a shard set was cut for (None for an NE file)."""
    found = _shard_set_or_path(model)
    return found.world_size if isinstance(found, ShardSet) else None


def tokenizer_dir(model: str | os.PathLike | ResolvedModel) -> Path | None:
    """The tokenizer folder travelling with a model: the manifest's folder inside a
    shard set, `<stem>.tokenizer/` beside an NE file."""
    found = _shard_set_or_path(model)
    if isinstance(found, ShardSet):
        return found.tokenizer_dir
    candidate = tokenizer_dir_for(found)
    return candidate if candidate.is_dir() else None
