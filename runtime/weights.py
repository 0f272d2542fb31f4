"""What a rank's forward holds: its weights, in the form docs/design.md §5 chooses.

- q4_0 / q4_1 / q8_0 matrix slices stay in block form for the whole run:
  the NE tensors one product reads (q|k|v, gate|up) are stacked by rows and
  repacked once, at load, by -t threads, into the kernels' tiles
  (netp.runtime.kernels; exactly the file's bytes, q4_0 0.5625 per weight,
  / N ranks). No f32 copy of a quantized matrix ever exists.
- f32 matrices stay f32 and f16 ones are widened at load, stored
  transposed, (in, out), for numpy/OpenBLAS (see models.layers.linear).
- The token embedding always stays in file form (memory-mapped unless
  --no_mmap) and only the rows looked up are dequantized.
No rank ever holds another rank's slices: everything comes from its RankSource.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from netp.errors import NetpError
from netp.formats.constants import GGMLType, block_geometry
from netp.models.layers import linear
from netp.quantize.codecs import dequantize_rows
from netp.runtime import kernels
from netp.runtime.sources import RankSource

_CHUNK_VALUES = 1 << 20  # f16 widening: values per piece (4 MB of f32, cache-friendly)


class BlockMatrix:
    """A (rows, n_in) quantized matrix in the kernels' tiles; `apply(x)` = x @ W.T."""

    def __init__(self, tiles: kernels.TiledBlocks, exact: bool, threads: int, partial: bool):
        self.tiles, self.exact, self.threads, self.partial = tiles, exact, threads, partial
        self.shape, self.nbytes = tiles.shape, tiles.nbytes

    def apply(self, x: np.ndarray) -> np.ndarray:
        """partial (a column-split slice): the f64 sum the all-reduce rounds to f32 after adding the ranks'."""
        return kernels.matmul(x, self.tiles, exact=self.exact, threads=self.threads, partial=self.partial)


class StackedMatrix:
    """Stacked NE tensors of different forms (say q4_0 and f32): each group's product, side by side."""

    def __init__(self, groups: list[Any]):
        self.groups = groups
        self.nbytes = sum(g.nbytes for g in groups)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([linear(x, g) for g in self.groups], axis=1)


class EmbeddingTable:
    """The token embedding in file form; `rows(ids)` dequantizes only those rows."""

    def __init__(self, data: np.ndarray, t: GGMLType):
        self.data, self.type = data, t

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return np.array(dequantize_rows(self.data[np.asarray(ids)], self.type), dtype=np.float32, copy=False)


