"""Shard set for N ranks -> shard set for M ranks, from the rank files alone
(docs/design.md §10).

The source NE file is rebuilt as a StreamedNE: its layout from the
manifest (header = hparams, vocab from a rank file, every tensor's global
type and shape), each read of tensor rows answered from the rank files'
slices: a whole tensor from the first rank that holds it, a row cut from
each rank's rows (a KV head held by two ranks read from the first only), a
column cut gathered from each rank's block columns. Bytes are copied, never
decoded, and shard's own copier cuts them for M, so the result equals
`shard --ranks M` of the source byte for byte; the source is hashed as it
streams and must match the manifest's sha256.

Every rank file is checked against the manifest (structure, size, sha256)
before any is read.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np

from netp.errors import NetpError
from netp.formats.constants import type_from_name
from netp.formats.manifest import Manifest
from netp.formats.names import MANIFEST_NAME
from netp.formats.ne import NEReader, StreamedNE, TensorInfo
from netp.formats.shardset import ShardSet
from netp.formats.tokenizer_dir import copy_tokenizer_folder
from netp.shard.check import check_shard_set
from netp.shard.stage import (
    Progress, ShardResult, _byte_cuts, check_outdir, check_ranks_option, plan_split, write_shard_set,
)

__all__ = ["reshard"]


class _RankSlices:
    """StreamedNE's `fill`: source rows put back together from the rank files."""

    def __init__(self, manifest: Manifest, readers: list[NEReader]):
        self.manifest, self.readers = manifest, readers
        self._scratch = np.empty(0, dtype=np.uint8)

    def __call__(self, info: TensorInfo, row0: int, out: np.ndarray) -> None:
        entry = self.manifest.tensors[info.name]
        _, row_bytes, cuts = _byte_cuts(entry, info)
        n = out.nbytes // row_bytes
        rows = out.reshape(n, row_bytes)
        covered = 0  # rows (a row cut) or row bytes (a column cut) already taken from a lower rank
        for rank, cut in enumerate(cuts):
            if cut is None:
                continue
            reader = self.readers[rank]
            local = reader.tensors[info.name]
            if entry.axis is None:  # stored whole: the first holder has it all
                reader.read_into(local.offset + row0 * row_bytes, out)
                return
            width = cut.byte1 - cut.byte0
            if width == row_bytes:  # whole rows [row0, row1) of the source
                a, b = max(row0, cut.row0, covered), min(row0 + n, cut.row1)
                if a < b:
                    reader.read_into(local.offset + (a - cut.row0) * row_bytes, rows[a - row0:b - row0])
                covered = max(covered, cut.row1)
            else:  # block columns [byte0, byte1) of every row
                b0 = max(cut.byte0, covered)
                if b0 < cut.byte1:
                    if self._scratch.size < n * width:
                        self._scratch = np.empty(n * width, dtype=np.uint8)
                    part = self._scratch[:n * width]
                    reader.read_into(local.offset + row0 * width, part)
                    rows[:, b0:cut.byte1] = part.reshape(n, width)[:, b0 - cut.byte0:]
                covered = max(covered, cut.byte1)


def reshard(shards: str | os.PathLike, outdir: str | os.PathLike, world_size: int, *, force: bool = False,
            on_progress: Progress | None = None) -> ShardResult:
    """Cut the shard set in `shards` for `world_size` ranks into `outdir`, as
    `shard --ranks world_size` of its source would."""
    shards, outdir = Path(shards), Path(outdir)
    check_ranks_option(shards, world_size)
    t0 = time.perf_counter()
    shard_set = ShardSet.load(shards)
    manifest = shard_set.manifest
    readers = [shard_set.open_rank_file(r) for r in range(manifest.world_size)]
    try:
        tensors = [(t.name, type_from_name(t.type), t.shape) for t in manifest.tensors.values()]
        stream = StreamedNE(shards, manifest.ne_header(), readers[0].vocab, tensors, _RankSlices(manifest, readers))
        if stream.file_size != manifest.source.size:
            raise NetpError(shards / MANIFEST_NAME, f"its tensors make a source of {stream.file_size} bytes, "
                                                     f"its source says {manifest.source.size}")
        arch, _, entries = plan_split(stream, world_size)  # refuses a cut M cannot make, as shard does
        check_outdir(shards, outdir, force)
        if (error := check_shard_set(shards).error()) is not None:
            raise error
        tokenizer = None if manifest.tokenizer is None else functools.partial(copy_tokenizer_folder,
                                                                              shards / manifest.tokenizer)
        new = write_shard_set(stream, manifest.source.name, outdir, arch, entries, tokenizer, on_progress,
                              expect_source=manifest.source, force=force)
    finally:
        for r in readers:
            r.close()
    return ShardResult(outdir, new, time.perf_counter() - t0, sum(r.size for r in new.ranks))

