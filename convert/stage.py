"""HF folder | cached hub id | .gguf  ->  NE f32/f16, one tensor at a time.

The stage knows no architecture: models/ answers which architecture a
config or GGUF is, its hparams and header fields, every NE tensor with its
shape in file order, which rows of which checkpoint tensor each NE tensor
is (the whole tensor, a part of a fused one such as Phi-3's qkv_proj, one
expert of a merged 3-D one: each read alone, so memory stays near one
expert's matrix), the HF hook that reworks a tensor on the way in (LLaMA's
q/k permutation; HF input only), and the tensors config.json alone determines.

Everything that can be checked is checked before any output exists
(config, architecture, every expected tensor present with its shape, no
unknown tensor, the vocab). Then the tokenizer folder and the NE file are
written under temporary names; the folder is renamed first, the NE file
last, so a crash never leaves an NE file without its tokenizer.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

from netp.errors import NetpError
from netp.formats.atomic import atomic_dir
from netp.formats.constants import FTYPE_OF_TYPE, GGMLType
from netp.formats.hf import Checkpoint, open_checkpoint, read_json_object
from netp.formats.ne import NEHeader, NEWriter
from netp.formats.paths import check_output_place, is_gguf
from netp.formats.tokenizer_dir import check_tokenizer_files, tokenizer_dir_for
from netp.formats.vocab import Vocab
from netp.models.architecture import Architecture, SourcePart
from netp.models.checks import check_hparams, check_source_values
from netp.models.hparams import HParams
from netp.sizes import human_size

OUT_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16}
_F16_CHUNK = 1 << 22  # values converted to f16 per write


@dataclass
class Source:
    """One input, opened and understood, nothing written yet."""

    path: Path
    arch: Architecture
    hp: HParams
    tensors: Checkpoint  # names(), shape(name), read(name) / read_rows(name, row0, rows[, out]) -> f32
    gguf: bool  # source names are llama.cpp's (else Hugging Face's)
    transform: bool  # HF weights go through arch.hf_tensor; GGUF ones are already in NE layout
    tie_output: bool  # the output head may come from the embedding when the input has none
    vocab: Callable[[], Vocab]
    write_tokenizer: Callable[[Path], None]

    def parts(self, name: str) -> tuple[tuple[SourcePart, ...], tuple[int, ...]] | None:
        """The NE tensors a source tensor holds and the shape it needs (Architecture.source_parts)."""
        return self.arch.source_parts(name, self.hp, self.gguf)

    def transforms(self, ne: str) -> bool:
        """Whether this tensor's values change on the way in (else its bytes may be copied)."""
        return self.transform and self.arch.transforms_hf(ne)

    def generated(self) -> dict[str, np.ndarray]:
        """NE tensors this input lacks and its config determines (HF input only)."""
        return self.arch.generated_tensors(self.hp) if self.transform else {}

    def close(self) -> None:
        self.tensors.close()


@dataclass
class ConvertResult:
    outfile: Path
    tokenizer_dir: Path
    arch: str
    n_tensors: int
    nbytes: int
    seconds: float
    warnings: tuple[str, ...] = ()  # where neural-speed's own loader would not take the file


def open_hf_folder(folder: Path) -> Source:
    from netp.formats.tokenizer_dir import write_folder_tokenizer
    from netp.formats.vocab import vocab_for_folder
    from netp.models import by_hf_config

    config_path = folder / "config.json"
    if not os.path.lexists(config_path):
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; it holds {ggufs[0]}: pass that file" if len(ggufs) == 1 else ""
        raise NetpError(folder, f"no config.json: not a Hugging Face model folder{hint}")
    config = read_json_object(config_path)
    arch = by_hf_config(config, str(config_path))
    check_source_values(arch, config, str(config_path))
    hp = arch.hparams_from_hf(config, str(config_path))
    tensors = open_checkpoint(folder)
    try:  # every count against the tensors the checkpoint really holds, before anything is built from it
        check_hparams(hp, str(config_path), n_tensors=len(tensors.names()))
    except BaseException:
        tensors.close()
        raise
    return Source(folder, arch, hp, tensors, gguf=False, transform=True, tie_output=hp.tie_embeddings,
                  vocab=lambda: vocab_for_folder(folder, hp.n_vocab),
                  write_tokenizer=lambda out: write_folder_tokenizer(folder, out))


def open_gguf(path: Path) -> Source:
    from netp.formats.gguf_in import GGUFFile
    from netp.formats.tokenizer_dir import write_gguf_tokenizer
    from netp.formats.vocab import vocab_from_gguf
    from netp.models import by_gguf_architecture

    g = GGUFFile(path)
    try:
        arch = by_gguf_architecture(g.architecture, str(path), g.names())
        check_source_values(arch, g.metadata, str(path), gguf=True)
        hp = arch.hparams_from_gguf(g.metadata, str(path), g.names())
        check_hparams(hp, str(path), n_tensors=len(g.names()), source="GGUF metadata")
    except BaseException:
        g.close()
        raise
    # llama.cpp writes no output.weight for tied embeddings.
    return Source(path, arch, hp, g, gguf=True, transform=False, tie_output=True,
                  vocab=lambda: vocab_from_gguf(g.metadata, hp.n_vocab, path),
                  write_tokenizer=lambda out: write_gguf_tokenizer(g.metadata, path, out))