class RankWeights:
    """One rank's weights, by the forward's names (Architecture.runtime_tensors).

    resident_bytes: the weights this rank holds in its own memory (tiles,
    f32 matrices, norms; the embedding table too under --no_mmap)."""

    def __init__(self, source: RankSource, use_mmap: bool = True, nthread: int = 1, exact: bool = False):
        self._setup(source, use_mmap, nthread, exact)
        arch = source.arch
        emb = source.part(arch.embedding_name, mapped=use_mmap)
        assert emb is not None  # replicated: every rank holds it
        self.embedding = EmbeddingTable(emb, source.type_of(arch.embedding_name))
        if not use_mmap:
            self.resident_bytes += emb.nbytes  # --no_mmap: the table is read into memory
        self._globals = self._assemble(arch.runtime_tensors(None, source.hp))
        self.layers = [self._assemble(arch.runtime_tensors(i, source.hp)) for i in range(source.hp.n_layer)]
        if use_mmap:  # norms and biases were copied too; only the embedding's looked-up rows are read from the map
            source.reader.release_pages()

    def _setup(self, source: RankSource, use_mmap: bool, nthread: int, exact: bool) -> None:
        self.source, self.use_mmap, self.nthread, self.exact = source, use_mmap, nthread, exact
        # the hash checking the file is one of the rank's -t threads while it runs (docs/design.md §5, Load)
        self.load_threads = max(1, nthread - 1) if source.checking else nthread
        self.resident_bytes = 0
        self.matrix_types: set[str] = set()
        self.kernels: kernels.WarmUp | None = None  # set when a quantized matrix needed the kernels
        if not source.has(source.arch.embedding_name):
            raise NetpError(source.path, f"missing tensor {source.arch.embedding_name}")

    @property
    def globals(self) -> dict[str, Any]:
        return self._globals

    def layer(self, i: int) -> dict[str, Any]:
        return self.layers[i]

    def _embedding_rows(self, start: int, stop: int) -> np.ndarray:
        """Vocab rows [start, stop) of the embedding in file form (a tied model's output head)."""
        return self.embedding.data[start:stop]

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return self.embedding.rows(tokens)

    @property
    def mode(self) -> str:
        blocks = sorted(t for t in self.matrix_types if t not in ("f32", "f16"))
        dense = sorted(t for t in self.matrix_types if t in ("f32", "f16"))
        forms = []
        if blocks:
            forms.append("/".join(blocks) + (" blocks, exact f32 activations" if self.exact else " blocks"))
        if dense:
            forms.append("f32" + (" (f16 widened at load)" if "f16" in dense else ""))
        return " + ".join(forms)

    def _part(self, name: str, mapped: bool) -> tuple[np.ndarray, GGMLType] | None:
        src = self.source
        if not src.has(name):
            if name == src.arch.output_name:  # tied embeddings: the output head is the embedding's vocab rows
                v0, v1 = src.mapping.vocab()
                return self._embedding_rows(v0, v1), src.type_of(src.arch.embedding_name)
            raise NetpError(src.path, f"missing tensor {name}")
        data = src.part(name, mapped=mapped)
        return None if data is None else (data, src.type_of(name))

    def _assemble(self, layout: dict[str, tuple[str, ...]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, names in layout.items():
            # blocks are repacked from the mapping (or a read under --no_mmap); dense ones are read as today
            found = [self._part(n, mapped=self.use_mmap) for n in names]
            parts = [p for p in found if p is not None]
            if not parts:
                out[key] = None  # a rank-0-only bias on another rank
                continue
            if len(parts) < len(found):
                raise NetpError(self.source.path, f"{', '.join(names)}: held only partly by this rank")
            if parts[0][0].ndim == 1:  # norms and biases: small, f32
                vector = np.concatenate([dequantize_rows(raw, t).astype(np.float32, copy=False)
                                         for raw, t in parts])
                self.resident_bytes += vector.nbytes
                out[key] = vector
                continue
            self.matrix_types.update(t.name.lower() for _, t in parts)
            partial = self.source.arch.split_rule(names[0]).kind == "cols"  # its products get all-reduced
            groups = [self._matrix(group, partial) for group in _runs_of_one_form(parts)]
            matrix = groups[0] if len(groups) == 1 else StackedMatrix(groups)
            if self.use_mmap:  # copied out: its mapped pages need not stay in this rank's RSS
                for n in names:
                    if n in self.source.reader.tensors:  # not a tied head's embedding rows
                        self.source.reader.release_pages(n)
            self.resident_bytes += matrix.nbytes
            out[key] = matrix
        return out

    def _matrix(self, parts: list[tuple[np.ndarray, GGMLType]], partial: bool) -> Any:
        t = parts[0][1]
        n_in = _values_per_row(*parts[0])
        if t not in kernels.KERNEL_TYPES:
            return _dense_transposed(parts, n_in, self.load_threads)
        if self.kernels is None:
            self.kernels = kernels.warm_up()
        tiles = kernels.tile([raw for raw, _ in parts], t, threads=self.load_threads)
        return BlockMatrix(tiles, self.exact, self.nthread, partial)


def _runs_of_one_form(parts: list[tuple[np.ndarray, GGMLType]]) -> list[list[tuple[np.ndarray, GGMLType]]]:
    """Consecutive parts that one product can take together: the same block type, or dense (f32/f16) ones."""
    def form(t: GGMLType) -> str:
        return t.name if t in kernels.KERNEL_TYPES else "dense"

    runs: list[list[tuple[np.ndarray, GGMLType]]] = []
    for p in parts:
        if runs and form(runs[-1][-1][1]) == form(p[1]):
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _dense_transposed(parts: list[tuple[np.ndarray, GGMLType]], n_in: int, nthread: int) -> np.ndarray:
    """f32/f16 parts' rows stacked as f32, stored transposed: (n_in, rows).
    Widened a chunk of rows at a time, so no second full-size copy exists."""
    value = np.empty((n_in, sum(raw.shape[0] for raw, _ in parts)), dtype=np.float32)
    step = max(1, _CHUNK_VALUES // n_in)
    at = 0
    for raw, t in parts:
        for a in range(0, raw.shape[0], step):
            b = min(raw.shape[0], a + step)
            value[:, at + a:at + b] = dequantize_rows(raw[a:b], t, nthread=nthread).T
        at += raw.shape[0]
    return value


def _values_per_row(raw: np.ndarray, t: GGMLType) -> int:
    """Row length in values of a file-form matrix (f32/f16 arrive typed, blocks as bytes)."""
    if t in (GGMLType.F32, GGMLType.F16):
        return raw.shape[-1]
    block, block_bytes = block_geometry(t)
    return raw.shape[-1] // block_bytes * block
