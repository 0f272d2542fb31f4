"""GGUF input through gguf-py: the metadata as a dict, tensors dequantized
to float32 one at a time with gguf.quants.dequantize.

GGUFReader memory-maps the file and hands out views; after a tensor is
dequantized its pages are dropped from this process (madvise DONTNEED),
so reading every tensor does not leave the whole file resident.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from netp.errors import NetpError
from netp.formats.fileio import drop_mapped_pages, float32_out
from netp.formats.paths import regular_file

_STEP_VALUES = 1 << 20  # values dequantized per step when reading rows into a caller's buffer


def open_gguf_reader(path: Path) -> Any:
    """gguf-py's GGUFReader on `path`, its failures turned into one NetpError.

    GGUFReader memory-maps the file and walks it with numpy views, so a
    header that claims more than the file holds is never allocated: the walk
    runs off the end and raises (IndexError, ValueError, struct.error...),
    which here becomes "truncated or corrupt"."""
    import gguf

    regular_file(path, "a GGUF file")  # a FIFO or device is refused before it is opened
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        size = path.stat().st_size
        raise NetpError(path, f"not a readable GGUF file: truncated or corrupt ({size} bytes; gguf-py: "
                              f"{type(e).__name__}: {e})") from e


def field_value(reader: Any, name: str, path: Path) -> Any:
    """One metadata value, decoded by gguf-py; a value it parsed but cannot decode
    (invalid UTF-8 in a string...) is a corrupt file."""
    try:
        return reader.fields[name].contents()
    except Exception as e:
        raise NetpError(path, f"not a readable GGUF file: corrupt metadata value {name!r} "
                              f"({type(e).__name__}: {e})") from e


class GGUFFile:
    """A GGUF file: `.metadata` (key -> value), tensor names, numpy shapes, f32 data."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._reader = open_gguf_reader(self.path)
        self.metadata: dict[str, Any] = {name: field_value(self._reader, name, self.path)
                                         for name in self._reader.fields if not name.startswith("GGUF.")}
        self._tensors = {t.name: t for t in self._reader.tensors}

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise NetpError(self.path, "GGUF metadata lacks general.architecture")
        return arch

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # gguf-py lists ne (fastest-varying first); numpy order is the reverse.
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def read(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        return self._dequantize(name, t.data, int(t.data_offset)).reshape(self.shape(name))

    def read_rows(self, name: str, row0: int, rows: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [row0, row0 + rows) of the tensor seen as (rows, ne[0]): one expert of a
        merged ffn_*_exps tensor, or one chunk of a streamed tensor, is dequantized (and
        its pages touched) alone; into `out` (float32, rows x ne[0] values) when given."""
        t = self._tensors[name]
        data = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data.reshape(1, -1)
        part = data[row0:row0 + rows]
        offset = int(t.data_offset) + row0 * part.strides[0]
        shape = (rows, self.shape(name)[-1])
        if out is None:
            return self._dequantize(name, part, offset).reshape(shape)
        out = float32_out(out, rows * shape[1]).reshape(shape)
        step = max(1, _STEP_VALUES // shape[1])  # gguf-py's temporaries stay a few times one step
        for r in range(0, rows, step):
            self._dequantize(name, part[r:r + step], offset + r * part.strides[0], out[r:r + step])
        return out

    def _dequantize(self, name: str, data: Any, offset: int, out: np.ndarray | None = None) -> np.ndarray:
        import gguf

        t = self._tensors[name]
        try:
            values = gguf.quants.dequantize(data, t.tensor_type)
        except NotImplementedError as e:
            raise NetpError(self.path, f"tensor {name} has type {t.tensor_type.name}, which gguf-py cannot "
                                       "dequantize") from e
        except Exception as e:
            raise NetpError(self.path, f"tensor {name}: cannot dequantize ({type(e).__name__}: {e})") from e
        if out is not None:
            np.copyto(out, values.reshape(out.shape), casting="unsafe")
        else:
            out = np.ascontiguousarray(values, dtype=np.float32)
            if np.may_share_memory(out, self._reader.data):
                out = out.copy()  # f32 tensors come back as views of the map: copy before dropping its pages
        self._drop_pages(offset, int(data.nbytes))
        return out

    def _drop_pages(self, offset: int, nbytes: int) -> None:
        raw = getattr(self._reader.data, "_mmap", None)
        if raw is None or not hasattr(raw, "madvise"):
            return
        with contextlib.suppress(OSError, ValueError):
            drop_mapped_pages(raw, offset, nbytes)

    def close(self) -> None:
        self._tensors.clear()
        data = getattr(self._reader, "data", None)
        raw = getattr(data, "_mmap", None)
        self._reader = None
        if raw is not None:
            with contextlib.suppress(BufferError, ValueError):
                raw.close()
