"""What every architecture module declares, and the registry that finds it.

An architecture is one class in models/<arch>.py, registered with
`@register` (the package finds every module itself: adding one edits no
list). It holds the facts every stage needs, so no stage ever says
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
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping as TMapping

import numpy as np

from netp.errors import NetpError
from netp.formats.constants import SPLIT_AXIS, SPLIT_KINDS, SPLIT_UNITS


@dataclass(frozen=True)
class HParams:
    """Hyper-parameters of one model, in the units the forward uses."""

    arch: str
    n_vocab: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_layer: int
    n_ff: int  # MLP inner width
    n_rot: int  # rotary dims per head
    norm_eps: float
    rope_theta: float
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int = -1
    parallel_residual: bool = False
    tie_embeddings: bool = False
    max_seq_len: int = 0
    n_embd_head: int = 0  # an explicit head_dim (Qwen3, Mistral-Nemo); 0: n_embd / n_head
    freq_scale: float = 1.0  # linear rope scaling: positions times this (1 / factor)
    rope_freqs: bool = False  # the file carries rope_freqs.weight (Llama 3 per-pair frequency divisors)
    rope_freq_factors: tuple[float, ...] = ()  # its values, when computed from config.json
    sliding_window: int = 0  # a position attends to the last sliding_window keys, itself included; 0: all

    @property
    def head_dim(self) -> int:
        return self.n_embd_head or self.n_embd // self.n_head

    @property
    def n_embd_q(self) -> int:
        """Rows of the query projection (and columns of the output one)."""
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim


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

    @staticmethod
    def _one(names: tuple[str, ...] | None) -> str | None | bool:
        return False if names is None else names[0] if len(names) == 1 else None if not names else False

    def ne_name_from_hf(self, hf_name: str) -> str | None | bool:
        """The one NE name of an unfused HF tensor, None for one to drop, False for a name
        this architecture does not know (or a fused tensor: see ne_names_from_hf)."""
        return self._one(self.ne_names_from_hf(hf_name))

    def ne_name_from_gguf(self, gguf_name: str) -> str | None | bool:
        return self._one(self.ne_names_from_gguf(gguf_name))

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
    def hf_value(self, config: TMapping[str, Any], key: str) -> Any:
        value = config.get(key)
        return self.hf_defaults.get(key) if value is None else value

    def hparams_from_hf(self, config: TMapping[str, Any], path: str) -> HParams:
        raise NotImplementedError

    def hparams_from_gguf(self, meta: TMapping[str, Any], path: str, tensor_names: Iterable[str] = ()) -> HParams:
        raise NetpError(path, f"GGUF input is not supported for {self.name}")

    def hparams_from_ne(self, header: Any, shapes: TMapping[str, tuple[int, ...]]) -> HParams:
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

    def forward(self, m: Any, tokens: np.ndarray, start: int, all_logits: bool = False,
                states: list | None = None) -> np.ndarray:
        """Rank-local forward of tokens at positions [start, start + T) through
        m (a netp.runtime.model.RankModel: hp, comm, weights, cache, rotary
        tables, local heads). Returns this rank's vocab slice of the logits of
        the last token (all tokens with all_logits), (T', V_local). `states`,
        when given, receives the residual stream entering each layer and the
        one leaving the last, (T, n_embd) each."""
        raise NotImplementedError


_REGISTRY: dict[str, Architecture] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    _REGISTRY[cls.name] = cls()
    return cls


def all_architectures() -> list[Architecture]:
    return list(_REGISTRY.values())


def architecture_names() -> tuple[str, ...]:
    """netp's name of every registered architecture (what a manifest may say)."""
    return tuple(sorted(_REGISTRY))


def supported_names() -> str:
    return ", ".join(architecture_names())


def by_name(name: str) -> Architecture:
    try:
        return _REGISTRY[name]
    except KeyError as e:
        raise ValueError(f"unknown architecture {name!r} (supported: {supported_names()})") from e


def by_hf_config(config: TMapping[str, Any], path: str) -> Architecture:
    refuse_foreign_math(config, path)
    model_type = config.get("model_type")
    for arch in _REGISTRY.values():
        if model_type in arch.hf_model_types:
            return arch
    raise NetpError(path, f"unsupported architecture {model_type!r} "
                          f"({', '.join(config.get('architectures') or []) or 'no architectures listed'}); "
                          f"supported model_type: {supported_model_types()}")


def by_gguf_architecture(gguf_arch: str, path: str) -> Architecture:
    for arch in _REGISTRY.values():
        if gguf_arch in arch.gguf_architectures:
            return arch
    known = ", ".join(sorted(t for a in _REGISTRY.values() for t in a.gguf_architectures))
    raise NetpError(path, f"unsupported GGUF architecture {gguf_arch!r} (supported: {known})")


def by_ne_tensors(ne_names: Iterable[str], path: str) -> Architecture:
    names = set(ne_names)
    for arch in _REGISTRY.values():
        if arch.recognises(names):
            return arch
    raise NetpError(path, f"tensor names match no supported architecture ({supported_names()})")


def ne_model(header: Any, shapes: TMapping[str, tuple[int, ...]], path: str) -> tuple[Architecture, HParams]:
    """The architecture and hparams of an NE file (or a manifest), its header and
    tensors checked against each other: whole heads, a rotary width that fits a
    head, and exactly the tensors the header implies with the shapes it implies
    (the output head may be absent: tied to the embedding). The layer count is
    bounded by the tensor count before the expected tensors are listed, so a
    corrupt header cannot make that list huge."""
    arch = by_ne_tensors(shapes, path)
    try:
        hp = arch.hparams_from_ne(header, shapes)
    except KeyError as e:
        raise NetpError(path, f"missing tensor {e.args[0]} that the {arch.name} header needs") from e
    check_hparams(hp, path, n_tensors=len(shapes), source="header")
    expected = arch.tensor_shapes(hp)
    for name, shape in shapes.items():
        if name not in expected:
            raise NetpError(path, f"tensor {name} is not part of a {arch.name} model with {hp.n_layer} layers")
        if tuple(expected[name]) != tuple(shape):
            raise NetpError(path, f"tensor {name} has shape {list(shape)}, the header implies {list(expected[name])}")
    missing = [n for n in expected if n not in shapes and n != arch.output_name]
    if missing:
        raise NetpError(path, f"missing tensor {missing[0]} of a {arch.name} model with {hp.n_layer} layers "
                              "(truncated or wrong header?)")
    return arch, hp


_INT32_MAX = (1 << 31) - 1
# config.json keys read as counts that may be absent from an architecture's hf_defaults.
_HF_EXTRA_COUNTS = ("num_key_value_heads", "head_dim", "n_inner", "rotary_dim", "max_position_embeddings",
                    "n_positions")
# GGUF metadata read as numbers (llama.cpp's key names, after "<arch>.").
_GGUF_COUNTS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "vocab_size",
                "attention.head_count", "attention.head_count_kv", "rope.dimension_count")
