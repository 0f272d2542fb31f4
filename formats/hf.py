"""Hugging Face checkpoint readers: safetensors (single file or sharded
index) and PyTorch `.bin`, one tensor at a time, as float32.

safetensors: `safe_open` validates each file and lists its tensors; the
bytes are then read with `os.preadv` at the offsets of the file's header
into one reused buffer, never through a memory map, so the pages read do
not stay in the process's resident memory (docs/design.md §1: peak memory stays
near the largest tensor). bf16 is widened to f32 exactly without torch: its
16 bits become the high half of a uint32 (neural-speed's way).

`.bin` needs torch (`torch.load(weights_only=True, mmap=True)`), the
optional `torch` extra; without it the error names the extra.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from netp.errors import NetpError
from netp.formats.fileio import float32_out, read_exact_at
from netp.formats.paths import plain_name, read_json, regular_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# safetensors dtype -> numpy dtype of the raw little-endian values; BF16 is read as uint16 bits.
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}
_CHUNK_BYTES = 16 << 20  # raw bytes widened per step when the source is not f32


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (config.json, tokenizer_config.json), read up to
    formats.paths' size cap, or a NetpError naming it."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise NetpError(path, "does not hold a JSON object")
    return value


class Checkpoint(Protocol):
    """What convert needs from any input: names, shapes, and f32 data one tensor at a time."""

    path: Path

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> np.ndarray:
        """The tensor as C-contiguous float32 in its numpy shape. It may live in a
        buffer the next read reuses: use it (write it) before reading another."""
        ...

    def read_rows(self, name: str, row0: int, rows: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [row0, row0 + rows) of the tensor seen as (rows, last axis), as float32
        (one expert of a merged 3-D tensor, one part of a fused one, one chunk of a
        streamed tensor): only those bytes are read. The same buffer rule as read,
        unless `out` (a contiguous float32 array of rows x last axis values) is given:
        then the values are written there and `out`, shaped (rows, last axis), is
        returned, and no buffer of the reader's is touched."""
        ...

    def close(self) -> None: ...


def bf16_bits_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Widen bf16 values given as uint16 bits to float32, exactly."""
    # dtype=uint32: the ufunc widens in its own small buffers, no uint32 copy of `bits`
    wide = np.left_shift(bits, 16, out=None if out is None else out.view(np.uint32), dtype=np.uint32)
    return wide.view(np.float32)


class _Buffer:
    """One growing float32 buffer reused for every tensor read."""

    def __init__(self) -> None:
        self._data = np.empty(0, dtype=np.float32)

    def get(self, n: int) -> np.ndarray:
        if self._data.size < n:
            self._data = np.empty(0, dtype=np.float32)  # drop the old one before allocating
            self._data = np.empty(n, dtype=np.float32)
        return self._data[:n]


def read_tensor_bytes(fd: int, out: np.ndarray, offset: int, path: Path, name: str | None) -> None:
    """Fill `out` with the bytes of tensor `name` from `offset` of `fd`; a file that ends first is named."""
    read_exact_at(fd, out, offset, path, f"truncated: file ends inside tensor {name}")


class SafetensorsFile:
    """One .safetensors file: validated by safe_open, data read with preadv."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        regular_file(path, "a safetensors file")  # before safe_open opens it: a FIFO would block
        try:
            with safe_open(path, framework="numpy") as f:
                names = list(f.keys())
        except SafetensorError as e:
            raise NetpError(path, f"not a readable safetensors file ({e})") from e
        except FileNotFoundError as e:
            raise NetpError(path, "no such file") from e
        self._fd = os.open(path, os.O_RDONLY)
        header = self._header()
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name in names:
            entry = header[name]
            dtype = entry["dtype"]
            begin, end = entry["data_offsets"]
            self.tensors[name] = (dtype, tuple(int(d) for d in entry["shape"]), self._data_start + begin,
                                  self._data_start + end)

    def _header(self) -> dict[str, Any]:
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        self._data_start = 8 + n
        return json.loads(os.pread(self._fd, n, 8))

    def read_into(self, name: str, buffer: _Buffer, rows: tuple[int, int] | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
        """The tensor (or rows [a, b) of it seen as (rows, last axis)) as f32 in `buffer`,
        or in `out` (float32, exactly that many values) when given."""
        dtype_name, shape, begin, end = self.tensors[name]
        raw_dtype = _SAFETENSORS_DTYPES.get(dtype_name)
        if raw_dtype is None:
            raise NetpError(self.path, f"tensor {name} has dtype {dtype_name}; netp converts F32, F16, BF16 and F64")
        if rows is not None:
            row_len = shape[-1] if shape else 1
            begin += rows[0] * row_len * raw_dtype.itemsize
            end = begin + (rows[1] - rows[0]) * row_len * raw_dtype.itemsize
            shape = (rows[1] - rows[0], row_len)
        count = (end - begin) // raw_dtype.itemsize
        out = buffer.get(count) if out is None else float32_out(out, count)
        if raw_dtype == np.float32:
            read_tensor_bytes(self._fd, out, begin, self.path, name)
        else:
            step = _CHUNK_BYTES // raw_dtype.itemsize
            raw = np.empty(min(step, count), dtype=raw_dtype)
            for start in range(0, count, step):
                part = raw[: min(step, count - start)]
                read_tensor_bytes(self._fd, part, begin + start * raw_dtype.itemsize, self.path, name)
                if dtype_name == "BF16":
                    bf16_bits_to_f32(part, out[start:start + part.size])
                else:
                    np.copyto(out[start:start + part.size], part, casting="unsafe")
        return out.reshape(shape)

    def f32_extent(self, name: str, row0: int = 0, rows: int | None = None) -> tuple[int, int, int] | None:
        """(fd, offset, nbytes) of a tensor (or of its rows [row0, row0 + rows)) stored as
        little-endian f32, else None."""
        dtype_name, shape, begin, end = self.tensors[name]
        if dtype_name != "F32":
            return None
        if rows is None:
            return self._fd, begin, end - begin
        row_bytes = (shape[-1] if shape else 1) * 4
        return self._fd, begin + row0 * row_bytes, rows * row_bytes

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SafetensorsCheckpoint:
    """model.safetensors, a sharded model.safetensors.index.json, or every *.safetensors in a folder."""

    def __init__(self, path: Path, files: list[Path], weight_map: dict[str, str] | None = None):
        self.path = path
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        self._buffer = _Buffer()
        try:
            for f in files:
                sf = self._files[f.name] = SafetensorsFile(f)
                for name in sf.tensors:
                    if name in self._where:
                        raise NetpError(f, f"tensor {name} also appears in {self._where[name].path.name}")
                    self._where[name] = sf
            for name, file_name in (weight_map or {}).items():
                if name not in self._where:
                    raise NetpError(path, f"index lists tensor {name} in {file_name}, which does not hold it")
        except BaseException:
            self.close()
            raise

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].tensors[name][1]

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read_into(name, self._buffer)

    def read_rows(self, name: str, row0: int, rows: int, out: np.ndarray | None = None) -> np.ndarray:
        return self._where[name].read_into(name, self._buffer, (row0, row0 + rows), out)

    def f32_extent(self, name: str, row0: int = 0, rows: int | None = None) -> tuple[int, int, int] | None:
        """Where a tensor's (or its rows') bytes already are NE f32 data, for an in-kernel copy."""
        return self._where[name].f32_extent(name, row0, rows)

    def close(self) -> None:
        for f in self._files.values():
            f.close()


