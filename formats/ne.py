"""The NE model file (neural-speed's format): a lazy reader and a streaming writer.

Layout (little-endian): magic `tjgg`, the header of NE_HEADER_FIELDS, n_vocab
vocab entries (i length, bytes, f score), then tensor records until EOF:
i n_dims, i name length, i ggml type, n_dims ints of ne (fastest-varying
first, the numpy shape reversed), the name, zero padding to a multiple of 32
of the file offset, the raw data.

Shapes in this module are numpy order (slowest-varying first); the file
stores them reversed. Quantized rows are `row_nbytes` bytes along ne[0].
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import mmap
import os
import struct
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, ClassVar, Protocol, Sequence

import numpy as np

from netp.errors import NetpError
from netp.formats import atomic
from netp.formats.constants import (
    FTYPE_OF_TYPE, GGMLType, NE_ALIGNMENT, NE_FILE_VERSION, NE_HEADER_FIELDS, NE_HEADER_STRUCT,
    NE_MAGIC, NE_MAX_DIMS, NE_TENSOR_HEAD, SUPPORTED_TYPES, block_geometry,
)
from netp.formats.fileio import drop_mapped_pages, read_exact_at
from netp.formats.paths import regular_file

if TYPE_CHECKING:
    class NEHeader:
        """What the type checker knows of the dataclass made below from the field table."""

        __dataclass_fields__: ClassVar[dict[str, Any]]

        def __init__(self, *values: Any, **fields: Any) -> None: ...

        def __getattr__(self, name: str) -> Any: ...
else:
    NEHeader = make_dataclass(
        "NEHeader",
        [(name, int if fmt == "i" else float, field(default=default)) for name, fmt, default in NE_HEADER_FIELDS],
    )
    NEHeader.__doc__ = "The NE header after the magic; fields as in constants.NE_HEADER_FIELDS."

Vocab = list[tuple[bytes, float]]  # (token bytes, score) per token id

_INT = struct.Struct("<i")
_VOCAB_SCORE = struct.Struct("<f")
_MAX_NAME = 4096


_INT32 = (-(1 << 31), (1 << 31) - 1)
_F32_MAX: float = float(np.finfo(np.float32).max)


def header_to_bytes(header: Any, path: str | os.PathLike | None = None) -> bytes:
    """The magic and header; a value its int32/f32 field cannot hold is a NetpError
    naming `path` and the field (struct would raise, or silently round to inf)."""
    for name, fmt, _ in NE_HEADER_FIELDS:
        value = getattr(header, name)
        if fmt == "i" and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                           or not _INT32[0] <= value <= _INT32[1]):
            raise NetpError(path, f"header field {name} = {value!r:.40} does not fit the NE header's int32")
        if fmt == "f" and (not isinstance(value, (int, float, np.floating)) or not math.isfinite(value)
                           or abs(float(value)) > _F32_MAX):
            raise NetpError(path, f"header field {name} = {value!r:.40} is not a finite float32")
    return NE_MAGIC + NE_HEADER_STRUCT.pack(*dataclasses.astuple(header))


def vocab_to_bytes(vocab: Sequence[tuple[bytes, float]]) -> bytes:
    parts: list[bytes] = []
    for text, score in vocab:
        parts += (_INT.pack(len(text)), text, _VOCAB_SCORE.pack(score))
    return b"".join(parts)


def aligned(offset: int) -> int:
    return -(-offset // NE_ALIGNMENT) * NE_ALIGNMENT


def tensor_nbytes(ggml_type: GGMLType, shape: Sequence[int]) -> int:
    block, block_bytes = block_geometry(ggml_type)
    n = math.prod(shape)
    return n // block * block_bytes


def tensor_record(name: str, ggml_type: GGMLType, shape: Sequence[int], pos: int) -> bytes:
    """A tensor's record before its data, written at file offset `pos`: n_dims, name
    length, type, ne, the name and the zero padding that aligns the data."""
    raw_name = name.encode("utf-8")
    ne = tuple(reversed([int(d) for d in shape]))
    head = NE_TENSOR_HEAD.pack(len(ne), len(raw_name), int(ggml_type)) + struct.pack(f"<{len(ne)}i", *ne) + raw_name
    return head + bytes(aligned(pos + len(head)) - pos - len(head))


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in an NE file."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]  # numpy order: shape[-1] is ne[0], the row length
    offset: int  # absolute file offset of the data
    nbytes: int

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def row_nbytes(self) -> int:
        return self.nbytes // self.n_rows

    @property
    def is_quantized(self) -> bool:
        return self.ggml_type not in (GGMLType.F32, GGMLType.F16)


class NEContents(Protocol):
    """An NE file as the stages that stream one read it: an NEReader, or a StreamedNE
    (an NE file that exists only as bytes in flight)."""

    path: Path
    header: Any
    vocab: Vocab
    tensors: dict[str, TensorInfo]
    file_size: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def read_into(self, offset: int, out: np.ndarray) -> None:
        """Fill `out` (uint8) with the file's bytes from `offset`."""
        ...


