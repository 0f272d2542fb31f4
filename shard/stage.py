"""NE file -> shard set (docs/design.md §4), streaming.

One pass over the source in file order: each tensor is read in chunks of
whole rows into a small ring of reused buffers (`NEReader.read_into`, no
memory map, so resident memory stays a few tens of MB whatever the model
size), and every rank's part of the chunk goes straight to that rank's
NEWriter: row cuts and whole tensors as contiguous byte ranges, column cuts
gathered into a second buffer. Bytes are copied, never decoded, so a
quantized shard set is bit-identical to its source. sha256 of the source
and of every rank file run on two background threads (the source on one,
the rank files on the other) while the next chunk is read and written. Everything lands in a temporary folder beside OUTDIR that
is renamed at the end (atomic_dir), so a failure leaves no shard set.

Which slice a rank holds comes only from models.mapping.Mapping.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from netp.errors import NetpError
from netp.formats import atomic
from netp.formats.constants import TYPE_NAMES, block_geometry
from netp.formats.fileio import sha256_file
from netp.formats.manifest import Manifest, RankFile, SourceInfo, TensorEntry, rank_file_name
from netp.formats.names import SHARD_TOKENIZER_DIR
from netp.formats.ne import NEContents, NEReader, NEWriter, TensorInfo
from netp.formats.paths import check_output_place, refuse_indirect_dir
from netp.formats.shardset import ShardSet
from netp.formats.tokenizer_dir import copy_tokenizer_beside, tokenizer_dir_for
from netp.models import ne_model
from netp.models.architecture import Architecture
from netp.models.hparams import HParams
from netp.models.mapping import Mapping, SplitError
from netp.shard.hashing import HashPool, QueuedSha256
from netp.sizes import human_size

CHUNK_BYTES = 8 << 20  # per read buffer; 3 slots x (read + gather) = 48 MiB
RING = 3  # buffers in flight: one being filled, up to two being hashed


@dataclass(frozen=True)
class ShardResult:
    outdir: Path
    manifest: Manifest
    seconds: float
    bytes_written: int


# -- planning -------------------------------------------------------------------
def plan_split(reader: NEContents, world_size: int) -> tuple[Architecture, HParams, list[TensorEntry]]:
    """Architecture, hparams and every tensor's per-rank ranges; refuses what cannot be cut."""
    path = reader.path
    arch, hp = ne_model(reader.header, reader.shapes, str(path))
    try:
        maps = [Mapping(world_size, r, hp, arch) for r in range(world_size)]
    except SplitError as e:
        raise NetpError(path, f"cannot shard over {world_size} ranks: {e}") from e
    entries = []
    for info in reader.tensors.values():
        try:
            slices = [m.slice_of(info.name, info.shape) for m in maps]
        except (SplitError, KeyError) as e:
            raise NetpError(path, f"cannot shard tensor {info.name}: {e.args[0]}") from e
        rule = slices[0].rule
        ranges = tuple(None if not s.held else (s.start, s.stop) if s.axis is not None else (0, info.shape[0])
                       for s in slices)
        entry = TensorEntry(info.name, info.shape, TYPE_NAMES[info.ggml_type], rule.kind, rule.unit,
                            slices[0].axis, ranges)
        _check_block_cut(path, entry, info, hp)
        entries.append(entry)
    return arch, hp, entries


def _check_block_cut(path: Path, entry: TensorEntry, info: TensorInfo, hp: HParams) -> None:
    """A cut along a row (ne[0]) of a quantized tensor must fall between blocks."""
    block, _ = block_geometry(info.ggml_type)
    if block == 1 or entry.axis != len(info.shape) - 1:
        return
    for rank, rng in enumerate(entry.ranges):
        if rng is None or (rng[0] % block == 0 and rng[1] % block == 0):
            continue
        what = f"head_dim {hp.head_dim}" if (entry.unit or "").endswith("heads") else f"the {entry.unit} cut"
        why = f"{what} is not a multiple of {block}"
        raise NetpError(path, f"cannot split {entry.name} ({entry.type}) by columns: rank {rank}'s columns "
                              f"{rng[0]}:{rng[1]} do not fall on {block}-value block boundaries ({why}); "
                              f"shard the f32/f16 file instead, or use a world size whose cuts align")