_GGUF_REALS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base",
               "rope.scaling.factor")
_GGUF_TOKEN_IDS = ("bos_token_id", "eos_token_id", "padding_token_id")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_value(key: str, value: Any, kind: str, path: str) -> None:
    if value is None:
        return
    if kind == "count":  # a size: a positive whole number (a zero head count would divide by zero)
        ok = (_is_int(value) or (isinstance(value, float) and value.is_integer())) and 1 <= value <= _INT32_MAX
    elif kind == "token":  # an id, or a list of them (several EOS ids)
        ok = _is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value))
    elif kind == "real":
        ok = _is_real(value) and math.isfinite(value)
    elif kind == "bool":
        ok = isinstance(value, (bool, np.bool_))
    else:
        ok = isinstance(value, str)
    if not ok:
        want = {"count": f"a whole number 1 .. {_INT32_MAX}", "token": "a token id", "real": "a finite number",
                "bool": "true or false", "str": "a string"}[kind]
        raise NetpError(path, f"{key} is {value!r:.60}, expected {want}")


def check_source_values(arch: Architecture, values: TMapping[str, Any], path: str, gguf: bool = False) -> None:
    """Refuse a config.json or GGUF metadata value of the wrong type (a string, a list,
    128.5 for a count, "false" for a flag) by name, before hparams are built from it
    (docs/design.md §8). config.json kinds come from the architecture's hf_defaults."""
    if gguf:
        a = values.get("general.architecture")
        kinds = {f"{a}.{k}": "count" for k in _GGUF_COUNTS} | {f"{a}.{k}": "real" for k in _GGUF_REALS} | \
            {f"tokenizer.ggml.{k}": "token" for k in _GGUF_TOKEN_IDS}
    else:
        kinds = {k: "count" for k in _HF_EXTRA_COUNTS}
        for key, default in arch.hf_defaults.items():
            kinds[key] = ("bool" if isinstance(default, bool) else "token" if key.endswith("_token_id")
                          else "count" if isinstance(default, int) else "real" if isinstance(default, float)
                          else "str" if isinstance(default, str) else "any")
        kinds |= {k: "token" for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    for key, kind in kinds.items():
        if kind != "any" and key in values:
            _check_value(key, values[key], kind, path)


def check_hparams(hp: HParams, path: str, n_tensors: int | None = None, source: str = "config") -> None:
    """Refuse hparams that are nonsense or would make work without bound, by name
    (docs/design.md §8): sizes positive and within the NE header's int32, whole
    heads per KV group, a rotary width that fits a head, finite eps > 0 and rope
    theta > 0, a context length >= 0, and (given the number of tensors the
    checkpoint really holds) no more layers than those tensors can hold, checked
    before the expected-tensor list is built from it. `source` names what the
    values came from in the messages ("config", "header", "GGUF metadata")."""
    sizes = {"n_vocab": hp.n_vocab, "n_embd": hp.n_embd, "n_head": hp.n_head, "n_head_kv": hp.n_head_kv,
             "n_layer": hp.n_layer, "n_ff": hp.n_ff}
    for name, value in sizes.items():
        if not 1 <= value <= _INT32_MAX:
            raise NetpError(path, f"{name} is {value}: sizes must be 1 .. {_INT32_MAX} "
                                  f"(n_vocab {hp.n_vocab}, n_embd {hp.n_embd}, n_head {hp.n_head}, "
                                  f"n_head_kv {hp.n_head_kv}, n_layer {hp.n_layer}, n_ff {hp.n_ff})")
    if (not hp.n_embd_head and hp.n_embd % hp.n_head) or hp.n_head % hp.n_head_kv:
        raise NetpError(path, f"{hp.n_head} heads / {hp.n_head_kv} KV heads over n_embd {hp.n_embd}: "
                              "not a whole number of heads per KV group")
    if not 0 <= hp.n_rot <= hp.head_dim or hp.n_rot % 2:
        raise NetpError(path, f"rotary width n_rot {hp.n_rot} does not fit head_dim {hp.head_dim}")
    if not (math.isfinite(hp.norm_eps) and 0 < hp.norm_eps < 1):
        raise NetpError(path, f"norm epsilon is {hp.norm_eps}; it must be a finite number in (0, 1)")
    if not (math.isfinite(hp.rope_theta) and 0 < hp.rope_theta < 3.4e38):
        raise NetpError(path, f"rope theta (freq_base) is {hp.rope_theta}; it must be a finite positive number")
    for name in ("n_embd_head", "sliding_window"):  # 0 means "not set" for both
        if not 0 <= getattr(hp, name) <= _INT32_MAX:
            raise NetpError(path, f"{name} is {getattr(hp, name)}; it must be 0 .. {_INT32_MAX}")
    if not (math.isfinite(hp.freq_scale) and 0 < hp.freq_scale < 3.4e38):
        raise NetpError(path, f"rope freq_scale is {hp.freq_scale}; it must be a finite positive number")
    if not 0 <= hp.max_seq_len <= _INT32_MAX:
        raise NetpError(path, f"context length (max_seq_len) is {hp.max_seq_len}; it must be 0 .. {_INT32_MAX}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if not -1 <= getattr(hp, name) <= _INT32_MAX:
            raise NetpError(path, f"{name} is {getattr(hp, name)}; it must be -1 (none) or a token id")
    if n_tensors is not None and hp.n_layer > n_tensors:
        raise NetpError(path, f"{source} says {hp.n_layer} layers, more than its {n_tensors} tensors can hold")


def by_ns_model_name(model_name: str) -> Architecture:
    for arch in _REGISTRY.values():
        if model_name in arch.ns_model_names:
            return arch
    known = ", ".join(sorted(n for a in _REGISTRY.values() for n in a.ns_model_names))
    raise ValueError(f"unknown --model_name {model_name!r} (supported: {known})")


def refuse(path: str, what: str) -> NetpError:
    """The error for a config whose math netp does not implement; `what` names the
    feature and says what is supported instead."""
    return NetpError(path, f"unsupported config: {what}; netp would compute this model wrong, so it refuses it")


# Config keys of math no netp forward implements, whatever the architecture: (key, what it is).
_FOREIGN_MATH = (
    ("num_local_experts", "mixture of experts"), ("num_experts", "mixture of experts"),
    ("n_routed_experts", "mixture of experts"),
    ("final_logit_softcapping", "logit soft-capping"), ("attn_logit_softcapping", "logit soft-capping"),
)


def refuse_foreign_math(config: TMapping[str, Any], path: str) -> None:
    for key, what in _FOREIGN_MATH:
        if config.get(key):
            raise refuse(path, f"{what} ({key} {config[key]}); netp runs dense decoders without it: "
                               f"model_type {supported_model_types()}")


def supported_model_types() -> str:
    return ", ".join(sorted(t for a in _REGISTRY.values() for t in a.hf_model_types))


def rope_parameters(config: TMapping[str, Any]) -> dict[str, Any]:
    """The rope settings of a config.json of transformers 4 (`rope_theta`, `rope_scaling`)
    or 5 (`rope_parameters`), merged; rope_type "default" when unscaled."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling")
    if scaling:
        params = {**scaling, **params}
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_from_hf(arch: Architecture, config: TMapping[str, Any], path: str,
                 scalings: tuple[str, ...] = ()) -> tuple[float, float]:
    """(rope theta, partial rotary factor) from a config.json of transformers 4 or 5.

    Rope scaling types other than `scalings` (linear with factor 1.0 is no
    scaling) are refused by name (longrope/su, YaRN, dynamic NTK, ...);
    rope_scaling_from_hf turns the accepted ones into freq_scale and factors.
    """
    params = rope_parameters(config)
    rope_type, factor = params["rope_type"], params.get("factor", 1.0)
    if rope_type != "default" and rope_type not in scalings and not (rope_type == "linear" and factor == 1.0):
        supported = ", ".join(("none",) + scalings)
        raise refuse(path, f"rope scaling {rope_type!r} (factor {factor}); netp implements for {arch.name}: {supported}")
    theta = params.get("rope_theta", config.get("rope_theta", arch.hf_defaults.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor",
                         config.get("rotary_pct", config.get("partial_rotary_factor",
                                                             arch.hf_defaults.get("partial_rotary_factor", 1.0))))
    return float(theta), float(partial)


def rope_scaling_from_hf(config: TMapping[str, Any], n_rot: int, theta: float) -> tuple[float, tuple[float, ...]]:
    """(freq_scale, per-pair frequency divisors) of an accepted rope scaling:
    linear factor f -> positions / f (freq_scale 1/f, transformers divides its
    inverse frequencies by f); llama3 -> the divisors transformers'
    _compute_llama3_parameters applies, one per rotary pair (docs/design.md §2)."""
    params = rope_parameters(config)
    if params["rope_type"] == "linear":
        return 1.0 / float(params.get("factor", 1.0)), ()
    if params["rope_type"] != "llama3":
        return 1.0, ()
    factor, low, high = (float(params[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    original = float(params["original_max_position_embeddings"])
    inv_freq = 1.0 / theta ** (np.arange(0, n_rot, 2, dtype=np.int64).astype(np.float32) / n_rot)
    wavelen = 2 * np.pi / inv_freq.astype(np.float64)
    smooth = (original / wavelen - low) / (high - low)
    factors = np.where(wavelen < original / high, 1.0,
                       np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return 1.0, tuple(float(f) for f in factors)


class GGUFMeta:
    """A GGUF's metadata read the way llama.cpp writes it: `arch.key` lookups for its
    general.architecture, every missing required key one NetpError naming it."""

    def __init__(self, meta: TMapping[str, Any], path: str):
        self.meta, self.path, self.arch = meta, path, meta["general.architecture"]

    def need(self, key: str) -> Any:
        full = f"{self.arch}.{key}"
        if full not in self.meta:
            raise NetpError(self.path, f"GGUF metadata lacks {full}")
        return self.meta[full]

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{key}", default)

    def token(self, key: str) -> int:
        return int(self.meta.get(f"tokenizer.ggml.{key}", -1))

    def n_vocab(self) -> int:
        if "tokenizer.ggml.tokens" not in self.meta and not self.get("vocab_size"):
            raise NetpError(self.path, "GGUF metadata lacks tokenizer.ggml.tokens")
        return int(self.get("vocab_size", 0)) or len(self.meta["tokenizer.ggml.tokens"])


def token_id(value: Any) -> int:
    if isinstance(value, (list, tuple)):  # some configs list several EOS ids: the first is the main one
        value = value[0] if value else None
    return -1 if value is None else int(value)
