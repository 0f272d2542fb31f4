"""`netp verify SHARDS` and `ne-run --verify` (docs/design.md §5).

One prompt, teacher-forced along the reference's greedy tokens (so one
near-tie cannot cascade), the prompt as one batch and then token by token,
so both the batch and the KV-cache paths are checked. Comparisons, each
when its inputs are given:
1. the target (a shard set under its N ranks, MPI or simulated) vs the
   unsharded reference at 1 rank: max |dlogit| <= 1e-3 and the same argmax
   wherever the reference's top-2 margin exceeds 1e-3;
2. the f32 NE file vs transformers' own model in float32: the same rule;
3. a quantized reference vs the f32 file: mean KL divergence and top-1
   agreement (llama.cpp's --kl-divergence figures), information only;
4. a quantized reference under the default block kernels (q8_0
   activations, as ggml) vs --exact (f32 activations) on the same blocks:
   max |dlogit| and mean KL, information only.
A failure exits non-zero naming the first layer whose hidden state differs
by more than 1e-3 of its own scale (max |h|).

The reference, f32 and transformers runs happen on rank 0 alone while the
other ranks wait idle; the target runs on every rank.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from netp.errors import NetpError
from netp.formats.ne import NEReader
from netp.formats.paths import regular_file
from netp.models.context import ForwardTrace
from netp.runtime.comm import DEFAULT_TIMEOUT, Comm, PeerFailed, SoloComm, mpi_world, run_world
from netp.runtime.kernels import KERNEL_TYPES
from netp.runtime.model import RankModel, load_rank_model
from netp.runtime.run import check_prompt, load_tokenizer
from netp.runtime.sources import check_world_size, tokenizer_dir
from netp.shard.check import load_shard_manifest

BOUND = 1e-3


@dataclass(frozen=True)
class VerifyOptions:
    target: Path
    ref: Path | None = None
    f32: Path | None = None
    hf: str | None = None
    prompt: str = "Once upon a time, there existed a little girl,"
    n_tokens: int = 16
    threads: int = 1
    use_mmap: bool = True
    exact: bool = False  # both sides run the block kernels on f32 activations
    bound: float = BOUND
    timeout: float | None = DEFAULT_TIMEOUT  # seconds a collective may take under MPI (docs/design.md §9)


@dataclass
class Plan:
    """What will be compared, resolved from the options and the manifest."""

    target: Path
    world: int  # ranks the target runs on
    ref: Path | None
    f32: Path | None
    hf: str | None
    notes: list[str] = field(default_factory=list)


@dataclass
class Pass:
    """One model's teacher-forced run: logits (T, V) and hidden states (n_layer + 1) x (T, n_embd)."""

    name: str
    logits: np.ndarray
    states: list[np.ndarray] | None = None


@dataclass
class Comparison:
    title: str
    ok: bool
    lines: list[str]
    failure: str = ""


def _is_f32(path: Path) -> bool:
    with NEReader(path) as r:
        return r.header.ftype == 0


def _find_source(folder: Path, name: str, size: int) -> Path | None:
    for candidate in (folder.parent / name, Path.cwd() / name):
        if candidate.is_file() and candidate.stat().st_size == size:
            return candidate
    return None


def resolve(opts: VerifyOptions, comm_size: int | None) -> Plan:
    target = Path(opts.target)
    notes: list[str] = []
    ref = opts.ref
    if target.is_dir():
        manifest = load_shard_manifest(target)
        world = manifest.world_size
        if comm_size is not None:
            check_world_size(target, manifest, comm_size)
        if ref is None:
            ref = _find_source(target, manifest.source.name, manifest.source.size)
            if ref is None:
                notes.append(f"the manifest's source {manifest.source.name} was not found beside the shard set; "
                             f"pass --ref to compare with it")
    elif os.path.lexists(target):
        regular_file(target, "an NE file or a shard set")
        world = comm_size or 1
        ref = ref or target
    else:
        raise NetpError(target, "no such file or shard set")
    for p in (ref, opts.f32):
        if p is not None:
            regular_file(p, "an NE file")
    f32 = opts.f32
    if f32 is None and ref is not None and _is_f32(Path(ref)):
        f32 = ref
    if ref is None and f32 is None:
        raise NetpError(target, "nothing to verify against: pass --ref (the unsharded file) and/or --f32")
    if opts.hf is not None and f32 is None:
        raise NetpError(opts.hf, "--hf is compared with the f32 NE file: pass --f32 too")
    _check_provenance(target, None if ref is None else Path(ref), None if f32 is None else Path(f32))
    return Plan(target, world, None if ref is None else Path(ref), None if f32 is None else Path(f32),
                opts.hf, notes)


