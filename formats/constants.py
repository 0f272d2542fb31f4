"""Every magic number of the NE format in one place.

ggml type ids and block geometry come from gguf-py (the same ids ggml uses),
so there is one table of type -> (values per block, bytes per block).
The NE header is described once, as a table of (field, struct format,
default); the reader and the writer both walk it.
"""
from __future__ import annotations

import struct

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as GGMLType

import netp.typenames as _cheap

__all__ = [
    "GGMLType", "SUPPORTED_TYPES", "QUANTIZED_TYPES", "BLOCK_SIZE", "block_geometry",
    "row_nbytes", "NE_MAGIC", "NE_FILE_VERSION", "NE_ALIGNMENT", "FTYPE_OF_TYPE",
    "TYPE_OF_FTYPE", "NE_HEADER_FIELDS", "NE_HEADER_STRUCT", "TYPE_NAMES", "type_from_name",
    "SPLIT_KINDS", "SPLIT_UNITS", "SPLIT_AXIS",
]

# The tensor types netp reads and writes.
SUPPORTED_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
QUANTIZED_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
BLOCK_SIZE = 32  # values per block for every quantized type netp writes
TYPE_NAMES = {t: t.name.lower() for t in SUPPORTED_TYPES}  # "q4_0", "f32", ...


def _check_cheap_copy() -> None:
    """netp/typenames.py (the copy CLIs and kernels import without gguf) agrees with this table:
    a real check, run at import, that `python -O` does not drop."""
    ours = (tuple(TYPE_NAMES.values()), tuple(TYPE_NAMES[t] for t in QUANTIZED_TYPES), BLOCK_SIZE)
    cheap = (_cheap.TYPE_NAMES, _cheap.QUANTIZED_TYPE_NAMES, _cheap.QK)
    if ours != cheap:
        raise ImportError(f"netp/typenames.py (type names, quantized type names, QK) {cheap} disagrees with "
                          f"formats/constants.py {ours}; make them agree")


_check_cheap_copy()


# How a tensor is cut across tensor-parallel ranks: the manifest records these and
# models' split plans use them (docs/design.md §4).
SPLIT_KINDS = ("rows", "cols", "rank0", "replicated")
SPLIT_UNITS = ("q_heads", "kv_heads", "qkv_heads", "ffn", "vocab")  # what a rows/cols cut counts
SPLIT_AXIS = {"rows": 0, "cols": 1}  # numpy axis a cut kind cuts; rank0/replicated tensors are stored whole


def type_from_name(name: str) -> GGMLType:
    for t, n in TYPE_NAMES.items():
        if n == name.lower():
            return t
    raise ValueError(f"unknown tensor type {name!r} (supported: {', '.join(TYPE_NAMES.values())})")


def block_geometry(t: GGMLType) -> tuple[int, int]:
    """(values per block, bytes per block); 1 value per 'block' for f32/f16."""
    return GGML_QUANT_SIZES[t]


def row_nbytes(t: GGMLType, n_values: int) -> int:
    """Bytes of a row of n_values along ne[0]; n_values must fill whole blocks."""
    block, nbytes = GGML_QUANT_SIZES[t]
    if n_values % block:
        raise ValueError(f"{n_values} values do not fill whole {t.name} blocks of {block}")
    return n_values // block * nbytes


# The file magic is the bytes b"ggjt" reversed: ggml wrote the int 0x67676a74
# little-endian.
NE_MAGIC = b"ggjt"[::-1]
NE_FILE_VERSION = 1
NE_ALIGNMENT = 32  # tensor data starts at a multiple of 32 of the file offset

# ftype in the header: the type of the bulk of the weights.
FTYPE_OF_TYPE = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q4_1: 3, GGMLType.Q8_0: 7}
TYPE_OF_FTYPE = {v: k for k, v in FTYPE_OF_TYPE.items()}

# The NE header after the magic, in file order: (field, struct format, default).
# Field names follow neural-speed's model_hparams.
NE_HEADER_FIELDS: tuple[tuple[str, str, int | float], ...] = (
    ("version", "i", NE_FILE_VERSION),
    ("n_vocab", "i", 0),
    ("n_embd", "i", 0),
    ("n_mult", "i", 0),
    ("n_head", "i", 0),
    ("n_head_kv", "i", 0),
    ("n_layer", "i", 0),
    ("n_rot", "i", 0),
    ("ftype", "i", 0),
    ("max_seq_len", "i", 0),
    ("alibi_bias_max", "f", 0.0),
    ("clip_qkv", "f", 0.0),
    ("par_res", "i", 0),  # GPT-NeoX use_parallel_residual
    ("word_embed_proj_dim", "i", 0),
    ("do_layer_norm_before", "i", 0),
    ("multi_query_group_num", "i", 0),
    ("ffn_hidden_size", "i", 0),
    ("inner_hidden_size", "i", 0),
    ("n_experts", "i", 0),
    ("n_experts_used", "i", 0),
    ("n_embd_head_k", "i", 0),
    ("norm_eps", "f", 1e-5),
    ("freq_base", "f", 10000.0),
    ("freq_scale", "f", 1.0),
    ("rope_scaling_factor", "f", 0.0),
    ("original_max_position_embeddings", "i", 0),
    ("use_yarn", "i", 0),
    ("bos_token_id", "i", -1),
    ("eos_token_id", "i", -1),
    ("pad_token_id", "i", -1),
    ("sep_token_id", "i", -1),
)
NE_HEADER_STRUCT = struct.Struct("<" + "".join(fmt for _, fmt, _ in NE_HEADER_FIELDS))

# Tensor record header: n_dims, name length, ggml type.
NE_TENSOR_HEAD = struct.Struct("<iii")
NE_MAX_DIMS = 4