class TorchBinCheckpoint:
    """pytorch_model.bin (or its sharded index) through torch.load(weights_only=True, mmap=True)."""

    def __init__(self, path: Path, files: list[Path]):
        try:
            import torch
        except ImportError as e:
            raise NetpError(files[0], "PyTorch .bin checkpoints need torch: install netp's `torch` extra "
                                      "(pip install 'netp[torch]'), or convert the checkpoint to safetensors") from e
        self.path = path
        self._torch = torch
        self._tensors: dict[str, Any] = {}
        for f in files:
            regular_file(f, "a PyTorch checkpoint")
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as e:  # weights_only met something other than tensors
                found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
                what = f" (it references {found.group(1)})" if found else ""
                raise NetpError(f, f"refused: the pickle holds objects other than tensors{what}; netp loads .bin "
                                   "checkpoints with torch.load(weights_only=True) and never runs code from a "
                                   "checkpoint") from e
            except Exception as e:  # torch raises many kinds on a bad file
                raise NetpError(f, f"not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
            if not isinstance(state, dict):
                raise NetpError(f, f"holds a {type(state).__name__}, not a state dict of tensors")
            for name, t in state.items():
                if isinstance(t, torch.Tensor):
                    self._tensors[name] = t

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        return self._f32(name, self._tensors[name])

    def read_rows(self, name: str, row0: int, rows: int, out: np.ndarray | None = None) -> np.ndarray:
        t = self._tensors[name]
        part = t.reshape(-1, t.shape[-1])[row0:row0 + rows]
        if out is None:
            return self._f32(name, part)
        values = float32_out(out, part.numel()).reshape(part.shape)
        self._f32(name, part, values)
        return values

    def _f32(self, name: str, t: Any, out: np.ndarray | None = None) -> np.ndarray:
        torch = self._torch
        if t.dtype == torch.bfloat16:
            return bf16_bits_to_f32(t.contiguous().view(torch.int16).numpy().view(np.uint16), out)
        if not t.dtype.is_floating_point:
            raise NetpError(self.path, f"tensor {name} has dtype {t.dtype}; netp converts floating-point weights")
        if out is None:
            return np.ascontiguousarray(t.numpy(), dtype=np.float32)
        np.copyto(out, t.numpy(), casting="unsafe")
        return out

    def close(self) -> None:
        self._tensors.clear()


def _index_files(folder: Path, index: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files an index names: plain names inside `folder` only (an entry
    `../x.safetensors` or `/abs/x` is refused, not followed; the named file may be
    a symlink, as every file of a Hugging Face cache snapshot is)."""
    data = read_json(index, what="a checkpoint index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise NetpError(index, "not a checkpoint index: no \"weight_map\" object of tensor -> file")
    for name, file_name in weight_map.items():
        plain_name(file_name, index, f"entry for tensor {name:.80}: file")
    files = [folder / f for f in dict.fromkeys(weight_map.values())]
    for f in files:
        if not f.exists():
            raise NetpError(index, f"names shard {f.name}, which is not in {folder}")
    return files, weight_map


def open_checkpoint(folder: Path) -> Checkpoint:
    """The weights of an HF model folder: safetensors first (like transformers), then .bin."""
    # lexists: a FIFO or device under a checkpoint's name is refused by name, not skipped
    if os.path.lexists(folder / SAFETENSORS_INDEX):
        files, weight_map = _index_files(folder, folder / SAFETENSORS_INDEX)
        return SafetensorsCheckpoint(folder, files, weight_map)
    singles = sorted(folder.glob("*.safetensors"))
    if singles:
        return SafetensorsCheckpoint(folder, singles)
    if os.path.lexists(folder / BIN_INDEX):
        files, _ = _index_files(folder, folder / BIN_INDEX)
        return TorchBinCheckpoint(folder, files)
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return TorchBinCheckpoint(folder, bins)
    raise NetpError(folder, "holds no weights (no *.safetensors, model.safetensors.index.json or pytorch_model.bin)")