def _check_provenance(target: Path, ref: Path | None, f32: Path | None) -> None:
    """Refuse files of another model before any runs (docs/design.md §8): a shard set's --ref
    must be its source, and --f32 the file the quantized one was made from."""
    from netp.runtime.provenance import check_derived_from, check_ref_is_source

    manifest = load_shard_manifest(target) if target.is_dir() else None
    if manifest is not None and ref is not None:
        check_ref_is_source(ref, manifest, target)
    if f32 is None:
        return
    if not _is_f32(f32):
        raise NetpError(f32, "is not an f32 NE file (its header's ftype is not f32): --f32 takes the f32 source")
    if ref is not None and ref != f32:
        with NEReader(ref) as other:
            check_derived_from(f32, other)
    elif manifest is not None and ref is None:  # no --ref: prove --f32 against rank 0's file
        from netp.shard.check import open_rank_file

        rows = {t.name: None if t.axis is None else t.ranges[0] for t in manifest.tensors.values() if t.axis != 1}
        with open_rank_file(target, manifest, 0) as rank0:
            check_derived_from(f32, rank0, {t.name: t.shape for t in manifest.tensors.values()}, rows)


def _tokenizer_for(plan: Plan) -> Path:
    for model in (plan.target, plan.ref, plan.f32):
        if model is not None and tokenizer_dir(model) is not None:
            return model
    return plan.target  # load_tokenizer names what it expected there


# -- running models -------------------------------------------------------------

def teacher_forced(model: RankModel, tokens: Sequence[int], n_prompt: int) -> np.ndarray | None:
    """Logits (len(tokens), V) on rank 0: the prompt as one batch, then one token at a time."""
    rows = [model.forward(np.asarray(tokens[:n_prompt]), 0, all_logits=True)]
    for pos in range(n_prompt, len(tokens)):
        rows.append(model.forward(np.asarray(tokens[pos:pos + 1]), pos))
    return np.concatenate([r for r in rows if r is not None]) if model.comm.is_root else None  # rank 0 has all


def batch_states(model: RankModel, tokens: Sequence[int]) -> list[np.ndarray]:
    trace = ForwardTrace()
    model.forward(np.asarray(tokens), 0, trace=trace)
    return trace.states


def _solo_forward(model: RankModel, tokens: Sequence[int], start: int, all_logits: bool = False) -> np.ndarray:
    logits = model.forward(np.asarray(tokens), start, all_logits)
    assert logits is not None  # one rank: rank 0
    return logits


def reference_pass(path: Path, prompt: list[int], n_tokens: int, opts: VerifyOptions) -> tuple[list[int], Pass]:
    """Greedy continuation of the prompt by the reference at 1 rank; its logits at every position."""
    model = load_rank_model(path, SoloComm(), len(prompt) + n_tokens, use_mmap=opts.use_mmap,
                            nthread=opts.threads, exact=opts.exact)
    try:
        tokens = list(prompt)
        rows = [_solo_forward(model, prompt, 0, all_logits=True)]
        for _ in range(n_tokens):
            tokens.append(int(np.argmax(rows[-1][-1])))
            rows.append(_solo_forward(model, tokens[-1:], len(tokens) - 1))
        return tokens, Pass(path.name, np.concatenate(rows)[: len(tokens)], batch_states(model, tokens))
    finally:
        model.close()


def solo_pass(path: Path, tokens: list[int], n_prompt: int, opts: VerifyOptions) -> Pass:
    model = load_rank_model(path, SoloComm(), len(tokens), use_mmap=opts.use_mmap, nthread=opts.threads,
                            exact=opts.exact)
    try:
        logits = teacher_forced(model, tokens, n_prompt)
        assert logits is not None
        return Pass(path.name, logits, batch_states(model, tokens))
    finally:
        model.close()


