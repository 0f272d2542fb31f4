"""A reference NE file run through netp's own forward one layer at a time
(docs/design.md §5, "Layer-streamed references").

verify's references (the unsharded file, the f32 file) are as large as the
model; the shard set exists because the model does not fit one host. So a
reference runs the whole token sequence as one causal batch, and its
weights come layer by layer: layer i's tensors are read from the file
(never memory-mapped: a mapped page once read stays resident), assembled
exactly as the runtime assembles a rank's (RankWeights: blocks tiled for the
kernels, f32 stored transposed), used, and dropped when the forward asks for
layer i + 1. The output head is read when the forward reaches it, after the
last layer is dropped; of the embedding only the rows of the tokens are
read. Memory: about one layer (or the head) plus the activations.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, cast

import numpy as np

from netp.formats.constants import GGMLType
from netp.formats.ne import NEReader
from netp.models.context import ForwardTrace
from netp.quantize.codecs import dequantize_rows
from netp.runtime.comm import SoloComm
from netp.runtime.comparisons import Pass
from netp.runtime.model import RankModel
from netp.runtime.sources import NEFile, RankSource, open_rank_source
from netp.runtime.weights import RankWeights


DENSE = (GGMLType.F32, GGMLType.F16)


class EmbeddingRows:
    """The token embedding read row by row, only the rows looked up."""

    def __init__(self, reader: NEReader, name: str):
        self.reader, self.name = reader, name
        self.type = reader.tensors[name].ggml_type

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids).reshape(-1)
        unique, where = np.unique(ids, return_inverse=True)
        raw = np.concatenate([self.reader.read(self.name, rows=(int(t), int(t) + 1)) for t in unique])
        return np.asarray(dequantize_rows(raw, self.type), dtype=np.float32)[where]


class LazyRows:
    """A dense (f32/f16) matrix of the file that reads rows only when sliced: the runtime widens and
    transposes a chunk of rows at a time (weights._dense_transposed), so a streamed f32 layer is
    never held twice (the read and its transposed copy)."""

    def __init__(self, reader: NEReader, name: str, start: int = 0, stop: int | None = None):
        info = reader.tensors[name]
        self.reader, self.name, self.start = reader, name, start
        stop = info.shape[0] if stop is None else stop
        self.shape = (stop - start, *info.shape[1:])
        self.ndim = len(self.shape)

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.shape[0])
        return self.reader.read(self.name, rows=(self.start + a, self.start + b))


class StreamedWeights(RankWeights):
    """A 1-rank reference's weights, one layer (or the head) in memory at a time."""

    def __init__(self, source: RankSource, nthread: int = 1, exact: bool = False):
        self._setup(source, False, nthread, exact)
        self.embedding_rows = EmbeddingRows(source.reader, source.arch.embedding_name)
        self._layer: tuple[int, dict[str, Any]] | None = None
        self._head: dict[str, Any] | None = None
        self.peak_bytes = 0  # the most weight bytes held at once

    def _held(self, tensors: dict[str, Any]) -> dict[str, Any]:
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
        self.resident_bytes = 0  # _assemble counts what it builds; only the current part is held
        return tensors

    def _drop_layer(self) -> None:
        """Free the layer in memory. Its dict is emptied in place: the forward's loop still names it
        while it asks for the next layer, and a dropped reference alone would keep two layers alive."""
        if self._layer is not None:
            self._layer[1].clear()
        self._layer = None

    def layer(self, i: int) -> dict[str, Any]:
        if self._layer is None or self._layer[0] != i:
            self._drop_layer()  # drop layer i - 1 before reading layer i
            self._head = None
            self._layer = (i, self._held(self._assemble(self.source.arch.runtime_tensors(i, self.source.hp))))
        return self._layer[1]

    @property
    def globals(self) -> dict[str, Any]:
        if self._head is None:
            self._drop_layer()
            self._head = self._held(self._assemble(self.source.arch.runtime_tensors(None, self.source.hp)))
        return self._head

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return self.embedding_rows.rows(tokens)

    def _part(self, name: str, mapped: bool) -> tuple[np.ndarray, GGMLType] | None:
        src = self.source
        if src.has(name) and src.type_of(name) in DENSE and len(src.global_shapes[name]) == 2:
            return cast(np.ndarray, LazyRows(src.reader, name)), src.type_of(name)
        return super()._part(name, mapped)

    def _embedding_rows(self, start: int, stop: int) -> np.ndarray:
        name = self.source.arch.embedding_name
        if self.source.type_of(name) in DENSE:
            return cast(np.ndarray, LazyRows(self.source.reader, name, start, stop))
        return self.source.reader.read(name, rows=(start, stop))


def streamed_pass(path: Path | NEFile, tokens: Sequence[int], nthread: int = 1, exact: bool = False,
                  name: str | None = None) -> Pass:
    """Logits (T, V), hidden states and routed experts of NE file `path` (or one opened once:
    runtime.sources.NEFile) over `tokens` as one causal batch at 1 rank, its weights streamed
    layer by layer."""
    source = open_rank_source(path if isinstance(path, NEFile) else Path(path), 0, 1)
    try:
        weights = StreamedWeights(source, nthread=nthread, exact=exact)
        model = RankModel(source, SoloComm(), weights, len(tokens))
        trace = ForwardTrace()
        logits = model.forward(np.asarray(tokens), 0, all_logits=True, trace=trace)
        assert logits is not None  # one rank: rank 0
        source.confirm()  # a shard set's rank file: its sha256, computed meanwhile
        return Pass(name or (path.path if isinstance(path, NEFile) else Path(path)).name, logits, trace.states,
                    trace.routed)
    finally:
        source.close()
