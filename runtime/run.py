"""`ne-run` / `netp run`: load a rank, generate, print the text and one timing line.

Launched under mpiexec, each process is one rank of the MPI world; launched
plainly, a shard set's N ranks are simulated in one process (an NE file
runs as 1 rank). Rank 0 encodes the prompt, samples and prints.
"""
from __future__ import annotations

import codecs
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from netp.errors import NetpError
from netp.formats.names import SHARD_TOKENIZER_DIR
from netp.formats.shardset import ShardSet
from netp.formats.tokenizer_dir import tokenizer_dir_for
from netp.models import architecture_names
from netp.runtime.comm import DEFAULT_TIMEOUT, Comm, Traffic, mpi_world, run_world
from netp.runtime.generate import Generation, generate
from netp.runtime.kernels import WarmUp
from netp.runtime.model import RankModel, load_rank_model
from netp.runtime.sampling import Sampler, SamplingParams
from netp.runtime.sources import NEFile, ResolvedModel, close_model, resolve_model, source_world_size


@dataclass(frozen=True)
class RunOptions:
    model: Path
    prompt: str | None = None
    ids: Sequence[int] | None = None
    n_predict: int = -1
    n_ctx: int = 512
    threads: int = 1
    use_mmap: bool = True
    exact: bool = False  # f32 activations in the block kernels (default: q8_0, as ggml)
    sampling: SamplingParams = SamplingParams()
    timeout: float | None = DEFAULT_TIMEOUT  # seconds a collective may take under MPI (docs/design.md §9)


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as e:
        raise NetpError(None, f"--ids {text!r:.60}: expected token ids separated by commas or spaces") from e


def tokenizer_path(model: str | os.PathLike | ResolvedModel, name: str, hint: str = "") -> Path:
    """File `name` of the tokenizer folder travelling with `model` (a shard set's: the one its
    manifest checksums; a path: an NE file, or a shard-set folder); a NetpError naming the
    model when there is none."""
    if not isinstance(model, (NEFile, ShardSet)) and Path(model).is_dir():
        model = ShardSet.load(model, architecture_names())
    path: Path | None
    if isinstance(model, ShardSet):
        where, expected = model.folder, model.folder / SHARD_TOKENIZER_DIR
        path = None if model.tokenizer_dir is None else model.tokenizer_file(name)
    else:
        where = model.path if isinstance(model, NEFile) else Path(model)
        expected = tokenizer_dir_for(where)
        path = expected / name if expected.is_dir() else None
    if path is None or not path.is_file():
        raise NetpError(where, f"no tokenizer found (expected {expected}/{name}){hint}")
    return path


def load_tokenizer(model: str | os.PathLike | ResolvedModel,
                   hint: str = "; pass token ids with --ids instead of -p") -> Any:
    """The tokenizers.Tokenizer of `model`'s tokenizer folder; hint ends the error when there is none."""
    path = tokenizer_path(model, "tokenizer.json", hint)
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type
        raise NetpError(path, f"cannot read the tokenizer: {e}") from e


def check_prompt(prompt: str) -> str:
    """The prompt, refused when it is not text (bytes that are not UTF-8 reach Python as
    lone surrogates, which no tokenizer can encode)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise NetpError(None, f"-p: the prompt is not valid UTF-8 text (byte {e.start} cannot be read)") from e
    return prompt


def encode_prompt(model: ResolvedModel, prompt: str | None, ids: Sequence[int] | None) -> list[int]:
    if ids is not None:
        return list(ids)
    if prompt is None:
        raise NetpError(None, "no prompt: give one with -p TEXT or token ids with --ids")
    return load_tokenizer(model).encode(prompt).ids


class TextStream:
    """Prints tokens as they come, from the NE vocab's bytes (complete UTF-8 only)."""

    def __init__(self, vocab: Sequence[tuple[bytes, float]], eos: int, out: Any = sys.stdout):
        self.vocab, self.eos, self.out = vocab, eos, out
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write_ids(self, ids: Sequence[int]) -> None:
        for t in ids:
            self(t)

    def __call__(self, token: int) -> None:
        if token == self.eos:
            return
        text = self.decoder.decode(self.vocab[token][0])
        if text:
            self.out.write(text)
            self.out.flush()

    def finish(self) -> None:
        self.out.write(self.decoder.decode(b"", final=True) + "\n")
        self.out.flush()


def sent_text(sent: Sequence[Traffic], steps: int) -> str:
    """Per rank, the kB it sends per decoded token: all-reduces + logits gather."""
    if steps == 0:
        return "n/a (no decode step)"
    return ", ".join(f"{t.allreduce / steps / 1e3:.1f}+{t.gather / steps / 1e3:.1f}" for t in sent)


