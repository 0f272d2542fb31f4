"""Which tensors a quantized NE file stores in blocks: the one rule, in one place.

A tensor is quantized to the chosen type when it is a 2-D matrix whose row
length (ne[0], the input dimension the 32-value blocks run along) is a
multiple of 32. Everything else keeps the type it has in the input:
- 1-D tensors (norm weights, biases) stay f32: they are tiny, and the
  runtime adds/multiplies them elementwise, where 4-bit steps would show;
- a matrix whose rows do not fill whole blocks stays f32/f16 (ggml's block
  formats cannot express it; no padding, no silent change of shape).

The token embedding and the output head are matrices like the others and
are quantized with the chosen type. That is what neural-speed and the
ggjt-era llama.cpp (whose NE/ggjt files netp writes) do for q4_0/q4_1/q8_0,
and what `llama-quantize --pure` does today; it is what a user expects from
"a q4_0 file". It also matters most here: in small models these two are the
largest matrices (SmolLM2-135M: 28M of 135M weights each), the runtime keeps
the embedding in its file form and dequantizes only the rows it looks up,
and shards split the head by vocab rows, so the 4-bit saving is real at run
time. (Newer llama.cpp bumps the output head to Q6_K by default; Q6_K is not
an NE type, so netp does not.)

Two matrices may be given another type (llama-quantize's
--output-tensor-type / --token-embedding-type; docs/design.md §10): the
output head (`--output_type`) and the token embedding (`--embedding_type`),
f32, f16, q8_0, q4_1 or q4_0. For a tied model the NE file holds the shared
matrix as the embedding and its copy as the output head, one flag each.
A block type that the rows cannot fill falls back as above.

An MoE router (`ffn_gate_inp`, `mlp.gate`) stays f32, as llama-quantize
keeps it: it is small (experts x hidden per layer) and decides which
experts run, where a 4-bit step flips a choice (the architecture's table
marks it: TensorSpec.blocks).

The header's ftype is the chosen type (neural-speed's loader reads it as the
type of the bulk of the weights); every tensor's own type field says what it
really holds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from netp.formats.constants import BLOCK_SIZE, FTYPE_OF_TYPE, QUANTIZED_TYPES, GGMLType
from netp.typenames import OVERRIDE_TYPE_NAMES

if TYPE_CHECKING:
    from netp.models.architecture import Architecture

__all__ = ["target_type", "header_ftype", "tensor_types", "type_overrides", "OVERRIDE_TYPES"]

OVERRIDE_TYPES = OVERRIDE_TYPE_NAMES  # what --output_type / --embedding_type take


def target_type(shape: Sequence[int], source: GGMLType, chosen: GGMLType) -> GGMLType:
    """The type a tensor of numpy `shape`, stored as `source`, gets in a `chosen`-type file."""
    if chosen not in QUANTIZED_TYPES:
        raise ValueError(f"{GGMLType(chosen).name} is not a block type")
    if len(shape) == 2 and shape[-1] % BLOCK_SIZE == 0:
        return chosen
    return source


def header_ftype(chosen: GGMLType) -> int:
    """The NE header's ftype for a file quantized to `chosen`."""
    return FTYPE_OF_TYPE[chosen]


def type_overrides(arch: Architecture, output_type: GGMLType | None, embedding_type: GGMLType | None,
                   names: Iterable[str] = ()) -> dict[str, GGMLType]:
    """NE tensor name -> the type --output_type / --embedding_type ask for it, and f32 for
    the matrices of `names` the architecture keeps out of blocks (MoE routers)."""
    wanted = {arch.output_name: output_type, arch.embedding_name: embedding_type}
    kept = {name: GGMLType.F32 for name in names if not arch.blocks(name)}
    return kept | {name: GGMLType(t) for name, t in wanted.items() if t is not None}


def tensor_types(tensors: Mapping[str, tuple[Sequence[int], GGMLType]], chosen: GGMLType,
                 overrides: Mapping[str, GGMLType] | None = None) -> dict[str, GGMLType]:
    """Tensor name -> its type in a `chosen`-type file, from name -> (shape, type in the input)."""
    overrides = overrides or {}
    out = {}
    for name, (shape, source) in tensors.items():
        want = overrides.get(name, chosen)
        if want in QUANTIZED_TYPES:
            out[name] = target_type(shape, source, want)
        else:  # f32 / f16 asked for a matrix: any row length is whole
            out[name] = want if len(shape) == 2 else source
    return out