_NUMPY_DTYPE: dict[GGMLType, np.dtype] = {GGMLType.F32: np.dtype("<f4"), GGMLType.F16: np.dtype("<f2")}


class NEReader:
    """An NE file's header, vocab and tensor index; tensor data on demand.

    Opening parses and validates every record (magic, version, sizes against
    the file, known types, UTF-8 names) without reading tensor data, so a
    corrupt file is refused before any large allocation. Data comes either as
    views into one read-only memory map (`view`) or read into fresh buffers
    (`read`, for --no_mmap and streaming stages that must not keep pages).
    """

    def __init__(self, path: str | os.PathLike, on_open: Callable[[int, int], None] | None = None):
        """on_open(fd, size): called once the file is open, before it is parsed (the runtime starts
        hashing the very file opened here while the header and vocab are read)."""
        self.path = Path(path)
        self._mmap: mmap.mmap | None = None
        regular_file(self.path, "an NE file")  # a FIFO or device is refused before it is opened
        self._file: BinaryIO = open(self.path, "rb")
        try:
            self.file_size = os.fstat(self._file.fileno()).st_size
            if on_open is not None:
                on_open(self._file.fileno(), self.file_size)
            self._parse()
        except BaseException:
            self._file.close()
            raise

    # -- parsing -------------------------------------------------------------
    def _bad(self, what: str) -> NetpError:
        return NetpError(self.path, what)

    def _read_exact(self, n: int, what: str) -> bytes:
        b = self._file.read(n)
        if len(b) != n:
            raise self._bad(f"truncated: file ends inside {what}")
        return b

    def _parse(self) -> None:
        f = self._file
        magic = f.read(len(NE_MAGIC))
        if magic != NE_MAGIC:
            raise self._bad(f"not an NE model file (magic {magic!r}, expected {NE_MAGIC!r})")
        values = NE_HEADER_STRUCT.unpack(self._read_exact(NE_HEADER_STRUCT.size, "the header"))
        self.header = NEHeader(*values)
        h = self.header
        if h.version != NE_FILE_VERSION:
            raise self._bad(f"unsupported NE file version {h.version} (netp reads version {NE_FILE_VERSION})")
        if h.ftype not in FTYPE_OF_TYPE.values():
            raise self._bad(f"unknown ftype {h.ftype} in the header")
        for name in ("n_vocab", "n_embd", "n_head", "n_layer"):
            if getattr(h, name) <= 0:
                raise self._bad(f"header field {name} is {getattr(h, name)}, must be positive")
        # Each vocab entry takes at least 8 bytes: refuse an impossible count
        # before allocating for it.
        if h.n_vocab * 8 > self.file_size:
            raise self._bad(f"header claims {h.n_vocab} vocab entries, more than the file's {self.file_size} bytes hold")
        self.vocab = self._parse_vocab(h.n_vocab)
        self.tensors: dict[str, TensorInfo] = {}
        self._parse_tensors()

    def _parse_vocab(self, n: int) -> Vocab:
        # One read of the rest of the small sections would be faster, but the
        # vocab length is only known by walking it; read in modest chunks.
        f = self._file
        vocab: Vocab = []
        buf = f.read(min(self.file_size, 1 << 20))
        pos = 0
        base = f.tell() - len(buf)
        for i in range(n):
            if pos + 4 > len(buf):
                buf, pos, base = self._refill(buf, pos, base, 4)
                if pos + 4 > len(buf):
                    raise self._bad(f"truncated: file ends inside vocab entry {i}")
            (length,) = _INT.unpack_from(buf, pos)
            if length < 0 or length > 1 << 16:
                raise self._bad(f"vocab entry {i} has impossible length {length}")
            need = 4 + length + 4
            if pos + need > len(buf):
                buf, pos, base = self._refill(buf, pos, base, need)
                if pos + need > len(buf):
                    raise self._bad(f"truncated: file ends inside vocab entry {i}")
            text = bytes(buf[pos + 4: pos + 4 + length])
            (score,) = _VOCAB_SCORE.unpack_from(buf, pos + 4 + length)
            vocab.append((text, score))
            pos += need
        f.seek(base + pos)
        return vocab

    def _refill(self, buf: bytes, pos: int, base: int, need: int) -> tuple[bytes, int, int]:
        rest = buf[pos:]
        more = self._file.read(max(1 << 20, need))
        return rest + more, 0, base + pos

    def _parse_tensors(self) -> None:
        f = self._file
        pos = f.tell()
        self.tensor_data_start = None
        while pos < self.file_size:
            head = f.read(NE_TENSOR_HEAD.size)
            if len(head) != NE_TENSOR_HEAD.size:
                raise self._bad(f"truncated: file ends inside a tensor record at offset {pos}")
            n_dims, name_len, type_id = NE_TENSOR_HEAD.unpack(head)
            if not 1 <= n_dims <= NE_MAX_DIMS:
                raise self._bad(f"tensor record at offset {pos} has {n_dims} dimensions (1..{NE_MAX_DIMS} allowed)")
            if not 1 <= name_len <= _MAX_NAME:
                raise self._bad(f"tensor record at offset {pos} has a name of {name_len} bytes")
            try:
                ggml_type = GGMLType(type_id)
            except ValueError:
                ggml_type = None
            if ggml_type not in SUPPORTED_TYPES:
                raise self._bad(f"tensor record at offset {pos} has unsupported ggml type {type_id}")
            ne = struct.unpack(f"<{n_dims}i", self._read_exact(4 * n_dims, "a tensor shape"))
            raw_name = self._read_exact(name_len, "a tensor name")
            try:
                name = raw_name.decode("utf-8")
            except UnicodeDecodeError as e:
                raise self._bad(f"tensor record at offset {pos} has a name that is not UTF-8") from e
            if any(d <= 0 for d in ne):
                raise self._bad(f"tensor {name} has a non-positive dimension {list(ne)}")
            block, _ = block_geometry(ggml_type)
            if ne[0] % block:
                raise self._bad(f"tensor {name}: row length {ne[0]} is not a multiple of the {ggml_type.name} block ({block})")
            shape = tuple(reversed(ne))
            offset = aligned(f.tell())
            nbytes = tensor_nbytes(ggml_type, shape)
            if offset + nbytes > self.file_size:
                raise self._bad(
                    f"truncated: tensor {name} needs bytes {offset}..{offset + nbytes}, file has {self.file_size}")
            if name in self.tensors:
                raise self._bad(f"tensor {name} appears twice")
            self.tensors[name] = TensorInfo(name, ggml_type, shape, offset, nbytes)
            if self.tensor_data_start is None:
                self.tensor_data_start = pos
            pos = offset + nbytes
            f.seek(pos)
        if not self.tensors:
            raise self._bad("has no tensors (truncated after the vocab?)")

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> numpy shape, in file order (what models.ne_model checks against the header)."""
        return {name: t.shape for name, t in self.tensors.items()}

    # -- data ----------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError as e:
            raise NetpError(self.path, f"missing tensor {name}") from e

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def shaped(self, info: TensorInfo, flat: np.ndarray) -> np.ndarray:
        """A tensor's bytes (flat uint8) as `view` and `read` return them."""
        if info.ggml_type in _NUMPY_DTYPE:
            return flat.view(_NUMPY_DTYPE[info.ggml_type]).reshape(info.shape)
        return flat.reshape(*info.shape[:-1], info.row_nbytes)

    def view(self, name: str) -> np.ndarray:
        """Zero-copy view into the memory map: f32/f16 in the tensor's shape,
        quantized types as uint8 rows of blocks."""
        info = self.info(name)
        flat = np.frombuffer(self._map(), dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return self.shaped(info, flat)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Read a tensor (or a range of its leading-axis rows) into a new array."""
        info = self.info(name)
        lead = info.shape[0]
        start, stop = rows if rows is not None else (0, lead)
        if not 0 <= start <= stop <= lead:
            raise ValueError(f"rows {start}:{stop} outside {name} with {lead} rows")
        per_row = info.nbytes // lead
        out = np.empty(per_row * (stop - start), dtype=np.uint8)
        self.read_into(info.offset + start * per_row, out)
        shape = (stop - start, *info.shape[1:])
        return self.shaped(dataclasses.replace(info, shape=shape, nbytes=out.size), out)

    def read_into(self, offset: int, out: np.ndarray) -> None:
        """Fill `out` (a writable uint8 buffer) with file bytes from `offset`."""
        read_exact_at(self._file.fileno(), out, offset, self.path, f"truncated: short read at offset {offset}")

    def release_pages(self, name: str | None = None) -> None:
        """Drop this process's hold on the mapped pages of tensor `name` (None: the whole file)
        read so far (MADV_DONTNEED): they stay in the page cache and fault back in when touched
        again, so a reader whose tensors were copied out (the runtime's tiles) does not count
        the file in its RSS as well."""
        if self._mmap is None:
            return
        if name is None:
            drop_mapped_pages(self._mmap)
        else:
            info = self.info(name)
            drop_mapped_pages(self._mmap, info.offset, info.nbytes)

    def fileno(self) -> int:
        """The open file's descriptor (for pread-based reads such as hashing)."""
        return self._file.fileno()

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # views still alive; the map closes when they are gone
            self._mmap = None
        self._file.close()

    def __enter__(self) -> "NEReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamedNE:
    """An NE file that is never written whole: its layout computed from the header,
    vocab and tensor records, its tensor bytes produced on demand. It reads like an
    NEReader (header, vocab, tensors, file_size, read_into), so a stage that streams
    an NE file (shard) can stream one that exists only as bytes in flight.

    `fill(info, row0, out)` writes rows [row0, row0 + out.size // row bytes) of tensor
    `info` into uint8 buffer `out`; a row is ne[0] values (one row for a 1-D tensor).
    Reads of tensor data come in file order, each within one tensor."""

    def __init__(self, path: str | os.PathLike, header: Any, vocab: Vocab,
                 tensors: Sequence[tuple[str, GGMLType, Sequence[int]]], fill: Any):
        self.path = Path(path)
        prefix = header_to_bytes(header) + vocab_to_bytes(vocab)
        # The header as a reader of these bytes sees it (floats rounded to f32).
        self.header = NEHeader(*NE_HEADER_STRUCT.unpack_from(prefix, len(NE_MAGIC)))
        self.vocab, self._fill = vocab, fill
        self._gaps: list[tuple[int, bytes]] = []  # (offset, bytes) of everything but tensor data
        self.tensors: dict[str, TensorInfo] = {}
        pos, pending = 0, prefix
        for name, ggml_type, shape in tensors:
            record = pending + tensor_record(name, ggml_type, shape, pos + len(pending))
            self._gaps.append((pos, record))
            pos += len(record)
            self.tensors[name] = TensorInfo(name, GGMLType(ggml_type), tuple(shape), pos,
                                            tensor_nbytes(ggml_type, shape))
            pos += self.tensors[name].nbytes
            pending = b""
        self.file_size = pos
        self._data = list(self.tensors.values())  # tensor i's data follows gap i

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: t.shape for name, t in self.tensors.items()}

    def read_into(self, offset: int, out: np.ndarray) -> None:
        n = out.nbytes
        i = bisect.bisect_right(self._gaps, offset, key=lambda g: g[0]) - 1
        gap_at, gap = self._gaps[i]
        if offset + n <= gap_at + len(gap):
            out[:] = np.frombuffer(gap, dtype=np.uint8, count=n, offset=offset - gap_at)
            return
        info = self._data[i]
        row_bytes = info.nbytes if len(info.shape) == 1 else info.row_nbytes
        start = offset - info.offset
        if start < 0 or start % row_bytes or n % row_bytes or start + n > info.nbytes:
            raise ValueError(f"read of {n} bytes at {offset} is not whole rows of tensor {info.name}")
        self._fill(info, start // row_bytes, out)

class NEWriter:
    """Write an NE file one tensor at a time under a temporary name.

    Use as a context manager: on a clean exit the file is flushed, fsynced
    and renamed to `path`; on an exception the temporary file is removed, so
    `path` never holds a half-written model. `hasher` (anything with
    .update) sees every byte written, for checksums computed on the way.
    The header is checked before the file is created, and a failed write
    (ENOSPC, EIO) is a NetpError naming `path` (docs/design.md §8).
    """

    def __init__(self, path: str | os.PathLike, header: Any, vocab: Sequence[tuple[bytes, float]],
                 hasher: Any = None):
        self.path = Path(path)
        if len(vocab) != header.n_vocab:
            raise ValueError(f"vocab has {len(vocab)} entries, header says {header.n_vocab}")
        head = header_to_bytes(header, self.path) + vocab_to_bytes(vocab)
        atomic.clean_stale_partials(self.path)
        self.tmp_path = atomic.partial_name(self.path)
        self._hasher = hasher
        self._pos = 0
        self._pending: tuple[str, int] | None = None  # tensor being streamed: name, bytes left
        self.names: list[str] = []
        try:
            self._f: BinaryIO = open(self.tmp_path, "wb", buffering=1 << 20)
        except OSError as e:
            raise atomic.write_error(self.path, e) from e
        try:
            self._write(head)
        except BaseException:
            self.abort()
            raise

    def _write(self, b: Any) -> None:
        mv = memoryview(b).cast("B")
        try:
            self._f.write(mv)
        except OSError as e:
            raise atomic.write_error(self.path, e) from e
        if self._hasher is not None:
            self._hasher.update(mv)
        self._pos += mv.nbytes

    @property
    def tell(self) -> int:
        return self._pos

    def begin_tensor(self, name: str, ggml_type: GGMLType, shape: Sequence[int]) -> int:
        """Write a tensor's record header; its data follows via `write`. Returns the data offset."""
        if self._pending is not None:
            raise RuntimeError(f"tensor {self._pending[0]} is not complete")
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        ggml_type = GGMLType(ggml_type)
        block, _ = block_geometry(ggml_type)
        if shape[-1] % block:
            raise ValueError(f"{name}: row length {shape[-1]} is not a multiple of the {ggml_type.name} block")
        if not all(0 < int(d) <= _INT32[1] for d in shape):
            raise NetpError(self.path, f"tensor {name}: shape {list(shape)} does not fit the NE format's int32 sizes")
        self._write(tensor_record(name, ggml_type, shape, self._pos))
        self._pending = (name, tensor_nbytes(ggml_type, shape))
        self.names.append(name)
        return self._pos

    def write(self, chunk: Any) -> None:
        """Append data of the tensor begun last (any C-contiguous buffer)."""
        if self._pending is None:
            raise RuntimeError("write() outside a tensor")
        name, left = self._pending
        n = memoryview(chunk).nbytes
        if n > left:
            raise ValueError(f"{name}: {n} bytes written, only {left} expected")
        self._write(chunk)
        self._pending = (name, left - n) if left - n else None

    def copy_from(self, fd: int, offset: int, nbytes: int) -> None:
        """Append `nbytes` of the tensor begun last straight from file `fd` at
        `offset`: an in-kernel copy (os.copy_file_range) when nothing hashes
        the bytes, else read in chunks. The bytes never enter this process."""
        if self._pending is None or nbytes > self._pending[1]:
            raise ValueError(f"copy_from: {nbytes} bytes do not fit the tensor being written")
        done = 0
        if self._hasher is None and hasattr(os, "copy_file_range"):
            try:
                self._f.flush()
            except OSError as e:
                raise atomic.write_error(self.path, e) from e
            out = self._f.fileno()
            try:
                while done < nbytes:
                    n = os.copy_file_range(fd, out, nbytes - done, offset + done)
                    if n <= 0:
                        raise EOFError(f"source ends {nbytes - done} bytes short")
                    done += n
            except OSError as e:
                if e.errno in atomic.WRITE_ERRNOS:
                    raise atomic.write_error(self.path, e) from e
                # else e.g. a filesystem without it: the rest goes through a buffer below
            finally:
                self._pos += done
                self._f.seek(self._pos)  # resync the buffered writer with the advanced fd
                name, left = self._pending
                self._pending = (name, left - done) if left - done else None
        while done < nbytes:
            chunk = os.pread(fd, min(16 << 20, nbytes - done), offset + done)
            if not chunk:
                raise EOFError(f"source ends {nbytes - done} bytes short")
            self.write(chunk)
            done += len(chunk)

    def add_tensor(self, name: str, ggml_type: GGMLType, shape: Sequence[int], data: Any) -> None:
        """Write a whole tensor whose bytes are `data` (array or bytes)."""
        self.begin_tensor(name, ggml_type, shape)
        self.write(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data)
        if self._pending is not None:
            raise ValueError(f"{name}: {self._pending[1]} bytes missing")

    def sync(self) -> None:
        """Flush and fsync the temporary file: after this only the rename is left, so a
        companion (the tokenizer folder) may go into place first. A full disk fails here."""
        if self._pending is not None:
            raise RuntimeError(f"tensor {self._pending[0]} is not complete")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            self.abort()
            raise atomic.write_error(self.path, e) from e

    def commit(self) -> None:
        self.sync()
        try:
            self._f.close()
            atomic.replace(self.tmp_path, self.path)
        except OSError as e:
            self.abort()
            raise atomic.write_error(self.path, e) from e

    def abort(self) -> None:
        """Drop the temporary file. Closing flushes the buffer, which fails on a
        full disk: the unlink must happen all the same."""
        try:
            self._f.close()
        except OSError:
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "NEWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