def timing_line(gen: Generation, n_ctx: int, load_ms: float, mode: str, resident: Sequence[int], comm: Comm,
                threads: int, warm: WarmUp | None = None, sent: Sequence[Traffic] = ()) -> str:
    """One line: stop reason, load, prompt and decode speed, weight form, per-rank resident weight MB,
    per-rank bytes sent per decoded token (several ranks), ranks x threads, and how the block kernels
    started (compiled, with its time, or loaded from the cache)."""
    mbs = ", ".join(f"{b / 1e6:.1f}" for b in resident)
    kern = "" if warm is None else \
        f" | kernels compiled in {warm.seconds:.1f} s (first start; cached for the next)" if warm.compiled else \
        f" | kernels loaded from cache in {warm.seconds:.2f} s"
    traffic = f"per-rank kB sent per token (all-reduce+gather): {sent_text(sent, gen.decode_steps)} | " \
        if comm.size > 1 else ""
    return (f"stop: {gen.stop_text(n_ctx)} | load {load_ms:.0f} ms | "
            f"prompt {len(gen.prompt)} tok {gen.prompt_tok_s:.1f} tok/s | "
            f"decode {gen.decode_steps} tok {gen.decode_tok_s:.2f} tok/s | weights {mode} | "
            f"per-rank resident weights MB: {mbs} | {traffic}{comm.describe()} x {threads} thread(s){kern}")


def _slowest_start(starts: Sequence[WarmUp | None]) -> WarmUp | None:
    """The kernel start to report: a rank that compiled, else the slowest cache load."""
    known = [w for w in starts if w is not None]
    return max(known, key=lambda w: (w.compiled, w.seconds)) if known else None


def _rank_main(comm: Comm, opts: RunOptions, resolved: ResolvedModel | None) -> int:
    """One rank's run; `resolved`: the model found once for every simulated rank, or None
    under MPI, where each rank resolves its own (one manifest read per rank)."""
    opened: ResolvedModel | None = None
    try:
        t0 = time.perf_counter()
        prompt: list[int] | None = None
        prompt_error: NetpError | None = None
        with comm.agreeing():
            if resolved is None:
                resolved = opened = resolve_model(opts.model)
            if comm.is_root:  # the tokenizer (~40 MB for SmolLM2's) before the weights, so the process's peak
                try:          # memory is not both at once; a model error still takes precedence (docs/design.md §5)
                    prompt = encode_prompt(resolved, opts.prompt, opts.ids)
                except NetpError as e:
                    prompt_error = e
            model: RankModel = load_rank_model(resolved, comm, opts.n_ctx, use_mmap=opts.use_mmap,
                                               nthread=opts.threads, exact=opts.exact)
            if comm.is_root:
                if prompt_error is not None:
                    raise prompt_error
                assert prompt is not None
                bad = [t for t in prompt if not 0 <= t < model.hp.n_vocab]
                if bad:
                    raise NetpError(opts.model, f"token id {bad[0]} outside the vocabulary of {model.hp.n_vocab}")
        load_ms = (time.perf_counter() - t0) * 1e3
        prompt = comm.bcast(prompt)
        stream = None
        if comm.is_root:
            stream = TextStream(model.source.reader.vocab, model.hp.eos_token_id)
            if opts.prompt is not None:
                sys.stdout.write(opts.prompt)
            else:
                stream.write_ids(prompt)
        sampler = Sampler(opts.sampling) if comm.is_root else None
        gen = generate(model, prompt, opts.n_predict, sampler, stream)
        stats = comm.allgather((load_ms, model.weights.resident_bytes, model.weights.kernels, gen.decode_sent))
        if comm.is_root:
            assert stream is not None
            stream.finish()
            print(timing_line(gen, opts.n_ctx, max(s[0] for s in stats), model.weights.mode, [s[1] for s in stats],
                              comm, opts.threads, _slowest_start([s[2] for s in stats]), [s[3] for s in stats]), flush=True)
        model.close()
        return 0
    finally:
        if opened is not None:
            close_model(opened)


def run(opts: RunOptions, prog: str = "ne-run", debug: bool = False) -> int:
    if opts.prompt is not None:
        check_prompt(opts.prompt)  # before any model loads
    comm = mpi_world(opts.timeout, prog)
    if comm is not None:  # each rank resolves the model itself, inside the ranks' agreement
        return run_world(lambda c: _rank_main(c, opts, None), 1, comm, prog, debug)
    resolved = resolve_model(opts.model)
    try:
        return run_world(lambda c: _rank_main(c, opts, resolved), source_world_size(resolved) or 1, None, prog,
                         debug)
    finally:
        close_model(resolved)
