"""What every architecture module declares: the tensor table and the class.

An architecture is one class in models/<arch>.py, registered with
`@register` (models/registry.py; the package finds every module itself:
adding one edits no list). It holds the facts every stage needs, so no stage ever says
`if arch == ...`:
- one tensor table: each NE tensor declared once (`TensorSpec`: NE name,
  shape from hparams, split rule, HF and GGUF names), from which the HF/GGUF
  -> NE name maps, `tensor_shapes` and the split plan are derived, plus a
  recogniser of its NE names (the NE header has no architecture field);
- hparams: from config.json (read as JSON, with defaults declared here and
  checked against transformers' config classes by a test), from GGUF
  metadata, and from an NE header; header field values for writing;
- the rare tensor that needs work on the way in (LLaMA's q/k permutation,
  Phi-3's fused projections): the HF hook `hf_tensors`, a generator of
  (NE name, data) pairs per HF tensor (llama.cpp's `modify_tensors` shape);
- the tensor-parallel split plan, as data;
- the rank-local numpy forward.
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping

import numpy as np

from netp.errors import NetpError
from netp.formats.constants import SPLIT_AXIS, SPLIT_KINDS, SPLIT_UNITS
from netp.models.context import ForwardTrace, RankContext
from netp.models.hparams import HParams


@dataclass(frozen=True)
class SplitRule:
    """How one tensor is cut across tensor-parallel ranks.

    kind: "rows" (output rows, numpy axis 0), "cols" (input columns, numpy
    axis 1), "rank0" (whole tensor on rank 0 only: the bias of a column-split
    matrix, added once before the all-reduce), "replicated".
    unit: what the cut counts in for rows/cols: "q_heads", "kv_heads",
    "qkv_heads" (a fused per-head q|k|v block), "ffn" (MLP width), "vocab".
    """

    kind: str
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS or (self.unit in SPLIT_UNITS) != (self.kind in SPLIT_AXIS):
            raise ValueError(f"split rule {self.kind}/{self.unit} is not one of {SPLIT_KINDS} with a unit "
                             f"of {SPLIT_UNITS} exactly when cut")

    @property
    def axis(self) -> int | None:
        return SPLIT_AXIS.get(self.kind)


REPLICATED = SplitRule("replicated")
RANK0 = SplitRule("rank0")

Shape = Callable[[HParams], tuple[int, ...]]


@dataclass(frozen=True)
class TensorSpec:
    """One NE tensor of an architecture, declared once.

    Names are templates: "{i}" stands for the layer index (a per-layer
    tensor). `hf` / `gguf`: the source tensor's name, or alternatives; None
    when no checkpoint holds it under a name of its own. Several specs may
    name the same HF tensor: a fused one (Phi-3's qkv_proj) that the
    architecture's `hf_tensors` hook cuts. `when`: the tensor exists only for
    hparams it accepts (Llama 3's rope_freqs.weight)."""

    ne: str
    shape: Shape
    split: SplitRule
    hf: str | tuple[str, ...] | None = None
    gguf: str | tuple[str, ...] | None = None
    when: Callable[[HParams], bool] | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.ne

    def exists(self, hp: HParams) -> bool:
        return self.when is None or self.when(hp)

    def name(self, layer: int | None = None) -> str:
        return self.ne.format(i=layer) if self.per_layer else self.ne


def _pattern(template: str) -> str:
    """A name template as a regex: "{i}" is a layer index, everything else literal."""
    return r"(\d+)".join(re.escape(part) for part in template.split("{i}"))


def _alternatives(names: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if names is None else (names,) if isinstance(names, str) else names


def _name_map(specs: Iterable[TensorSpec], field: str, dropped: Iterable[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(source-name regex, NE name templates) for each source name the table knows; dropped regexes map to ()."""
    targets: dict[str, list[str]] = {}
    for spec in specs:
        for source in _alternatives(getattr(spec, field)):
            targets.setdefault(_pattern(source), []).append(spec.ne.replace("{i}", "{0}"))
    return tuple((pattern, ()) for pattern in dropped) + tuple((p, tuple(t)) for p, t in targets.items())


class Architecture:
    """Base class; subclasses fill the class attributes and the hooks."""

    name: ClassVar[str]  # netp's name, also recorded in the manifest
    hf_model_types: ClassVar[tuple[str, ...]] = ()  # config.json "model_type"
    gguf_architectures: ClassVar[tuple[str, ...]] = ()  # GGUF general.architecture
    ns_model_names: ClassVar[tuple[str, ...]] = ()  # neural-speed --model_name values
    # config.json defaults: what transformers' config class assumes when a key is absent.
    hf_defaults: ClassVar[dict[str, Any]] = {}
    # The tensor table, in NE file order: model-level tensors listed before the
    # first per-layer one come before the layers, the rest after them.
    tensors: ClassVar[tuple[TensorSpec, ...]] = ()
    # Source tensors read and dropped (buffers such as rotary inv_freq, attention masks): name regexes.
    hf_dropped: ClassVar[tuple[str, ...]] = ()
    gguf_dropped: ClassVar[tuple[str, ...]] = ()
    # NE names whose presence says a file is this architecture's (the NE header has no architecture field).
    recognised_by: ClassVar[tuple[str, ...]] = ()

    # -- names, shapes and the split plan: all derived from `tensors` ------------
    @functools.cached_property
    def hf_name_map(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return _name_map(self.tensors, "hf", self.hf_dropped)

    @functools.cached_property
    def gguf_name_map(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return _name_map(self.tensors, "gguf", self.gguf_dropped)

    @functools.cached_property
    def split_plan(self) -> tuple[tuple[str, SplitRule], ...]:
        return tuple((_pattern(spec.ne), spec.split) for spec in self.tensors)

    @staticmethod
    def _map_names(table: Iterable[tuple[str, tuple[str, ...]]], name: str) -> tuple[str, ...] | None:
        for pattern, templates in table:
            m = re.fullmatch(pattern, name)
            if m:
                return tuple(t.format(*m.groups()) for t in templates)
        return None  # unknown name

    def ne_names_from_hf(self, hf_name: str) -> tuple[str, ...] | None:
        """The NE tensors an HF tensor becomes (several for a fused one, none for a
        dropped buffer), None for a name this architecture does not know."""
        return self._map_names(self.hf_name_map, hf_name)

    def ne_names_from_gguf(self, gguf_name: str) -> tuple[str, ...] | None:
        return self._map_names(self.gguf_name_map, gguf_name)

    def tensor_shapes(self, hp: HParams) -> dict[str, tuple[int, ...]]:
        """Every NE tensor of a model with these hparams, in file order, numpy shapes."""
        specs = [s for s in self.tensors if s.exists(hp)]
        first_layer = next((k for k, s in enumerate(specs) if s.per_layer), len(specs))
        layer_specs = [s for s in specs if s.per_layer]
        shapes = {s.name(): tuple(s.shape(hp)) for s in specs[:first_layer]}
        for i in range(hp.n_layer):
            shapes |= {s.name(i): tuple(s.shape(hp)) for s in layer_specs}
        shapes |= {s.name(): tuple(s.shape(hp)) for s in specs[first_layer:] if not s.per_layer}
        return shapes

    def recognises(self, ne_names: Iterable[str]) -> bool:
        """Whether a set of NE tensor names is this architecture's."""
        names = set(ne_names)
        return bool(self.recognised_by) and all(n in names for n in self.recognised_by)

    def split_rule(self, ne_name: str) -> SplitRule:
        for pattern, rule in self.split_plan:
            if re.fullmatch(pattern, ne_name):
                return rule
        raise KeyError(f"{self.name}: no split rule for tensor {ne_name}")

    # -- hparams -------------------------------------------------------------
    def hf_value(self, config: Mapping[str, Any], key: str) -> Any:
        value = config.get(key)
        return self.hf_defaults.get(key) if value is None else value

    def hparams_from_hf(self, config: Mapping[str, Any], path: str) -> HParams:
        raise NotImplementedError

    def hparams_from_gguf(self, meta: Mapping[str, Any], path: str, tensor_names: Iterable[str] = ()) -> HParams:
        raise NetpError(path, f"GGUF input is not supported for {self.name}")

    def hparams_from_ne(self, header: Any, shapes: Mapping[str, tuple[int, ...]]) -> HParams:
        raise NotImplementedError

    def header_fields(self, hp: HParams) -> dict[str, Any]:
        """NE header values (all but version and ftype) for these hparams."""
        raise NotImplementedError

    # -- tensors on the way in -------------------------------------------------
    def ns_loader_caveats(self, hp: HParams) -> list[str]:
        """Ways neural-speed's own loader would misread the NE file of this model
        where netp's runtime reads it right; convert warns with each, and still writes it."""
        return []

    def transforms_hf(self, ne_name: str) -> bool:
        """Whether hf_tensors reworks this tensor (a fused one is always cut); when not,
        convert may copy its f32 bytes straight from the checkpoint. Override together
        with hf_tensors."""
        return any(re.fullmatch(p, ne_name) for p in self._fused_patterns)

    @functools.cached_property
    def _fused_patterns(self) -> tuple[str, ...]:
        """NE name regexes of the tensors cut from a fused HF tensor (one HF name, several specs)."""
        count = Counter(src for spec in self.tensors for src in _alternatives(spec.hf))
        return tuple(_pattern(spec.ne) for spec in self.tensors
                     if any(count[src] > 1 for src in _alternatives(spec.hf)))

    def hf_tensors(self, hf_name: str, data: np.ndarray, hp: HParams) -> Iterator[tuple[str, np.ndarray]]:
        """The HF hook (llama.cpp's modify_tensors): the (NE name, data) pairs one HF
        tensor becomes. Default: the tensor under its NE name, or a fused one cut by
        rows into its NE tensors in table order (Phi-3's q|k|v, gate|up)."""
        names = self.ne_names_from_hf(hf_name) or ()
        if len(names) == 1:
            yield names[0], data
            return
        at = 0
        for ne in names:
            rows = self.spec(ne).shape(hp)[0]
            yield ne, data[at:at + rows]
            at += rows
        if at != data.shape[0]:
            raise ValueError(f"{hf_name}: {data.shape[0]} rows, its parts {', '.join(names)} take {at}")

    def spec(self, ne_name: str) -> TensorSpec:
        for (pattern, _), spec in zip(self.split_plan, self.tensors):
            if re.fullmatch(pattern, ne_name):
                return spec
        raise KeyError(f"{self.name}: no tensor {ne_name}")

    def generated_tensors(self, hp: HParams) -> dict[str, np.ndarray]:
        """NE tensors an HF checkpoint lacks and config.json determines (Llama 3's
        rope_freqs.weight); convert writes them. Default: none."""
        return {}

    # -- runtime (the rank-local numpy forward) ---------------------------------
    rope_freqs_name: ClassVar[str | None] = None  # the 1-D tensor of per-pair rotary divisors, if any
    embedding_name: ClassVar[str]  # the token embedding: kept in file form, rows dequantized on lookup
    output_name: ClassVar[str]  # the output head; when absent (tied) the embedding's vocab rows serve

    def runtime_tensors(self, layer: int | None) -> dict[str, tuple[str, ...]]:
        """The weights the forward uses, by its own names, each made of NE
        tensors stacked by rows (q|k|v in one matrix: one product, not three).
        layer None: the model-level weights."""
        raise NotImplementedError

    def forward(self, m: RankContext, tokens: np.ndarray, start: int, all_logits: bool = False,
                trace: ForwardTrace | None = None) -> np.ndarray:
        """Rank-local forward of tokens at positions [start, start + T) through
        m (what a rank hands the forward: models/context.py). Returns this
        rank's vocab slice of the logits of the last token (all tokens with
        all_logits), (T', V_local). `trace`, when given, receives what verify
        compares (ForwardTrace)."""
        raise NotImplementedError