# -- copying --------------------------------------------------------------------
@dataclass(frozen=True)
class _Cut:
    """A rank's part of a tensor seen as a 2-D byte array (rows, row bytes)."""

    row0: int
    row1: int
    byte0: int
    byte1: int


def _byte_cuts(entry: TensorEntry, info: TensorInfo) -> tuple[int, int, list[_Cut | None]]:
    shape = info.shape
    block, block_bytes = block_geometry(info.ggml_type)
    if len(shape) == 1:  # one row of ne[0] values
        n_rows, row_bytes = 1, info.nbytes
    else:
        n_rows, row_bytes = info.n_rows, info.row_nbytes
    last = len(shape) - 1
    cuts: list[_Cut | None] = []
    for rng in entry.ranges:
        if rng is None:
            cuts.append(None)
        elif entry.axis is None:
            cuts.append(_Cut(0, n_rows, 0, row_bytes))
        elif entry.axis == last:  # along the row: whole blocks of bytes
            cuts.append(_Cut(0, n_rows, rng[0] // block * block_bytes, rng[1] // block * block_bytes))
        elif entry.axis == 0:
            inner = n_rows // shape[0]  # rows per index of axis 0 (3-D and 4-D tensors)
            cuts.append(_Cut(rng[0] * inner, rng[1] * inner, 0, row_bytes))
        else:
            raise NetpError(None, f"{entry.name}: cannot cut axis {entry.axis} of shape {list(shape)}")
    return n_rows, row_bytes, cuts


class _Slot:
    def __init__(self, nbytes: int):
        self.read = np.empty(nbytes, dtype=np.uint8)
        self.gather = np.empty(nbytes, dtype=np.uint8)
        self.fence: tuple[int, ...] | None = None  # HashPool fence of the last bytes handed out from it


class _Copier:
    """Reads the source in file order into a ring of buffers and feeds the writers."""

    def __init__(self, reader: NEContents, worker: HashPool, source_hash: QueuedSha256, buf_bytes: int,
                 on_bytes: Callable[[int], None]):
        self.reader, self.worker, self.source_hash = reader, worker, source_hash
        self.slots = [_Slot(buf_bytes) for _ in range(RING)]
        self.next_slot = 0
        self.hashed_upto = 0  # source bytes [0, hashed_upto) are queued for the source hash
        self.on_bytes = on_bytes

    def _slot(self) -> _Slot:
        slot = self.slots[self.next_slot]
        self.next_slot = (self.next_slot + 1) % RING
        if slot.fence is not None:
            self.worker.wait(slot.fence)  # its last bytes are hashed: safe to refill
        return slot

    def _read(self, slot: _Slot, offset: int, n: int) -> np.ndarray:
        view = slot.read[:n]
        self.reader.read_into(offset, view)
        self.source_hash.update(view)
        self.hashed_upto = offset + n
        return view

    def hash_source_upto(self, offset: int) -> None:
        """Queue the bytes between tensors (header, vocab, records) for the source hash."""
        while self.hashed_upto < offset:
            slot = self._slot()
            self._read(slot, self.hashed_upto, min(slot.read.size, offset - self.hashed_upto))
            slot.fence = self.worker.fence()

    def copy_tensor(self, entry: TensorEntry, info: TensorInfo, writers: list[NEWriter]) -> None:
        self.hash_source_upto(info.offset)
        n_rows, row_bytes, cuts = _byte_cuts(entry, info)
        for rank, (w, cut) in enumerate(zip(writers, cuts)):
            shape = entry.local_shape(rank)
            if cut is not None and shape is not None:
                w.begin_tensor(entry.name, info.ggml_type, shape)
        rows_per_chunk = max(1, self.slots[0].read.size // row_bytes)
        for r0 in range(0, n_rows, rows_per_chunk):
            r1 = min(n_rows, r0 + rows_per_chunk)
            slot = self._slot()
            data = self._read(slot, info.offset + r0 * row_bytes, (r1 - r0) * row_bytes)
            rows = data.reshape(r1 - r0, row_bytes)
            gathered = 0
            for w, cut in zip(writers, cuts):
                if cut is None:
                    continue
                a, b = max(r0, cut.row0), min(r1, cut.row1)
                if a >= b:
                    continue
                part = rows[a - r0:b - r0, cut.byte0:cut.byte1]
                if cut.byte1 - cut.byte0 != row_bytes and b - a > 1:  # strided columns: gather
                    n = part.size
                    if gathered + n > slot.gather.size:  # overlapping cuts filled it: let the hasher catch up
                        self.worker.wait()
                        gathered = 0
                    dst = slot.gather[gathered:gathered + n].reshape(part.shape)
                    np.copyto(dst, part)
                    part, gathered = dst, gathered + n
                w.write(np.ascontiguousarray(part).reshape(-1))
            slot.fence = self.worker.fence()
            self.on_bytes(data.size)


# -- the stage ------------------------------------------------------------------
def check_outdir(src: Path, outdir: Path, force: bool) -> None:
    """Refuse an OUTDIR that is not a plain folder name, that is or holds an input,
    or that is not empty, unless --force and it is a netp shard set (docs/design.md §8)."""
    refuse_indirect_dir(outdir, "OUTDIR")
    if outdir.resolve() == src.resolve() or outdir.resolve() in src.resolve().parents:
        raise NetpError(outdir, f"holds the input {src.name}; --force would delete it")
    check_output_place(outdir, [src, tokenizer_dir_for(src)], "OUTDIR")
    if outdir.exists() and not outdir.is_dir():
        raise NetpError(outdir, "exists and is not a folder")
    if outdir.is_dir() and any(outdir.iterdir()):
        if not force:
            raise NetpError(outdir, "exists and is not empty (use --force to replace it)")
        check_replaceable(outdir)


def check_replaceable(outdir: Path) -> None:
    """What --force may remove: a netp shard set (a valid manifest, and nothing but
    its files), never any other folder."""
    from netp.formats.manifest import MANIFEST_NAME, load_manifest

    try:
        manifest = load_manifest(outdir)
    except NetpError as e:
        raise NetpError(outdir, f"is not a netp shard set ({e.message}); --force replaces only a shard set "
                                "or an empty folder") from e
    own = {MANIFEST_NAME, *(r.file for r in manifest.ranks), *([manifest.tokenizer] if manifest.tokenizer else [])}
    stray = sorted(p.name for p in outdir.iterdir() if p.name not in own)
    if stray:
        raise NetpError(outdir, f"holds {stray[0]}, which is not part of its shard set; --force replaces only "
                                "a shard set's own files")


Progress = Callable[[int, int], None]  # (bytes just copied, total bytes); the CLI draws the bar


def check_ranks_option(path: Path, world_size: int) -> None:
    if world_size < 1:
        raise NetpError(path, f"--ranks must be at least 1, got {world_size}")


def shard_file(src: str | Path, outdir: str | Path, world_size: int, *, force: bool = False,
               on_progress: Progress | None = None) -> ShardResult:
    """Cut NE file `src` into `world_size` rank files + manifest.json + tokenizer/ in `outdir`."""
    src, outdir = Path(src), Path(outdir)
    check_ranks_option(src, world_size)
    t0 = time.perf_counter()
    with NEReader(src) as reader:
        arch, _, entries = plan_split(reader, world_size)
        check_outdir(src, outdir, force)
        # A source without `<stem>.tokenizer/` still shards (token ids work; prompts need a tokenizer).
        tokenizer = functools.partial(copy_tokenizer_beside, src) if tokenizer_dir_for(src).is_dir() else None
        manifest = write_shard_set(reader, src.name, outdir, arch, entries, tokenizer, on_progress,
                                   force=force)
    return ShardResult(outdir, manifest, time.perf_counter() - t0, sum(r.size for r in manifest.ranks))


def write_shard_set(reader: NEContents, source_name: str, outdir: Path, arch: Architecture, entries: list[TensorEntry],
                    tokenizer: Callable[[Path], Any] | None, on_progress: Progress | None = None,
                    expect_source: SourceInfo | None = None, force: bool = False) -> Manifest:
    """Stream `reader`'s tensors (an NEReader or a StreamedNE) into a shard set at `outdir`, atomically.
    `tokenizer(target)` writes the set's tokenizer folder `target` (`tokenizer/` in the
    folder being filled); None: the set has none.
    `expect_source`: refuse (leaving nothing) unless the streamed source hashes to it.
    The set is renamed onto an absent or empty OUTDIR in one rename(2), so of two runs into
    one empty folder the second is refused; `force` replaces a shard set, re-checked then."""
    world_size = len(entries[0].ranges)
    infos = [reader.tensors[e.name] for e in entries]
    total = sum(i.nbytes for i in infos)
    buf_bytes = max(CHUNK_BYTES, *(i.nbytes if len(i.shape) == 1 else i.row_nbytes for i in infos))
    names = [rank_file_name(r, world_size) for r in range(world_size)]
    # atomic_dir removes the temporary folder on any error and renames it into place on success.
    with atomic.atomic_dir(outdir, check_replaceable if force else False) as tmp:
        if tokenizer is not None:
            tokenizer(tmp / SHARD_TOKENIZER_DIR)  # first: a bad one fails before the long copy
        with HashPool() as worker:
            source_hash = QueuedSha256(worker.workers[0])  # the source on one core, the rank files on the other
            hashes = [QueuedSha256(worker.workers[1]) for _ in names]
            with contextlib.ExitStack() as stack:  # commits every writer on success, drops all on error
                writers = [stack.enter_context(NEWriter(tmp / n, reader.header, reader.vocab, hasher=h))
                           for n, h in zip(names, hashes)]
                copier = _Copier(reader, worker, source_hash, buf_bytes,
                                 (lambda n: on_progress(n, total)) if on_progress is not None else (lambda n: None))
                for entry, info in zip(entries, infos):
                    copier.copy_tensor(entry, info, writers)
                copier.hash_source_upto(reader.file_size)
            ranks = [RankFile(n, w.tell, h.hexdigest()) for n, w, h in zip(names, writers, hashes)]
            source = SourceInfo(source_name, reader.file_size, source_hash.hexdigest())
        if expect_source is not None and source != expect_source:
            raise NetpError(reader.path, f"the rebuilt source hashes to sha256 {source.sha256[:16]}..., "
                                         f"the manifest says {expect_source.sha256[:16]}... (inconsistent shard set)")
        manifest = Manifest(
            source=source, world_size=world_size, architecture=arch.name,
            hparams=dataclasses.asdict(reader.header), tokenizer=SHARD_TOKENIZER_DIR if tokenizer is not None else None,
            tensors={e.name: e for e in entries}, ranks=ranks, tokenizer_files=_tokenizer_files(tmp, tokenizer))
        _finish(tmp, manifest)
    return manifest


def _tokenizer_files(tmp: Path, tokenizer: Any) -> list[RankFile]:
    """The tokenizer folder's files, checksummed like the rank files (docs/design.md §8):
    a swapped tokenizer.json fails --check and run."""
    if tokenizer is None:
        return []
    folder = tmp / SHARD_TOKENIZER_DIR
    return [RankFile(f.name, f.stat().st_size, sha256_file(f)) for f in sorted(folder.iterdir())]


def _finish(tmp: Path, manifest: Manifest) -> None:
    """Check the rank files read back as the manifest says, then write manifest.json."""
    for r in range(manifest.world_size):
        ShardSet(tmp, manifest).open_rank_file(r).close()
    manifest.save(tmp)


def summary_line(result: ShardResult) -> str:
    m = result.manifest
    kinds: dict[str, int] = {}
    for t in m.tensors.values():
        kinds[t.split] = kinds.get(t.split, 0) + 1
    split = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    rate = human_size(result.bytes_written / max(result.seconds, 1e-9))
    return (f"sharded {m.source.name} ({m.architecture}, {len(m.tensors)} tensors: {split}) over {m.world_size} "
            f"ranks -> {result.outdir}/ ({human_size(result.bytes_written)} in {result.seconds:.2f} s, {rate}/s)"
            + ("" if m.tokenizer else "; no tokenizer folder beside the source, none copied"))


__all__ = ["plan_split", "shard_file", "write_shard_set", "summary_line", "ShardResult", "check_outdir",
           "check_ranks_option"]
