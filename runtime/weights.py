"""What a rank's forward holds: its weights, in the form docs/design.md §5 chooses.

- Default: every matrix slice the rank owns is dequantized once, at load,
  to f32, and the NE tensors one product reads are stacked into one matrix
  (q|k|v, gate|up), stored transposed (see models.layers.linear): 4 bytes
  per weight / N ranks, and decode runs at numpy's matrix-vector speed.
- `low_mem`: matrices stay in file form (blocks) and are dequantized a
  chunk of rows at a time inside every product (slow; 0.5625 bytes per
  q4_0 weight / N).
- The token embedding always stays in file form (memory-mapped unless
  --no_mmap) and only the rows looked up are dequantized.
No rank ever holds another rank's slices: everything comes from its RankSource.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from netp.errors import NetpError
from netp.formats.constants import GGMLType, block_geometry
from netp.quantize.codecs import dequantize_rows

_CHUNK_VALUES = 1 << 20  # low-mem: values dequantized per piece (4 MB of f32, cache-friendly)
_scratch = threading.local()


def _scratch_rows(rows: int, cols: int) -> np.ndarray:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < rows * cols:
        buf = _scratch.buf = np.empty(rows * cols, dtype=np.float32)
    return buf[: rows * cols].reshape(rows, cols)


class BlockMatrix:
    """A (rows, n_in) matrix kept in file form, possibly stacked from several
    tensors, dequantized a chunk of rows at a time inside each product (--low-mem)."""

    def __init__(self, parts: list[tuple[np.ndarray, GGMLType]], n_in: int):
        self.parts, self.n_in = parts, n_in
        self.shape = (sum(raw.shape[0] for raw, _ in parts), n_in)
        self.nbytes = sum(raw.nbytes for raw, _ in parts)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x (T, n_in) @ self.T -> (T, rows)."""
        out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        step = max(1, _CHUNK_VALUES // self.n_in)
        at = 0
        for raw, t in self.parts:
            for a in range(0, raw.shape[0], step):
                b = min(raw.shape[0], a + step)
                w = dequantize_rows(raw[a:b], t, out=_scratch_rows(b - a, self.n_in))
                out[:, at + a:at + b] = x @ w.T
            at += raw.shape[0]
        return out


class EmbeddingTable:
    """The token embedding in file form; `rows(ids)` dequantizes only those rows."""

    def __init__(self, data: np.ndarray, t: GGMLType):
        self.data, self.type = data, t

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return np.array(dequantize_rows(self.data[np.asarray(ids)], self.type), dtype=np.float32, copy=False)


class RankWeights:
    """One rank's weights, by the forward's names (Architecture.runtime_tensors)."""

    def __init__(self, source: Any, low_mem: bool = False, use_mmap: bool = True, nthread: int = 1):
        self.source, self.low_mem, self.use_mmap, self.nthread = source, low_mem, use_mmap, nthread
        arch = source.arch
        self.resident_bytes = 0  # bytes of weights this rank holds in its own memory
        self.matrix_types: set[str] = set()
        emb_name = arch.embedding_name
        if not source.has(emb_name):
            raise NetpError(source.path, f"missing tensor {emb_name}")
        emb = source.part(emb_name, mapped=use_mmap)
        self.embedding = EmbeddingTable(emb, source.type_of(emb_name))
        if not use_mmap:
            self.resident_bytes += emb.nbytes  # --no_mmap: the table is read into memory
        self.globals = self._assemble(arch.runtime_tensors(None))
        self.layers = [self._assemble(arch.runtime_tensors(i)) for i in range(source.hp.n_layer)]

    def layer(self, i: int) -> dict[str, Any]:
        return self.layers[i]

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return self.embedding.rows(tokens)

    @property
    def mode(self) -> str:
        kinds = "/".join(sorted(self.matrix_types))
        if self.low_mem:
            return f"{kinds} blocks, dequantized per layer per step (--low-mem)"
        return f"f32 (from {kinds}, dequantized at load)"

    def _part(self, name: str) -> tuple[np.ndarray, GGMLType] | None:
        src = self.source
        if not src.has(name):
            if name == src.arch.output_name:  # tied embeddings: the output head is the embedding's vocab rows
                v0, v1 = src.mapping.vocab()
                return self.embedding.data[v0:v1], self.embedding.type
            raise NetpError(src.path, f"missing tensor {name}")
        data = src.part(name, mapped=self.low_mem and self.use_mmap)
        return None if data is None else (data, src.type_of(name))

    def _assemble(self, layout: dict[str, tuple[str, ...]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, names in layout.items():
            parts = [self._part(n) for n in names]
            if all(p is None for p in parts):
                out[key] = None  # a rank-0-only bias on another rank
                continue
            if any(p is None for p in parts):
                raise NetpError(self.source.path, f"{', '.join(names)}: held only partly by this rank")
            if parts[0][0].ndim == 1:  # norms and biases: small, f32
                value = np.concatenate([dequantize_rows(raw, t).astype(np.float32, copy=False) for raw, t in parts])
                self.resident_bytes += value.nbytes
                out[key] = value
                continue
            self.matrix_types.update(t.name.lower() for _, t in parts)
            n_in = _values_per_row(*parts[0])
            if self.low_mem:
                value = BlockMatrix(parts, n_in)
                self.resident_bytes += value.nbytes
            else:
                value = _dense_transposed(parts, n_in, self.nthread)
                self.resident_bytes += value.nbytes
            out[key] = value
        return out


def _dense_transposed(parts: list[tuple[np.ndarray, GGMLType]], n_in: int, nthread: int) -> np.ndarray:
    """The parts' rows stacked and dequantized to f32, stored transposed: (n_in, rows).
    Dequantized a chunk of rows at a time, so no second full-size copy exists."""
    value = np.empty((n_in, sum(raw.shape[0] for raw, _ in parts)), dtype=np.float32)
    step = max(1, _CHUNK_VALUES // n_in)
    at = 0
    for raw, t in parts:
        for a in range(0, raw.shape[0], step):
            b = min(raw.shape[0], a + step)
            scratch = None if t == GGMLType.F32 else _scratch_rows(b - a, n_in)  # f32 needs no scratch
            value[:, at + a:at + b] = dequantize_rows(raw[a:b], t, out=scratch, nthread=nthread).T
        at += raw.shape[0]
    return value


def _values_per_row(raw: np.ndarray, t: GGMLType) -> int:
    """Row length in values of a file-form matrix (f32/f16 arrive typed, blocks as bytes)."""
    if t in (GGMLType.F32, GGMLType.F16):
        return raw.shape[-1]
    block, block_bytes = block_geometry(t)
    return raw.shape[-1] // block_bytes * block
