"""Whether verify's files are one model (docs/design.md §8, "provenance for verify").

`verify --ref/--f32` of another model used to print a KL table and PASS.
Before any model runs, the pair is refused unless:
- a shard set's --ref is its source: the size and sha256 the manifest records;
- an --f32 file and a file derived from it (a quantized --ref, or a shard
  set's rank 0 file) have the same structure (header fields but ftype, tensor
  names and shapes), and the derived file's bytes of its smallest quantized
  tensor, and of its smallest f32 tensor, are what quantize would write from
  the f32 file: quantization is bit-exact, so one small tensor re-quantized is
  a cheap proof that one file came from the other.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from netp.errors import NetpError
from netp.formats.constants import GGMLType
from netp.formats.fileio import sha256_fd
from netp.formats.manifest import Manifest
from netp.formats.ne import NEReader, TensorInfo


def check_ref_is_source(ref: NEReader, manifest: Manifest, folder: Path) -> None:
    """Refuse a --ref (open as `ref`) that is not the file the shard set was cut from."""
    if ref.file_size != manifest.source.size or sha256_fd(ref.fileno()) != manifest.source.sha256:
        raise NetpError(ref.path, f"is not the source of shard set {folder} (its manifest records "
                                  f"{manifest.source.name}, {manifest.source.size} bytes, sha256 "
                                  f"{manifest.source.sha256[:16]}...): verify compares a set with its own source")


def _header_but_ftype(reader: NEReader) -> dict[str, Any]:
    fields = dataclasses.asdict(reader.header)
    fields.pop("ftype")
    return fields


def _derived_bytes(f32: NEReader, info: TensorInfo, rows: tuple[int, int] | None) -> bytes:
    """What quantize (or shard) writes for `info` from the f32 file's tensor of that name."""
    from netp.quantize.codecs import quantize_rows

    values = f32.read(info.name, rows=rows)
    if values.dtype != np.float32:
        raise NetpError(f32.path, f"tensor {info.name} is not f32: --f32 takes the f32 NE file")
    return quantize_rows(values.reshape(-1, values.shape[-1]), info.ggml_type).tobytes()


def check_derived_from(f32: NEReader, other: NEReader, global_shapes: dict[str, tuple[int, ...]] | None = None,
                       rows_of: dict[str, tuple[int, int] | None] | None = None) -> None:
    """Refuse an --f32 file that `other` (a quantized file, or a shard set's rank 0 file with
    the set's global shapes and, for each tensor it holds whole or cut by rows, its row
    range: None for whole; a tensor missing from rows_of is cut by columns) was not made from."""
    shapes = global_shapes if global_shapes is not None else other.shapes
    if f32.shapes != shapes or _header_but_ftype(f32) != _header_but_ftype(other):
        raise NetpError(f32.path, f"is not the f32 source of {other.path}: another model (tensor names, "
                                  "shapes or header fields differ)")
    whole = [t for t in other.tensors.values() if rows_of is None or t.name in rows_of]
    quantized = [t for t in whole if t.ggml_type != GGMLType.F32]  # q4_0, q4_1, q8_0, f16
    plain = [t for t in whole if t.ggml_type == GGMLType.F32]
    for info in [min(group, key=lambda t: t.nbytes) for group in (quantized, plain) if group]:
        rows = None if rows_of is None else rows_of[info.name]
        data = other.read(info.name).tobytes()
        if _derived_bytes(f32, info, rows) != data:
            raise NetpError(f32.path, f"is not the f32 source of {other.path}: tensor {info.name} re-quantized "
                                      f"from it differs from the {info.ggml_type.name.lower()} bytes there "
                                      "(same structure, other weights)")
