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
- where each NE tensor sits in a checkpoint tensor (`source_parts`: the
  whole of it, rows of a fused one such as Phi-3's qkv_proj, one expert of a
  merged 3-D one), and the rare tensor that needs work on the way in
  (LLaMA's q/k permutation): the HF hook `hf_tensor`, per NE tensor;
- the tensor-parallel split plan, as data;
- the rank-local numpy forward.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping

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
    tensor), "{e}" for the expert index (one tensor per expert of an MoE
    layer; a run of consecutive per-expert specs is laid out expert by
    expert: expert 0's tensors, then expert 1's, ...). `hf` / `gguf`: the
    source tensor's name, or alternatives; None when no checkpoint holds it
    under a name of its own. Several specs may name the same source tensor:
    a fused one (Phi-3's qkv_proj), whose rows hold the specs' tensors in
    table order. A source name without the "{e}" of its NE name is a merged
    tensor holding every expert along its first axis (transformers 5's
    `experts.gate_up_proj`, llama.cpp's `ffn_gate_exps`): expert e's part is
    its e-th sub-tensor, cut by rows as a fused one. `when`: the tensor exists
    only for hparams it accepts (Llama 3's rope_freqs.weight); `in_layer`:
    a per-layer tensor exists only in the layers it accepts (an MoE layer's
    router and experts, a dense layer's MLP). `blocks` False: the matrix
    keeps f32/f16 in a quantized file (MoE routers, as llama-quantize keeps
    ffn_gate_inp: a routing decision flips on small errors)."""

    ne: str
    shape: Shape
    split: SplitRule
    hf: str | tuple[str, ...] | None = None
    gguf: str | tuple[str, ...] | None = None
    when: Callable[[HParams], bool] | None = None
    in_layer: Callable[[HParams, int], bool] | None = None
    blocks: bool = True

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.ne

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.ne

    def exists(self, hp: HParams) -> bool:
        return self.when is None or self.when(hp)

    def exists_in(self, hp: HParams, layer: int) -> bool:
        return self.in_layer is None or self.in_layer(hp, layer)

    def name(self, layer: int | None = None, expert: int | None = None) -> str:
        return self.ne.format(i=layer, e=expert) if self.per_layer else self.ne


@dataclass(frozen=True)
class SourcePart:
    """Where one NE tensor's values are in a checkpoint tensor seen as a
    (rows, row length) matrix (all axes but the last flattened): rows
    [row0, row0 + rows). The whole tensor, one part of a fused one, or one
    expert's part of a merged one: always one contiguous byte range."""

    ne: str
    row0: int
    rows: int


_INDEX = re.compile(r"(\{[ie]\})")


def _pattern(template: str) -> str:
    """A name template as a regex: "{i}" is a layer index, "{e}" an expert index, everything else literal."""
    return "".join(f"(?P<{p[1]}>\\d+)" if _INDEX.fullmatch(p) else re.escape(p) for p in _INDEX.split(template))


def _alternatives(names: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if names is None else (names,) if isinstance(names, str) else names


# (source-name regex, NE name templates, merged over experts) per source name the table knows
NameMap = tuple[tuple[str, tuple[str, ...], bool], ...]


def _name_map(specs: Iterable[TensorSpec], field: str, dropped: Iterable[str]) -> NameMap:
    """The source names a table knows: dropped regexes map to no NE tensor."""
    targets: dict[str, list[str]] = {}
    merged: dict[str, bool] = {}
    for spec in specs:
        for source in _alternatives(getattr(spec, field)):
            pattern = _pattern(source)
            targets.setdefault(pattern, []).append(spec.ne)
            merged[pattern] = spec.per_expert and "{e}" not in source
    return tuple((pattern, (), False) for pattern in dropped) + \
        tuple((p, tuple(t), merged[p]) for p, t in targets.items())


def _rows(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1]) if len(shape) > 1 else 1


class Architecture:
    """Base class; subclasses fill the class attributes and the hooks."""

    name: ClassVar[str]  # netp's name, also recorded in the manifest
    hf_model_types: ClassVar[tuple[str, ...]] = ()  # config.json "model_type"
    gguf_architectures: ClassVar[tuple[str, ...]] = ()  # GGUF general.architecture
    ns_model_names: ClassVar[tuple[str, ...]] = ()  # neural-speed --model_name values
    # config.json defaults: what transformers' config class assumes when a key is absent.
    hf_defaults: ClassVar[dict[str, Any]] = {}
    # config.json keys naming experts that this architecture runs (other configs with them are refused).
    expert_keys: ClassVar[tuple[str, ...]] = ()
    # The tensor table, in NE file order: model-level tensors listed before the
    # first per-layer one come before the layers, the rest after them.
    tensors: ClassVar[tuple[TensorSpec, ...]] = ()
    # Source tensors read and dropped (buffers such as rotary inv_freq, attention masks): name regexes.
    hf_dropped: ClassVar[tuple[str, ...]] = ()
    gguf_dropped: ClassVar[tuple[str, ...]] = ()
    # NE names whose presence says a file is this architecture's (the NE header has no architecture field).
    recognised_by: ClassVar[tuple[str, ...]] = ()

    # NE name regexes, each matched by some name of a file of this architecture's: the
    # layers that hold them vary (an MoE model's sparse layers).
    recognised_with: ClassVar[tuple[str, ...]] = ()
    # Tensor name regexes a GGUF of one of gguf_architectures must hold to be this
    # architecture's (Mixtral's GGUF is `llama` with expert tensors).
    gguf_recognised_with: ClassVar[tuple[str, ...]] = ()

    # -- names, shapes and the split plan: all derived from `tensors` ------------
    @functools.cached_property
    def hf_name_map(self) -> NameMap:
        return _name_map(self.tensors, "hf", self.hf_dropped)

    @functools.cached_property
    def gguf_name_map(self) -> NameMap:
        return _name_map(self.tensors, "gguf", self.gguf_dropped)

    @functools.cached_property
    def split_plan(self) -> tuple[tuple[re.Pattern[str], SplitRule], ...]:
        return tuple((re.compile(_pattern(spec.ne)), spec.split) for spec in self.tensors)

    @staticmethod
    def _map_names(table: NameMap, name: str, n_expert: int) -> tuple[tuple[str, ...], bool] | None:
        for pattern, templates, merged in table:
            m = re.fullmatch(pattern, name)
            if m:
                fields = m.groupdict()
                if merged:  # every expert's tensors, expert by expert: the source's row order
                    return tuple(t.format(e=e, **fields) for e in range(n_expert) for t in templates), True
                return tuple(t.format(**fields) for t in templates), False
        return None  # unknown name

    def ne_names_from_hf(self, hf_name: str, hp: HParams | None = None) -> tuple[str, ...] | None:
        """The NE tensors an HF tensor holds, in its row order (several for a fused or
        merged one: hp says how many experts; none for a dropped buffer), None for a name
        this architecture does not know."""
        found = self._map_names(self.hf_name_map, hf_name, hp.n_expert if hp else 0)
        return None if found is None else found[0]

    def ne_names_from_gguf(self, gguf_name: str, hp: HParams | None = None) -> tuple[str, ...] | None:
        found = self._map_names(self.gguf_name_map, gguf_name, hp.n_expert if hp else 0)
        return None if found is None else found[0]

    def source_parts(self, source_name: str, hp: HParams, gguf: bool = False
                     ) -> tuple[tuple[SourcePart, ...], tuple[int, ...]] | None:
        """The NE tensors an HF (or GGUF) tensor holds, each with the rows it takes
        (SourcePart), and the shape the source must have to hold exactly them: the NE
        tensor's own for a plain one, (rows of its parts, row length) for a fused one,
        (experts, rows of one expert's parts, row length) for a merged one. ((), ()) for
        a dropped buffer; None for a name this architecture does not know."""
        found = self._map_names(self.gguf_name_map if gguf else self.hf_name_map, source_name, hp.n_expert)
        if found is None:
            return None
        names, merged = found
        if not names:
            return (), ()
        shapes = [tuple(self.spec(ne).shape(hp)) for ne in names]
        parts, at = [], 0
        for ne, shape in zip(names, shapes):
            parts.append(SourcePart(ne, at, _rows(shape)))
            at += _rows(shape)
        if merged:
            return tuple(parts), (hp.n_expert, at // hp.n_expert, shapes[0][-1])
        return tuple(parts), shapes[0] if len(names) == 1 else (at, shapes[0][-1])

    def tensor_shapes(self, hp: HParams) -> dict[str, tuple[int, ...]]:
        """Every NE tensor of a model with these hparams, in file order, numpy shapes."""
        specs = [s for s in self.tensors if s.exists(hp)]
        first_layer = next((k for k, s in enumerate(specs) if s.per_layer), len(specs))
        shapes = {s.name(): tuple(s.shape(hp)) for s in specs[:first_layer]}
        for i in range(hp.n_layer):
            shapes |= {name: tuple(s.shape(hp)) for name, s in self.layer_tensors(specs, hp, i)}
        shapes |= {s.name(): tuple(s.shape(hp)) for s in specs[first_layer:] if not s.per_layer}
        return shapes

    @staticmethod
    def layer_tensors(specs: Iterable[TensorSpec], hp: HParams, layer: int) -> list[tuple[str, TensorSpec]]:
        """Layer `layer`'s tensors in file order: a run of per-expert specs expert by expert."""
        out: list[tuple[str, TensorSpec]] = []
        run: list[TensorSpec] = []

        def flush() -> None:
            out.extend((s.name(layer, e), s) for e in range(hp.n_expert) for s in run)
            run.clear()

        for s in specs:
            if not s.per_layer or not s.exists_in(hp, layer):
                continue
            if s.per_expert:
                run.append(s)
                continue
            flush()
            out.append((s.name(layer), s))
        flush()
        return out

    def recognition(self, ne_names: Iterable[str]) -> int | None:
        """How specifically a set of NE tensor names is this architecture's: the number of
        its recognition rules they meet (every rule must hold), None when not its."""
        names = set(ne_names)
        rules = len(self.recognised_by) + len(self.recognised_with)
        if not rules or not all(n in names for n in self.recognised_by):
            return None
        if not all(any(re.fullmatch(p, n) for n in names) for p in self.recognised_with):
            return None
        return rules

    def recognises(self, ne_names: Iterable[str]) -> bool:
        """Whether a set of NE tensor names is this architecture's (the registry takes the
        most specific one: a Mixtral file is also a LLaMA one by its attention names)."""
        return self.recognition(ne_names) is not None

    def gguf_recognition(self, tensor_names: Iterable[str]) -> int | None:
        """The number of gguf_recognised_with rules a GGUF's tensor names meet, None if one fails."""
        names = list(tensor_names)
        if not all(any(re.fullmatch(p, n) for n in names) for p in self.gguf_recognised_with):
            return None
        return len(self.gguf_recognised_with)

    def split_rule(self, ne_name: str) -> SplitRule:
        return self.spec(ne_name).split

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
        """Whether hf_tensor reworks this tensor; when not, convert may copy its f32 bytes
        straight from the checkpoint. Override together with hf_tensor."""
        return False

    def hf_tensor(self, ne_name: str, data: np.ndarray, hp: HParams) -> np.ndarray:
        """The HF hook: an NE tensor's values as read from its part of an HF tensor
        (SourcePart), in NE layout. Default: unchanged (fused and merged tensors are
        cut by source_parts, not here)."""
        return data

    def spec(self, ne_name: str) -> TensorSpec:
        for (pattern, _), spec in zip(self.split_plan, self.tensors):
            if pattern.fullmatch(ne_name):
                return spec
        raise KeyError(f"{self.name}: no tensor {ne_name}")

    def blocks(self, ne_name: str) -> bool:
        """Whether a quantized file may store this matrix in blocks (TensorSpec.blocks)."""
        return self.spec(ne_name).blocks

    def generated_tensors(self, hp: HParams) -> dict[str, np.ndarray]:
        """NE tensors an HF checkpoint lacks and config.json determines (Llama 3's
        rope_freqs.weight); convert writes them. Default: none."""
        return {}

    # -- runtime (the rank-local numpy forward) ---------------------------------
    rope_freqs_name: ClassVar[str | None] = None  # the 1-D tensor of per-pair rotary divisors, if any
    embedding_name: ClassVar[str]  # the token embedding: kept in file form, rows dequantized on lookup
    output_name: ClassVar[str]  # the output head; when absent (tied) the embedding's vocab rows serve

    def runtime_tensors(self, layer: int | None, hp: HParams) -> dict[str, tuple[str, ...]]:
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