def transformers_pass(hf: str, tokens: list[int], threads: int) -> Pass:
    """transformers' model in float32 (a folder, a cached hub id, or a .gguf file)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise NetpError(hf, f"--hf needs torch and transformers ({e}); install netp[torch]") from e
    torch.set_num_threads(max(1, threads))
    if not sys.stderr.isatty():  # netp's rule: progress bars on a terminal only
        import functools

        import transformers.modeling_gguf_pytorch_utils as hf_gguf
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if getattr(hf_gguf, "tqdm", None) is not None:  # its GGUF reader calls tqdm directly
            hf_gguf.tqdm = functools.partial(hf_gguf.tqdm, disable=True)
    p = Path(hf)
    is_gguf = p.suffix == ".gguf" and p.is_file()
    if is_gguf and importlib.util.find_spec("accelerate") is None:  # from_pretrained(gguf_file=) needs it
        raise NetpError(hf, "--hf with a .gguf needs accelerate; install netp[torch]")
    try:
        if is_gguf:  # transformers' GGUF reader dequantizes and undoes the q/k permutation
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        elif p.is_dir():
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise NetpError(hf, f"transformers cannot load it: {type(e).__name__}: {e}") from e
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([tokens]), output_hidden_states=True)
    states = [h[0].float().numpy() for h in out.hidden_states]
    return Pass(f"transformers ({p.name})", out.logits[0].float().numpy(), states)


# -- comparing ----------------------------------------------------------------------

def first_diverging_layer(ref: list[np.ndarray] | None, other: list[np.ndarray] | None, bound: float,
                          n_compare: int | None = None) -> str:
    """Name the first hidden state differing by more than bound x its scale.
    States: [0] enters layer 0 (the embeddings), [i] leaves layer i - 1."""
    if not ref or not other:
        return "hidden states unavailable"
    n = min(len(ref), len(other)) if n_compare is None else n_compare
    for i in range(n):
        scale = float(np.abs(ref[i]).max()) or 1.0
        diff = float(np.abs(ref[i] - other[i]).max())
        if diff > bound * scale:
            where = "the token embeddings" if i == 0 else f"layer {i - 1}"
            return f"first diverging hidden state: {where} (max |dh| {diff:.3g} > {bound:g} x scale {scale:.3g})"
    return "every hidden state compared agrees within 1e-3 of its scale; the difference arises after them " \
           "(final norm or output head)"


def _token_text(tokenizer: Any, token: int) -> str:
    text = tokenizer.decode([token]) if tokenizer is not None else str(token)
    return repr(text)[1:-1][:14]


def compare_logits(title: str, ref: Pass, other: Pass, tokens: list[int], bound: float, tokenizer: Any,
                   n_states: int | None = None) -> Comparison:
    if ref.logits.shape != other.logits.shape:
        return Comparison(title, False, [], f"logits have shape {other.logits.shape} vs {ref.logits.shape}")
    lines = [f"  {'pos':>4}  {'token':<16} {'max|dlogit|':>12} {'top-2 margin':>13}  argmax"]
    worst, worst_pos, disagree, skipped = 0.0, 0, [], 0
    for pos, (a, b) in enumerate(zip(ref.logits, other.logits)):
        d = float(np.abs(a - b).max())
        top2 = np.partition(a, -2)[-2:]
        margin = float(top2[1] - top2[0])
        same = int(np.argmax(a)) == int(np.argmax(b))
        if margin > bound and not same:
            disagree.append(pos)
        elif margin <= bound:
            skipped += 1
        if d > worst:
            worst, worst_pos = d, pos
        verdict = "same" if same else ("DIFFERENT" if margin > bound else "differs (near-tie)")
        lines.append(f"  {pos:>4}  {_token_text(tokenizer, tokens[pos]):<16} {d:>12.3e} {margin:>13.4f}  {verdict}")
    ok = worst <= bound and not disagree
    n = len(tokens)
    lines.append(f"  max |dlogit| {worst:.3e} (position {worst_pos}) {'<=' if worst <= bound else '>'} {bound:g}; "
                 f"argmax agrees at {n - len(disagree) - skipped}/{n - skipped} positions"
                 f"{f' ({skipped} near-ties skipped)' if skipped else ''}: {'PASS' if ok else 'FAIL'}")
    failure = ""
    if not ok:
        what = f"max |dlogit| {worst:.3e} > {bound:g} at position {worst_pos}" if worst > bound else \
            f"argmax differs at position {disagree[0]} (margin above {bound:g})"
        failure = f"{title}: {what}; {first_diverging_layer(ref.states, other.states, bound, n_states)}"
    return Comparison(title, ok, lines, failure)


def kl_table(title: str, f32: Pass, quant: Pass, tokens: list[int], tokenizer: Any) -> Comparison:
    p_log = _log_softmax(f32.logits.astype(np.float64))
    q_log = _log_softmax(quant.logits.astype(np.float64))
    kl = (np.exp(p_log) * (p_log - q_log)).sum(axis=-1)
    top1 = np.argmax(f32.logits, axis=-1) == np.argmax(quant.logits, axis=-1)
    lines = [f"  {'pos':>4}  {'token':<16} {'KL(f32||q)':>12}  top-1"]
    for pos in range(len(tokens)):
        lines.append(f"  {pos:>4}  {_token_text(tokenizer, tokens[pos]):<16} {kl[pos]:>12.5f}  "
                     f"{'same' if top1[pos] else 'different'}")
    lines.append(f"  mean KL divergence {kl.mean():.5f}, max {kl.max():.5f}; top-1 agreement "
                 f"{top1.mean() * 100:.1f}% ({int(top1.sum())}/{top1.size}) (information, not a check)")
    return Comparison(title, True, lines)


def kernel_modes_table(name: str, default: Pass, exact: Pass, tokens: list[int]) -> Comparison:
    """The default block kernels (q8_0 activations) vs --exact (f32 activations) on one file."""
    d_log = _log_softmax(default.logits.astype(np.float64))
    e_log = _log_softmax(exact.logits.astype(np.float64))
    kl = (np.exp(e_log) * (e_log - d_log)).sum(axis=-1)
    diff = np.abs(default.logits - exact.logits).max(axis=-1)
    top1 = np.argmax(default.logits, axis=-1) == np.argmax(exact.logits, axis=-1)
    lines = [f"  default vs --exact: max |dlogit| {diff.max():.3e} (position {int(diff.argmax())}), mean KL "
             f"{kl.mean():.6f} (exact || default) over {len(tokens)} positions; "
             f"top-1 agreement {top1.mean() * 100:.1f}% "
             f"(information, not a check)"]
    return Comparison(f"{name}: default kernels (q8_0 activations) vs --exact (f32 activations)", True, lines)


def _has_blocks(path: Path) -> bool:
    with NEReader(path) as r:
        return any(t.ggml_type in KERNEL_TYPES for t in r.tensors.values())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def print_comparison(c: Comparison) -> None:
    print(f"\n== {c.title}")
    print("\n".join(c.lines), flush=True)


# -- the program ----------------------------------------------------------------------

def _reference(comm: Comm, opts: VerifyOptions, plan: Plan) -> tuple[Any, list[int], int, Pass | None]:
    """Rank 0 encodes the prompt and runs the reference; every rank learns the tokens.
    Returns (tokenizer, tokens, prompt length, reference pass); the tokenizer and the pass on rank 0 only."""
    tokenizer = prompt = tokens = ref = None
    with comm.agreeing(idle=True):
        if comm.is_root:
            tokenizer = load_tokenizer(_tokenizer_for(plan))
            prompt = tokenizer.encode(opts.prompt).ids
            if not prompt:
                raise NetpError(None, "the prompt encodes to no tokens")
            print(f"verify {plan.target}: prompt {len(prompt)} tokens + {opts.n_tokens} greedy tokens of the "
                  f"reference, teacher-forced; bound max |dlogit| <= {opts.bound:g}", flush=True)
            for note in plan.notes:
                print(f"note: {note}", flush=True)
            token_ref = plan.ref or plan.f32
            assert token_ref is not None
            tokens, ref = reference_pass(token_ref, prompt, opts.n_tokens, opts)
    tokens = comm.bcast(tokens)
    n_prompt = comm.bcast(None if prompt is None else len(prompt))
    return tokenizer, tokens, n_prompt, ref


def _compare_target(comm: Comm, opts: VerifyOptions, plan: Plan, tokenizer: Any, tokens: list[int],
                    n_prompt: int, ref: Pass | None) -> str | None:
    """The target on every rank, teacher-forced, against the reference; the failure text on rank 0."""
    root = comm.is_root
    with comm.agreeing():
        model = load_rank_model(plan.target, comm, len(tokens), use_mmap=opts.use_mmap, nthread=opts.threads,
                                exact=opts.exact)
    try:
        logits = teacher_forced(model, tokens, n_prompt)
        comparison = None
        if root:
            assert ref is not None and logits is not None
            title = f"{plan.target} on {comm.describe()} vs {ref.name} on 1 rank"
            comparison = compare_logits(title, ref, Pass(str(plan.target), logits), tokens, opts.bound, tokenizer)
        need_states = comm.bcast(None if comparison is None else not comparison.ok)
        if need_states:  # find the first diverging layer: every rank takes part
            states = batch_states(model, tokens)
            if root:
                assert comparison is not None and ref is not None and logits is not None
                comparison = compare_logits(comparison.title, ref, Pass(str(plan.target), logits, states),
                                            tokens, opts.bound, tokenizer)
        if root:
            assert comparison is not None
            print_comparison(comparison)
            return None if comparison.ok else comparison.failure
        return None
    finally:
        model.close()


def _compare_f32(opts: VerifyOptions, plan: Plan, tokenizer: Any, tokens: list[int], n_prompt: int,
                 ref: Pass) -> str | None:
    """Rank 0: the f32 file against transformers, and the KL table of the quantized reference against it."""
    failure = None
    f32 = None
    if plan.f32 is not None:
        f32 = ref if plan.ref in (None, plan.f32) else solo_pass(plan.f32, tokens, n_prompt, opts)
    if plan.hf is not None and f32 is not None:
        hf = transformers_pass(plan.hf, tokens, opts.threads)
        # transformers' last hidden state is after the final norm: compare the ones before it
        c = compare_logits(f"{f32.name} (1 rank) vs transformers {plan.hf}", hf, f32, tokens,
                           opts.bound, tokenizer, n_states=len(hf.states or []) - 1)
        print_comparison(c)
        if not c.ok:
            failure = c.failure
    if f32 is not None and plan.ref is not None and f32 is not ref:
        print_comparison(kl_table(f"{ref.name} (quantized) vs {f32.name}: KL divergence",
                                  f32, ref, tokens, tokenizer))
    return failure


def _verify_rank(comm: Comm, opts: VerifyOptions, plan: Plan) -> str | None:
    """Every rank runs this; returns (on rank 0) the failure text or None."""
    tokenizer, tokens, n_prompt, ref = _reference(comm, opts, plan)
    failures: list[str] = []
    if plan.ref is not None and (plan.target != plan.ref or plan.world > 1):
        failure = _compare_target(comm, opts, plan, tokenizer, tokens, n_prompt, ref)
        if failure:
            failures.append(failure)
    with comm.agreeing(idle=True):
        if comm.is_root:
            assert ref is not None and tokens is not None and n_prompt is not None
            failure = _compare_f32(opts, plan, tokenizer, tokens, n_prompt, ref)
            if failure:
                failures.append(failure)
            if plan.ref is not None and _has_blocks(plan.ref):
                other = solo_pass(plan.ref, tokens, n_prompt, replace(opts, exact=not opts.exact))
                default, exact = (other, ref) if opts.exact else (ref, other)
                print_comparison(kernel_modes_table(plan.ref.name, default, exact, tokens))
    status = comm.bcast(failures[0] if failures else None)
    if comm.is_root:
        print(f"\nverify: {'FAIL' if status else 'PASS'}", flush=True)
    return status


def verify(opts: VerifyOptions, prog: str = "netp verify", debug: bool = False) -> int:
    check_prompt(opts.prompt)  # before any model loads
    comm = mpi_world(opts.timeout, prog)

    def rank_main(c: Comm) -> str | None:
        with c.agreeing():
            plan = resolve(opts, c.size)
        status = _verify_rank(c, opts, plan)
        if status and not c.is_root:
            raise PeerFailed()
        return status

    if comm is None:
        with SoloComm().agreeing():
            plan = resolve(opts, None)
        status = run_world(lambda c: _verify_rank(c, opts, plan), plan.world, None, prog, debug)
    else:
        status = run_world(rank_main, 1, comm, prog, debug)
    if status:
        raise NetpError(opts.target, f"verification failed: {status}")
    return 0
