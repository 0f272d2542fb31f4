"""NE f32/f16 file -> NE file with q4_0 / q4_1 / q8_0 blocks, streamed.

A row chunk (CHUNK_BYTES of input) is read into one of two reused buffers
(no memory map, so passed pages never count toward RSS; the next chunk is
read while this one is worked on), quantized by the block codecs on
`nthread` threads straight into a reused output buffer in the file's
layout, and appended to the NEWriter, which writes under a temporary name
and renames at the end. The tokenizer folder
beside the input is copied beside the output before that rename, so a crash
never leaves a model file without its tokenizer, and a refused input leaves
nothing at all.
"""
from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from netp.errors import NetpError
from netp.formats.constants import FTYPE_OF_TYPE, QUANTIZED_TYPES, TYPE_NAMES, GGMLType, block_geometry
from netp.formats.ne import NEReader, NEWriter, TensorInfo, tensor_nbytes
from netp.formats.paths import check_output_place
from netp.formats.tokenizer_dir import copy_tokenizer_beside, tokenizer_dir_for
from netp.hostenv import cpu_count
from netp.sizes import human_size
from netp.quantize import rules
from netp.quantize.codecs import NonFiniteError, quantize_rows

if TYPE_CHECKING:
    from netp.models.architecture import Architecture

__all__ = ["QuantizeResult", "quantize_file", "encode_rows", "NonFiniteRow", "CHUNK_BYTES"]

CHUNK_BYTES = 16 << 20  # input bytes per row chunk


@dataclass(frozen=True)
class QuantizeResult:
    src: Path
    dst: Path
    arch: str
    ggml_type: GGMLType
    n_quantized: int
    kept: dict[str, int]  # type name -> tensors kept in that type
    bytes_in: int
    bytes_out: int
    seconds: float
    tokenizer: Path | None  # the copied tokenizer folder, if the input had one

    def summary(self) -> str:
        kept = ", ".join(f"{n} kept {t}" for t, n in self.kept.items()) or "none kept"
        tok = f"; tokenizer -> {self.tokenizer}" if self.tokenizer else "; no tokenizer folder beside the input"
        return (f"{self.src} ({self.arch}, {human_size(self.bytes_in)}) -> {self.dst} "
                f"({TYPE_NAMES[self.ggml_type]}, {human_size(self.bytes_out)}): "
                f"{self.n_quantized} tensors quantized, {kept}; "
                f"{self.bytes_in / max(self.bytes_out, 1):.2f}x smaller in {self.seconds:.1f} s{tok}")


# -- checks -------------------------------------------------------------------

def _refuse_quantized(reader: NEReader) -> None:
    first = next((t for t in reader.tensors.values() if t.is_quantized), None)
    if first is not None or reader.header.ftype not in (FTYPE_OF_TYPE[GGMLType.F32], FTYPE_OF_TYPE[GGMLType.F16]):
        what = (f"tensor {first.name} is {TYPE_NAMES[first.ggml_type]}" if first is not None
                else f"header ftype {reader.header.ftype}")
        raise NetpError(reader.path, f"already quantized ({what}); quantize the f32/f16 file instead "
                                     "(quantizing blocks again would only lose precision)")


def _check_arch(reader: NEReader, model_name: str | None) -> Architecture:
    from netp.models import by_ns_model_name, ne_model

    arch, _ = ne_model(reader.header, reader.shapes, str(reader.path))
    if model_name is not None:
        try:
            named = by_ns_model_name(model_name)
        except ValueError as e:
            raise NetpError(None, str(e)) from e
        if named is not arch:
            raise NetpError(reader.path, f"--model_name {model_name} is a {named.name} model, but this file holds "
                                         f"a {arch.name} model (recognised from its tensor names); "
                                         f"use --model_name {arch.ns_model_names[0]}")
    return arch


# -- the stage ------------------------------------------------------------------

