"""MODEL -> shard set in one pass (docs/design.md §10): convert, quantize and shard
with no unsharded file written anywhere.

The NE file that `convert --outtype f32` (or f16) and `quantize` would write
exists here only as a StreamedNE: its layout (header, vocab, every tensor
record and offset) is computed up front from the convert plan and the
quantize rules, and shard's streaming copier reads it as it reads a real
file. Each read of tensor rows is answered from the checkpoint tensor being
worked on: read once (or, for an untransformed tensor, its rows read
straight from the checkpoint a chunk at a time), converted as convert converts it, encoded as
quantize encodes it (encode_rows: the same codecs, the same finiteness
checks), so the rank files are byte-identical to the three-step path's and
the source sha256 in the manifest is that of the file the three steps would
have written, hashed as the bytes stream through.

Resident memory: shard's buffer ring, two chunks of f32 rows, and the largest
tensor the HF hook reworks (LLaMA's wq/wk), held whole in f32; an untransformed
tensor, the embedding included, is never whole in memory.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from netp.convert.stage import (
    Extent, NETensor, Source, SourceRows, TensorData, converted_tensors, ne_header, ne_tensors, open_model,
    plan_ne_tensors as convert_plan,
)
from netp.errors import NetpError
from netp.formats.constants import QUANTIZED_TYPES, TYPE_NAMES, GGMLType, type_from_name
from netp.formats.hf import read_tensor_bytes
from netp.formats.manifest import Manifest
from netp.formats.ne import StreamedNE, TensorInfo
from netp.formats.tokenizer_dir import build_tokenizer_dir
from netp.hostenv import cpu_count
from netp.quantize import rules
from netp.quantize.stage import NonFiniteRow, encode_rows
from netp.shard.stage import check_outdir, check_ranks_option, plan_split as shard_plan, write_shard_set
from netp.sizes import human_size

__all__ = ["PipelineResult", "run_pipeline", "source_name", "summary_line", "OUT_TYPES"]

OUT_TYPES = ("f32", "f16", "q4_0", "q4_1", "q8_0")


@dataclass(frozen=True)
class PipelineResult:
    outdir: Path
    manifest: Manifest
    seconds: float


def source_name(outtype: str) -> str:
    """The name of the NE file the three steps would write (convert's and the README's ne-<type>.bin)."""
    return f"ne-{outtype}.bin"


class _ConvertedRows:
    """StreamedNE's `fill`: rows of the tensor being streamed, converted and encoded.

    Tensors come in file order from convert's generator; the one being asked
    for is the next one (or the current), so each is read from the checkpoint once."""

    def __init__(self, src: Source, tensors: list[NETensor], types: dict[str, GGMLType], quantizing: bool,
                 nthread: int):
        self.src, self.types, self.quantizing, self.nthread = src, types, quantizing, nthread
        self._items: Iterator[tuple[NETensor, TensorData]] = converted_tensors(src, tensors)
        self._current: tuple[NETensor, TensorData] | None = None
        # Rows read from the checkpoint (Extent, SourceRows): the next chunk is read on a helper
        # thread (into the other of two buffers) while this one is encoded.
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netp-read")
        self._buffers = [np.empty(0, dtype=np.float32), np.empty(0, dtype=np.float32)]
        self._slot = 0
        self._ahead: tuple[tuple[str, int, int], Future[np.ndarray]] | None = None

    def close(self) -> None:
        self._reads.shutdown(wait=True)

    def _tensor(self, name: str) -> tuple[NETensor, TensorData]:
        while self._current is None or self._current[0].name != name:
            if self._ahead is not None:  # a read of the last tensor's rows ends before the reader moves on
                wait([self._ahead[1]])
                self._ahead = None
            self._current = None  # drop the last tensor's values before reading the next
            self._current = next(self._items)
        return self._current

    def _read_into(self, t: NETensor, data: Extent | SourceRows, row0: int, x: np.ndarray) -> np.ndarray:
        """f32 values of rows [row0, row0 + x.size // row length) read from the checkpoint into `x`."""
        row_len = t.shape[-1]
        if isinstance(data, SourceRows):
            return self.src.tensors.read_rows(data.name, data.row0 + row0, x.size // row_len, out=x)
        read_tensor_bytes(data.fd, x, data.offset + row0 * row_len * 4, self.src.path, t.source_name)
        return x.reshape(-1, row_len)

    def _read_rows(self, t: NETensor, data: Extent | SourceRows, row0: int, n: int, slot: int) -> np.ndarray:
        row_len = t.shape[-1]
        if self._buffers[slot].size < n * row_len:
            self._buffers[slot] = np.empty(0, dtype=np.float32)  # drop the old one before allocating
            self._buffers[slot] = np.empty(n * row_len, dtype=np.float32)
        return self._read_into(t, data, row0, self._buffers[slot][:n * row_len])

    def _rows(self, t: NETensor, data: TensorData, row0: int, n: int) -> np.ndarray:
        """f32 values of rows [row0, row0 + n), (n, row length)."""
        if isinstance(data, np.ndarray):
            return data.reshape(-1, t.shape[-1])[row0:row0 + n]
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (t.name, row0, n):
            x = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].result()  # not the rows asked for: let it finish before its buffer is reused
            self._slot ^= 1
            x = self._read_rows(t, data, row0, n, self._slot)
        n_rows = math.prod(t.shape[:-1]) if len(t.shape) > 1 else 1
        nxt = row0 + n
        if nxt < n_rows:  # the copier asks for chunks of one size in order: read the next one now
            m = min(n, n_rows - nxt)
            self._slot ^= 1
            self._ahead = ((t.name, nxt, m), self._reads.submit(self._read_rows, t, data, nxt, m, self._slot))
        return x

    def __call__(self, info: TensorInfo, row0: int, out: np.ndarray) -> None:
        t, data = self._tensor(info.name)
        out_type = self.types[info.name]
        row_len = t.shape[-1]
        n = out.nbytes // (info.nbytes if len(info.shape) == 1 else info.row_nbytes)
        if not isinstance(data, np.ndarray) and out_type == GGMLType.F32 and not self.quantizing:
            self._read_into(t, data, row0, out.view(np.float32))  # straight into shard's buffer
            return
        x = self._rows(t, data, row0, n)
        if not self.quantizing:  # convert's conversion: no finiteness check, as convert has none
            np.copyto(out.view(np.float32 if out_type == GGMLType.F32 else np.float16).reshape(x.shape), x,
                      casting="same_kind")
            return
        try:
            encode_rows(x, out_type, out, self.nthread)
        except NonFiniteRow as e:
            raise e.refusal(self.src.path, f"{t.source_name} ({info.name})", row0) from e


def run_pipeline(model: str, outdir: str | os.PathLike, outtype: str, world_size: int, *,
                 output_type: str | None = None, embedding_type: str | None = None, force: bool = False,
                 nthread: int | None = None, name: str | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> PipelineResult:
    """MODEL (HF folder, cached hub id, .gguf) -> shard set for `world_size` ranks at `outdir`,
    byte-identical to `convert --outtype f32|f16` -> `quantize` (quantized outtypes) -> `shard`.
    `name`: the unsharded file the manifest names as its source (default ne-<outtype>.bin)."""
    t0 = time.perf_counter()
    outdir = Path(outdir)
    if outtype not in OUT_TYPES:
        raise NetpError(None, f"--outtype {outtype!r} is not one of {', '.join(OUT_TYPES)}")
    chosen = type_from_name(outtype)
    quantizing = chosen in QUANTIZED_TYPES
    if not quantizing and (output_type or embedding_type):
        raise NetpError(None, f"--output_type and --embedding_type are quantize's options: they need a quantized "
                              f"--outtype (q4_0, q4_1, q8_0), not {outtype}")
    check_ranks_option(outdir, world_size)
    nthread = nthread or cpu_count()

    src = open_model(model)
    try:
        convert_type = GGMLType.F32 if quantizing else chosen  # the three-step path quantizes an f32 file
        tensors = ne_tensors(convert_plan(src), convert_type)
        header = ne_header(src, convert_type)
        types = {t.name: t.ggml_type for t in tensors}
        if quantizing:
            overrides = rules.type_overrides(src.arch, output_type and type_from_name(output_type),
                                             embedding_type and type_from_name(embedding_type),
                                             [t.name for t in tensors])
            types = rules.tensor_types({t.name: (t.shape, t.ggml_type) for t in tensors}, chosen, overrides)
            header = dataclasses.replace(header, ftype=rules.header_ftype(chosen))
        rows = _ConvertedRows(src, tensors, types, quantizing, nthread)
        try:
            stream = StreamedNE(src.path, header, src.vocab(), [(t.name, types[t.name], t.shape) for t in tensors],
                                rows)
            arch, _, entries = shard_plan(stream, world_size)
            check_outdir(src.path, outdir, force)
            manifest = write_shard_set(stream, name or source_name(outtype), outdir, arch, entries,
                                       lambda target: build_tokenizer_dir(target, src.write_tokenizer),
                                       on_progress, force=force)
        finally:
            rows.close()
    finally:
        src.close()
    return PipelineResult(outdir, manifest, time.perf_counter() - t0)


def summary_line(result: PipelineResult) -> str:
    m = result.manifest
    size = sum(r.size for r in m.ranks)
    types = sorted({t.type for t in m.tensors.values()}, key=list(TYPE_NAMES.values()).index)
    return (f"wrote {result.outdir}/ ({m.architecture}, {len(m.tensors)} tensors in {', '.join(types)}, "
            f"{m.world_size} ranks, {human_size(size)}) in {result.seconds:.1f} s; "
            f"source {m.source.name}: {m.source.size} bytes, sha256 {m.source.sha256[:16]}...")