def open_input(path: Path) -> Source:
    if path.is_dir():
        return open_hf_folder(path)
    if is_gguf(path, "a Hugging Face model folder or GGUF file"):
        return open_gguf(path)
    raise NetpError(path, "is neither a Hugging Face model folder nor a GGUF file")


@dataclass(frozen=True)
class Planned:
    """Where one NE tensor comes from: rows [row0, row0 + rows) of source tensor `source`
    seen as a (rows, row length) matrix; source None: generated from the config."""

    source: str | None
    row0: int = 0
    rows: int = 0


def _holds(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """A source shape holds the values of `want`: equal, or with leading axes of 1 more
    (Qwen2-MoE's shared_expert_gate, (1, n_embd) in HF, is the vector llama.cpp stores)."""
    extra = len(got) - len(want)
    return extra >= 0 and all(d == 1 for d in got[:extra]) and tuple(got[extra:]) == tuple(want)


def plan_ne_tensors(src: Source) -> dict[str, tuple[Planned, tuple[int, ...]]]:
    """NE name -> (where its values are, shape), in NE file order; refuses what does not fit."""
    expected = src.arch.tensor_shapes(src.hp)
    found: dict[str, Planned] = {}
    for name in src.tensors.names():
        layout = src.parts(name)
        if layout is None or any(part.ne not in expected for part in layout[0]):
            raise NetpError(src.path, f"tensor {name} is not part of a {src.arch.name} model with this config "
                                      f"({src.hp.n_layer} layers); netp refuses weights it would not use")
        parts, want = layout
        if parts and not _holds(tuple(src.tensors.shape(name)), want):
            raise NetpError(src.path, f"tensor {name} has shape {list(src.tensors.shape(name))}; this config "
                                      f"needs {list(want)}")
        found |= {part.ne: Planned(name, part.row0, part.rows) for part in parts}
    found |= {ne: Planned(None) for ne in src.generated() if ne in expected and ne not in found}
    embedding, output = src.arch.embedding_name, src.arch.output_name
    if output in expected and output not in found and src.tie_output and embedding in found:
        found[output] = found[embedding]  # tied embeddings: the head is the embedding matrix
    missing = [ne for ne in expected if ne not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise NetpError(src.path, f"missing tensor {missing[0]}{more} of a {src.arch.name} model "
                                  f"with {src.hp.n_layer} layers")
    return {ne: (found[ne], tuple(shape)) for ne, shape in expected.items()}


Progress = Callable[[int, int], None]  # (units just done, total units); the CLI draws the bar


class Extent(NamedTuple):
    """Where a tensor's bytes already are its NE f32 data: copy them, do not decode."""

    fd: int
    offset: int
    nbytes: int


class SourceRows(NamedTuple):
    """A tensor whose values are its source rows as they are, only widened to f32 (bf16,
    f16, a GGUF type...): read them a chunk at a time, NE rows [r, r + n) being
    `src.tensors.read_rows(name, row0 + r, n)`, never the whole tensor at once."""

    name: str
    row0: int


TensorData = np.ndarray | Extent | SourceRows


@dataclass(frozen=True)
class NETensor:
    """One tensor of the NE file convert writes: its record, and the source tensor it comes from."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    source: Planned

    @property
    def source_name(self) -> str | None:  # None: generated from the config (no source tensor)
        return self.source.source


def ne_tensors(plan: dict[str, tuple[Planned, tuple[int, ...]]], out_type: GGMLType) -> list[NETensor]:
    """The NE file's tensors in file order; 1-D tensors (norms, biases) stay f32."""
    return [NETensor(ne, GGMLType.F32 if len(shape) == 1 else out_type, shape, planned)
            for ne, (planned, shape) in plan.items()]


def ne_header(src: Source, out_type: GGMLType) -> NEHeader:
    return NEHeader(**src.arch.header_fields(src.hp), ftype=FTYPE_OF_TYPE[out_type])


def converted_tensors(src: Source, tensors: list[NETensor]) -> Iterator[tuple[NETensor, TensorData]]:
    """Each NE tensor in file order with its data: an Extent when the source bytes are
    the NE bytes (f32 to f32, untransformed); SourceRows for any other untransformed
    matrix, whose rows the consumer reads a chunk at a time; else its f32 values in NE
    layout (which may live in a buffer the next tensor reuses: consume before
    advancing): its rows of the source tensor read (only those: one expert of a merged
    tensor at a time), reworked by the HF hook, or generated from the config (no
    source tensor)."""
    extent_of = getattr(src.tensors, "f32_extent", None)
    generated = src.generated()
    for t in tensors:
        name, row0, rows = t.source.source, t.source.row0, t.source.rows
        if name is None:
            yield t, generated[t.name]
            continue
        copyable = t.ggml_type == GGMLType.F32 and not src.transforms(t.name)
        extent = extent_of(name, row0, rows) if copyable and extent_of is not None else None
        if extent is not None:
            yield t, Extent(*extent)
            continue
        if (len(t.shape) > 1 and not src.transforms(t.name)
                and tuple(src.tensors.shape(name))[-1:] == t.shape[-1:]):  # its rows are the NE rows
            yield t, SourceRows(name, row0)
            continue
        whole = row0 == 0 and rows == _n_rows(src.tensors.shape(name))
        data = (src.tensors.read(name) if whole else src.tensors.read_rows(name, row0, rows)).reshape(t.shape)
        if src.transforms(t.name):
            data = src.arch.hf_tensor(t.name, data, src.hp)
        yield t, data
        del data


def _n_rows(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1]) if len(shape) > 1 else 1


def _write_rows(writer: NEWriter, src: Source, t: NETensor, rows: SourceRows) -> None:
    """A SourceRows tensor read and written a chunk of rows at a time, through one buffer."""
    row_len, n_rows = t.shape[-1], _n_rows(t.shape)
    step = max(1, _F16_CHUNK // row_len)
    buffer = np.empty(min(step, n_rows) * row_len, dtype=np.float32)
    for r in range(0, n_rows, step):
        n = min(step, n_rows - r)
        x = src.tensors.read_rows(rows.name, rows.row0 + r, n, out=buffer[:n * row_len])
        writer.write(x if t.ggml_type == GGMLType.F32 else x.astype(np.float16))


def _write_values(writer: NEWriter, data: np.ndarray, ggml_type: GGMLType) -> None:
    flat = np.ascontiguousarray(data, dtype=np.float32).reshape(-1)
    if ggml_type == GGMLType.F32:
        writer.write(flat)
        return
    for start in range(0, flat.size, _F16_CHUNK):
        writer.write(flat[start:start + _F16_CHUNK].astype(np.float16))


def check_outfile(outfile: Path) -> None:
    if outfile.is_dir():
        raise NetpError(outfile, "is a folder; --outfile names the NE file to write")
    parent = outfile.parent if str(outfile.parent) else Path(".")
    if not parent.is_dir():
        raise NetpError(outfile, f"folder {parent} does not exist")


def open_model(model: str, outputs: Sequence[Path] = ()) -> Source:
    """MODEL as the user names it (HF folder, cached hub id, .gguf), opened; `outputs`: the
    paths about to be written, refused when over, into or in place of it (docs/design.md §8)."""
    from netp.convert.resolve import resolve_model

    path = resolve_model(model)
    for out in outputs:
        check_output_place(out, [path], "output")
    return open_input(path)


def out_type_of(outtype: str) -> GGMLType:
    if outtype not in OUT_TYPES:
        raise NetpError(None, f"--outtype {outtype!r} is not one of {', '.join(OUT_TYPES)}")
    return OUT_TYPES[outtype]


def convert(model: str, outfile: str | Path, outtype: str = "f32", *,
            on_progress: Progress | None = None) -> ConvertResult:
    """Convert MODEL (HF folder, cached hub id or .gguf) to an NE file plus its tokenizer folder.
    `on_progress(1, n_tensors)` after each tensor."""
    t0 = time.perf_counter()
    out_type = out_type_of(outtype)
    outfile = Path(outfile)
    check_outfile(outfile)

    tok_target = tokenizer_dir_for(outfile)
    src = open_model(model, [outfile, tok_target])
    try:
        tensors = ne_tensors(plan_ne_tensors(src), out_type)
        vocab = src.vocab()
        with atomic_dir(tok_target) as tok_tmp:
            src.write_tokenizer(tok_tmp)
            check_tokenizer_files(tok_tmp, tok_target)
            writer = NEWriter(outfile, ne_header(src, out_type), vocab)
            try:
                for t, data in converted_tensors(src, tensors):
                    writer.begin_tensor(t.name, t.ggml_type, t.shape)
                    if isinstance(data, Extent):  # the bytes are already right: copy them in the kernel, like cp
                        writer.copy_from(*data)
                    elif isinstance(data, SourceRows):
                        _write_rows(writer, src, t, data)
                    else:
                        _write_values(writer, data, t.ggml_type)
                    del data
                    if on_progress is not None:
                        on_progress(1, len(tensors))
                writer.sync()  # a full disk fails here, before the tokenizer folder goes into place
            except BaseException:
                writer.abort()
                raise
        writer.commit()  # the tokenizer folder is in place: the NE file goes last
    finally:
        src.close()
    return ConvertResult(outfile, tok_target, src.arch.name, len(tensors), outfile.stat().st_size,
                         time.perf_counter() - t0, tuple(src.arch.ns_loader_caveats(src.hp)))


def summary_line(r: ConvertResult) -> str:
    return (f"wrote {r.outfile} ({r.arch}, {r.n_tensors} tensors, {human_size(r.nbytes)}) and {r.tokenizer_dir}/ "
            f"in {r.seconds:.1f} s")


__all__ = ["convert", "open_input", "open_model", "plan_ne_tensors", "ne_tensors", "ne_header", "converted_tensors",
           "summary_line", "ConvertResult", "Source", "NETensor", "Extent", "SourceRows", "TensorData", "OUT_TYPES"]