def check_paths(src: Path, dst: Path) -> None:
    """Nothing is written over, into or in place of an input (docs/design.md §8)."""
    inputs = [src, tokenizer_dir_for(src)]
    check_output_place(dst, inputs, "output name")
    check_output_place(tokenizer_dir_for(dst), inputs, "output name (its tokenizer folder)")
    if not (dst.parent if str(dst.parent) else Path(".")).is_dir():
        raise NetpError(dst, f"output folder {dst.parent} does not exist")
    if dst.is_dir():
        raise NetpError(dst, "is a directory; give the output NE file's name")


def check_type(ggml_type: GGMLType) -> GGMLType:
    ggml_type = GGMLType(ggml_type)
    if ggml_type not in QUANTIZED_TYPES:
        raise NetpError(None, f"cannot quantize to {ggml_type.name} "
                              f"(supported: {', '.join(TYPE_NAMES[t] for t in QUANTIZED_TYPES)})")
    return ggml_type


def quantize_file(src: str | os.PathLike, dst: str | os.PathLike, ggml_type: GGMLType, *,
                  nthread: int | None = None, model_name: str | None = None,
                  output_type: GGMLType | None = None, embedding_type: GGMLType | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> QuantizeResult:
    """Quantize NE file `src` into `dst` with block type `ggml_type` (rules.tensor_types decides per tensor).

    `model_name` (neural-speed's --model_name) must name the architecture
    the file's tensor names show. `output_type` / `embedding_type` give the
    output head / token embedding another type (rules.type_overrides).
    `on_progress(bytes read, total bytes)` after each row chunk. Raises NetpError
    for every user error, leaving no output behind.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    ggml_type = check_type(ggml_type)
    nthread = nthread or cpu_count()
    if nthread < 1:
        raise NetpError(None, f"--nthread must be at least 1, got {nthread}")
    check_paths(src, dst)

    with NEReader(src) as reader:
        _refuse_quantized(reader)
        arch = _check_arch(reader, model_name)
        plan = rules.tensor_types({name: (info.shape, info.ggml_type) for name, info in reader.tensors.items()},
                                  ggml_type, rules.type_overrides(arch, output_type, embedding_type, reader.tensors))
        header = dataclasses.replace(reader.header, ftype=rules.header_ftype(ggml_type))
        total = sum(info.nbytes for info in reader.tensors.values())
        with NEWriter(dst, header, reader.vocab) as writer:
            for done in _Streamer(reader, writer, nthread).run(_chunks(reader, plan)):
                if on_progress is not None:
                    on_progress(done, total)
            # Tokenizer folder first, once the NE file's bytes are on disk; the NE file renamed into place last.
            writer.sync()
            has_tokenizer = tokenizer_dir_for(src).is_dir()  # a model without one still quantizes
            tokenizer = copy_tokenizer_beside(src, tokenizer_dir_for(dst)) if has_tokenizer else None

    return QuantizeResult(
        src=src, dst=dst, arch=arch.name, ggml_type=ggml_type,
        n_quantized=sum(t == ggml_type for t in plan.values()), kept=kept_counts(plan, ggml_type),
        bytes_in=src.stat().st_size, bytes_out=dst.stat().st_size,
        seconds=time.perf_counter() - t0, tokenizer=tokenizer,
    )


def kept_counts(plan: dict[str, GGMLType], ggml_type: GGMLType) -> dict[str, int]:
    """Type name -> how many tensors are not stored as `ggml_type`."""
    kept: dict[str, int] = {}
    for t in plan.values():
        if t != ggml_type:
            kept[TYPE_NAMES[t]] = kept.get(TYPE_NAMES[t], 0) + 1
    return kept


class NonFiniteRow(ValueError):
    """Row `row` (of the rows handed to encode_rows) holds a NaN or an inf."""

    def __init__(self, row: int):
        super().__init__(f"NaN or inf in row {row}")
        self.row = row

    def refusal(self, path: str | os.PathLike, tensor: str, row0: int) -> NetpError:
        """The user's error (quantize's and the one pass's): `tensor` in `path` holds NaN or
        inf in row `row0 + self.row`, `row0` being the first of the rows handed to encode_rows."""
        return NetpError(path, f"tensor {tensor}: NaN or inf in row {row0 + self.row}; refusing to quantize a "
                               "broken weight (re-convert the model)")


def encode_rows(x: np.ndarray, out_type: GGMLType, out: np.ndarray, nthread: int) -> np.ndarray:
    """Rows `x` (2-D f32 or f16 values) stored as `out_type` into uint8 buffer `out`
    (at least the encoded size); returns the filled (rows, row bytes) part. Kept
    types are checked finite like quantized ones: the file must not hold a broken weight."""
    n, row_len = x.shape
    values, block_bytes = block_geometry(out_type)
    row_out = row_len // values * block_bytes
    dst = out[:n * row_out].reshape(n, row_out)
    if out_type in QUANTIZED_TYPES:
        try:
            quantize_rows(x, out_type, out=dst, nthread=nthread)
        except NonFiniteError as e:
            raise NonFiniteRow(e.block // (row_len // values)) from e
        return dst
    check_finite(x)
    np.copyto(dst.view(_NUMPY_DTYPES[out_type]), x, casting="same_kind")
    return dst


def check_finite(x: np.ndarray) -> None:
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise NonFiniteRow(int(np.argmin(finite)))


_NUMPY_DTYPES: dict[GGMLType, np.dtype] = {GGMLType.F32: np.dtype("<f4"), GGMLType.F16: np.dtype("<f2")}


@dataclass(frozen=True)
class _Chunk:
    """Rows [a, b) of one tensor, written as `out_type`."""

    info: TensorInfo
    out_type: GGMLType
    a: int
    b: int


def _chunks(reader: NEReader, plan: dict[str, GGMLType]) -> list[_Chunk]:
    chunks = []
    for name, info in reader.tensors.items():
        step = max(1, CHUNK_BYTES // info.row_nbytes)
        chunks += [_Chunk(info, plan[name], a, min(a + step, info.n_rows)) for a in range(0, info.n_rows, step)]
    return chunks


class _Streamer:
    """Reads chunk i+1 on a helper thread (into the other of two reused input
    buffers) while chunk i is quantized and written, so file reads overlap the
    codecs' work instead of adding to it."""

    def __init__(self, reader: NEReader, writer: NEWriter, nthread: int):
        self.reader, self.writer, self.nthread = reader, writer, nthread
        self.in_bufs = [np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8)]
        self.out_buf = np.empty(0, dtype=np.uint8)

    def _read(self, c: _Chunk, slot: int) -> np.ndarray:
        n = (c.b - c.a) * c.info.row_nbytes
        if self.in_bufs[slot].size < n:
            self.in_bufs[slot] = np.empty(n, dtype=np.uint8)
        raw = self.in_bufs[slot][:n]
        self.reader.read_into(c.info.offset + c.a * c.info.row_nbytes, raw)
        return raw

    def run(self, chunks: list[_Chunk]) -> Iterator[int]:
        """Write every chunk in order (tensor records begun on their first chunk); yields bytes read."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="netp-read") as reads:
            pending = reads.submit(self._read, chunks[0], 0) if chunks else None
            for i, c in enumerate(chunks):
                assert pending is not None  # submitted for every chunk
                raw = pending.result()
                if i + 1 < len(chunks):
                    pending = reads.submit(self._read, chunks[i + 1], (i + 1) % 2)
                if c.a == 0:
                    self.writer.begin_tensor(c.info.name, c.out_type, c.info.shape)
                self._write(c, raw)
                yield raw.nbytes

    def _write(self, c: _Chunk, raw: np.ndarray) -> None:
        info, n = c.info, c.b - c.a
        x = raw.view("<f4" if info.ggml_type == GGMLType.F32 else "<f2").reshape(n, info.shape[-1])
        try:
            if c.out_type == info.ggml_type:  # kept as it is: check, then copy the bytes
                check_finite(x)
                self.writer.write(raw)
                return
            need = tensor_nbytes(c.out_type, x.shape)
            if self.out_buf.size < need:
                self.out_buf = np.empty(need, dtype=np.uint8)
            self.writer.write(encode_rows(x, c.out_type, self.out_buf, self.nthread))
        except NonFiniteRow as e:
            raise e.refusal(self.reader.path, info.name, c.a) from e
