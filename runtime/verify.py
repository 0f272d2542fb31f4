"""`netp verify SHARDS` and `ne-run --verify` (docs/design.md §5).

One prompt plus the target's own greedy continuation; the target runs it as
the prompt batch then token by token, and as one batch; the references
(streamed layer by layer on rank 0, runtime/streamed.py and hf_reference.py)
run it as one batch (docs/design.md §5). Comparisons, each a record
(runtime/comparisons.py) held to its limits:
0. `decode-vs-batch`: the target's two paths;
1. `target`: the target (a shard set under its N ranks, MPI or simulated)
   vs the unsharded reference at 1 rank: max |dlogit| <= --max-dlogit and
   the same argmax wherever the reference's top-2 margin exceeds it;
2. `f32-vs-transformers`: the f32 NE file vs transformers' own model in
   float32: the same rule;
3. `quantized-vs-f32`: a quantized reference vs the f32 file: mean KL
   divergence <= --max-kl, top-1 agreement >= --min-top1 (llama.cpp's
   --kl-divergence figures);
4. `routing` (mixtures of experts), beside `target`, `f32-vs-transformers` and
   `quantized-vs-f32`: the share of (token, MoE layer) pairs routed to the
   reference's experts, >= --min-routing where both sides compute in f32,
   reported for a lossy step;
5. `kernel-modes`: a quantized reference under --exact (f32 activations)
   vs the default block kernels (q8_0 activations, as ggml): the same limits.
Exit status 0 all passed, 1 one failed (its reason naming the first layer
whose hidden state differs by more than --max-dlogit of its own scale),
2 a bad input; --json and --junit reports from the same records.

Rank 0 alone resolves the plan (`resolve`, once: the manifest read and
validated once, --ref and --f32 opened and hashed once) and runs the
reference, f32 and transformers passes while the other ranks wait idle;
those touch nothing but their own rank file and the manifest (a host
needs no copy of --ref, --f32 or --hf). The target runs on every rank and
is closed first.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from netp.errors import NetpError, error_line
from netp.formats.atomic import write_file
from netp.formats.paths import regular_file
from netp.formats.shardset import ShardSet
from netp.models import architecture_names
from netp.models.context import ForwardTrace
from netp.runtime.comm import DEFAULT_TIMEOUT, Comm, SoloComm, mpi_world, run_world
from netp.runtime.comparisons import Comparison, Pass, compare_kl, compare_logits, compare_routing, text_lines
from netp.runtime.hf_reference import transformers_pass
from netp.runtime.kernels import KERNEL_TYPES
from netp.runtime.model import RankModel, load_rank_model
from netp.runtime.streamed import streamed_pass
from netp.runtime.report import (
    REPORT_VERSION, check_report_paths, comparison_json, environment, manifest_hashes, model_inputs, verify_junit,
    write_json,
)
from netp.runtime.run import check_prompt, load_tokenizer
from netp.runtime.sources import NEFile, ResolvedModel, close_model, resolve_model, tokenizer_dir

# The limits' defaults (docs/design.md §5, "Verification"; the CLI writes them out for --help)
MAX_DLOGIT = 1e-3  # two runs of the same weights: only the order of sums differs
MAX_KL = 1.0  # mean KL(ref || q) of a lossy step, nats per position
MIN_TOP1 = 0.25  # share of positions with the same most likely token
MIN_ROUTING = 1.0  # share of (token, MoE layer) pairs routed alike, same weights in f32


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
    max_dlogit: float = MAX_DLOGIT
    max_kl: float = MAX_KL
    min_top1: float = MIN_TOP1
    min_routing: float = MIN_ROUTING
    json: Path | None = None
    junit: Path | None = None
    timeout: float | None = DEFAULT_TIMEOUT  # seconds a collective may take under MPI (docs/design.md §9)


@dataclass
class Plan:
    """What will be compared: rank 0 resolves it once, from the options and the manifest.
    The NE files are open (each once, shared where two options name the same file)."""

    target_path: Path  # as given
    target: ResolvedModel
    world: int  # ranks the target runs on
    ref: NEFile | None
    f32: NEFile | None
    hf: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def compares_target(self) -> bool:
        """Whether the target runs against the reference (not when it is the reference on 1 rank)."""
        return self.ref is not None and (self.target is not self.ref or self.world > 1)

    def close(self) -> None:
        for model in {id(m): m for m in (self.target, self.ref, self.f32) if m is not None}.values():
            close_model(model)


def _find_source(folder: Path, name: str, size: int) -> Path | None:
    for candidate in (folder.parent / name, Path.cwd() / name):
        if candidate.is_file() and candidate.stat().st_size == size:
            return candidate
    return None


def resolve(opts: VerifyOptions, comm_size: int | None) -> Plan:
    """The plan, made on rank 0 only: the shard set's manifest read once, each NE file opened once."""
    target_path = Path(opts.target)
    notes: list[str] = []
    ref_path = opts.ref
    shards: ShardSet | None = None
    if target_path.is_dir():
        shards = ShardSet.load(target_path, architecture_names())
        world = shards.world_size
        if comm_size is not None:
            shards.check_world_size(comm_size)
        if ref_path is None:
            ref_path = _find_source(target_path, shards.manifest.source.name, shards.manifest.source.size)
            if ref_path is None:
                notes.append(f"the manifest's source {shards.manifest.source.name} was not found beside the "
                             f"shard set; pass --ref to compare with it")
    elif os.path.lexists(target_path):
        regular_file(target_path, "an NE file or a shard set")
        world = comm_size or 1
        ref_path = ref_path or target_path
    else:
        raise NetpError(target_path, "no such file or shard set")
    for p in (ref_path, opts.f32):
        if p is not None:
            regular_file(p, "an NE file")
    opened: list[NEFile] = []

    def open_ne(path: Path) -> NEFile:  # one NEFile per file, however many options name it
        found = next((f for f in opened if f.path == Path(path)), None)
        if found is None:
            found = NEFile(path)
            opened.append(found)
        return found

    try:
        ref = None if ref_path is None else open_ne(ref_path)
        f32 = None if opts.f32 is None else open_ne(opts.f32)
        if f32 is None and ref is not None and ref.reader.header.ftype == 0:
            f32 = ref
        if ref is None and f32 is None:
            raise NetpError(target_path, "nothing to verify against: pass --ref (the unsharded file) and/or --f32")
        if opts.hf is not None and f32 is None:
            raise NetpError(opts.hf, "--hf is compared with the f32 NE file: pass --f32 too")
        _check_provenance(shards, ref, f32)
        target: ResolvedModel = shards if shards is not None else open_ne(target_path)
    except BaseException:
        for f in opened:
            f.close()
        raise
    return Plan(target_path, target, world, ref, f32, opts.hf, notes)


def _check_provenance(shards: ShardSet | None, ref: NEFile | None, f32: NEFile | None) -> None:
    """Refuse files of another model before any runs (docs/design.md §8): a shard set's --ref
    must be its source, and --f32 the file the quantized one was made from."""
    from netp.runtime.provenance import check_derived_from, check_ref_is_source

    if shards is not None and ref is not None:
        check_ref_is_source(ref.reader, shards.manifest, shards.folder)
    if f32 is None:
        return
    if f32.reader.header.ftype != 0:
        raise NetpError(f32.path, "is not an f32 NE file (its header's ftype is not f32): --f32 takes the f32 source")
    if ref is not None and ref is not f32:
        check_derived_from(f32.reader, ref.reader)
    elif shards is not None and ref is None:  # no --ref: prove --f32 against rank 0's file
        manifest = shards.manifest
        rows = {t.name: None if t.axis is None else t.ranges[0] for t in manifest.tensors.values() if t.axis != 1}
        with shards.open_rank_file(0) as rank0:
            check_derived_from(f32.reader, rank0, {t.name: t.shape for t in manifest.tensors.values()}, rows)


def _tokenizer_for(plan: Plan) -> ResolvedModel:
    for model in (plan.target, plan.ref, plan.f32):
        if model is not None and tokenizer_dir(model) is not None:
            return model
    return plan.target  # load_tokenizer names what it expected there


# -- running models -------------------------------------------------------------

def batch_pass(model: RankModel, tokens: Sequence[int]) -> tuple[np.ndarray | None, ForwardTrace]:
    """The tokens as one causal batch: logits (T, V) on rank 0, and the hidden states and routing."""
    trace = ForwardTrace()
    logits = model.forward(np.asarray(tokens), 0, all_logits=True, trace=trace)
    return logits, trace


def _has_blocks(file: NEFile) -> bool:
    return any(t.ggml_type in KERNEL_TYPES for t in file.reader.tensors.values())


def _show(c: Comparison) -> Comparison:
    print("\n" + "\n".join(text_lines(c)), flush=True)
    return c


# -- the program ----------------------------------------------------------------------

def _prompt(comm: Comm, opts: VerifyOptions, plan: Plan | None) -> tuple[Any, list[int]]:
    """Rank 0 encodes the prompt; every rank learns it. The tokenizer on rank 0 only."""
    tokenizer = prompt = None
    with comm.agreeing():
        if comm.is_root:
            assert plan is not None
            tokenizer = load_tokenizer(_tokenizer_for(plan))
            prompt = tokenizer.encode(opts.prompt).ids
            if not prompt:
                raise NetpError(None, "the prompt encodes to no tokens")
            print(f"verify {plan.target_path}: prompt {len(prompt)} tokens + {opts.n_tokens} greedy tokens of the "
                  f"target, teacher-forced; references streamed layer by layer; limits: max |dlogit| <= "
                  f"{opts.max_dlogit:g}, mean KL <= {opts.max_kl:g}, top-1 >= {opts.min_top1:g}", flush=True)
            for note in plan.notes:
                print(f"note: {note}", flush=True)
    return tokenizer, comm.bcast(prompt)


def greedy_forced(model: RankModel, prompt: Sequence[int], n_tokens: int) -> tuple[list[int], np.ndarray | None]:
    """The model's own greedy continuation of the prompt, the prompt as one batch then one token at a
    time (both paths): the tokens on every rank, the logits (T, V) at every position on rank 0."""
    comm = model.comm
    tokens = list(prompt)
    rows = [model.forward(np.asarray(tokens), 0, all_logits=True)]
    for _ in range(n_tokens):
        last = rows[-1]
        tokens.append(comm.bcast(int(np.argmax(last[-1])) if last is not None else None))
        rows.append(model.forward(np.asarray(tokens[-1:]), len(tokens) - 1))
    return tokens, np.concatenate([r for r in rows if r is not None]) if comm.is_root else None


def _decode_vs_batch(opts: VerifyOptions, plan: Plan, model: RankModel, tokenizer: Any, tokens: list[int],
                     n_prompt: int, decoded: Pass, batch: Pass) -> Comparison:
    """The target's KV-cache path (the prompt as one batch, then one token at a time) against the whole
    sequence as one batch. With f32 activations only the order of sums differs: max |dlogit|. With the
    default q8_0 activations an ulp may flip an activation's rounding, which grows through the layers
    (docs/design.md §5): a lossy step, held to the KL limits."""
    title = f"{plan.target_path}: prompt batch + {len(tokens) - n_prompt} decode steps vs one batch"
    dense = all(t in ("f32", "f16") for t in model.weights.matrix_types)
    if opts.exact or dense:
        return compare_logits("decode-vs-batch", title, batch, decoded, tokens, opts.max_dlogit, tokenizer)
    return compare_kl("decode-vs-batch", title + " (q8_0 activations)", batch, decoded, tokens, opts.max_kl,
                      opts.min_top1, tokenizer, table=False)


def _on_root(opts: VerifyOptions, plan: Plan, tokenizer: Any, tokens: list[int], target: Pass | None,
             world: str, f32_target: bool) -> list[Comparison]:
    """Rank 0: every reference streamed over the target's tokens as one batch, and the comparisons."""
    out: list[Comparison] = []

    def routing(id: str, title: str, ref: Pass, other: Pass, held: bool) -> None:
        """A mixture of experts: the routing record beside a comparison (nothing for a dense model)."""
        c = compare_routing(id, f"{title}: routing", ref, other, tokens, opts.min_routing if held else None,
                            tokenizer)
        if c is not None:
            out.append(_show(c))

    def timed(make: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
        started = time.perf_counter()
        return make(*args, **kwargs), time.perf_counter() - started

    ref = ref_s = None
    if plan.ref is not None:
        ref, ref_s = timed(streamed_pass, plan.ref, tokens, opts.threads, opts.exact)
    if target is not None and ref is not None and plan.ref is not None:
        c = compare_logits("target", f"{plan.target_path} on {world} vs {plan.ref.path.name} on 1 rank, one batch", ref,
                           target, tokens, opts.max_dlogit, tokenizer)
        c.seconds = ref_s or 0.0
        out.append(_show(c))
        routing("routing", c.title, ref, target, f32_target)
    f32, f32_s = ref, 0.0
    if plan.f32 is not None and plan.f32 is not plan.ref:
        f32, f32_s = timed(streamed_pass, plan.f32, tokens, opts.threads, opts.exact)
    if plan.hf is not None and f32 is not None and plan.f32 is not None:
        hf, hf_s = timed(transformers_pass, plan.hf, tokens, opts.threads)
        # transformers' last hidden state is after the final norm: compare the ones before it
        c = compare_logits("f32-vs-transformers", f"{plan.f32.path.name} (1 rank) vs transformers {plan.hf}", hf, f32,
                           tokens, opts.max_dlogit, tokenizer, n_states=len(hf.states or []) - 1)
        c.seconds = f32_s + hf_s
        out.append(_show(c))
        routing("routing-f32-vs-transformers", c.title, hf, f32, True)
    if f32 is not None and ref is not None and plan.ref is not None and plan.f32 is not None and f32 is not ref:
        c = compare_kl("quantized-vs-f32", f"{plan.ref.path.name} (quantized) vs {plan.f32.path.name}: KL divergence", f32,
                       ref, tokens, opts.max_kl, opts.min_top1, tokenizer)
        c.seconds = f32_s
        out.append(_show(c))
        routing("routing-quantized-vs-f32", c.title, f32, ref, False)
    if ref is not None and plan.ref is not None and _has_blocks(plan.ref):
        other, other_s = timed(streamed_pass, plan.ref, tokens, opts.threads, not opts.exact)
        default, exact = (other, ref) if opts.exact else (ref, other)
        c = compare_kl("kernel-modes", f"{plan.ref.path.name}: default kernels (q8_0 activations) vs --exact "
                                       "(f32 activations)", exact, default, tokens, opts.max_kl, opts.min_top1,
                       tokenizer, table=False)
        c.seconds = other_s
        out.append(_show(c))
    return out


@dataclass
class Outcome:
    """What a verify run found: every rank knows the status; the records are rank 0's."""

    status: int  # 0 every comparison passed, 1 one failed
    comparisons: list[Comparison]
    tokens: list[int]
    n_prompt: int


def _verify_rank(comm: Comm, opts: VerifyOptions, plan: Plan | None) -> Outcome:
    """Every rank runs this: the target on every rank, the references on rank 0 (the others wait
    idle); rank 0 prints the tables. `plan`: rank 0's (also every simulated rank's); under MPI the
    other ranks have none and find the target themselves: their rank file and the manifest only."""
    root = comm.is_root
    tokenizer, prompt = _prompt(comm, opts, plan)
    target_model = None if plan is None else plan.target
    opened = None
    try:
        with comm.agreeing():
            if target_model is None:
                target_model = opened = resolve_model(opts.target)
            model = load_rank_model(target_model, comm, len(prompt) + opts.n_tokens, use_mmap=opts.use_mmap,
                                    nthread=opts.threads, exact=opts.exact)
    except BaseException:
        if opened is not None:
            close_model(opened)
        raise
    comparisons: list[Comparison] = []
    try:
        started = time.perf_counter()
        tokens, decoded = greedy_forced(model, prompt, opts.n_tokens)
        batch, trace = batch_pass(model, tokens)
        target = None
        # the target computes in f32 (dense weights, or --exact): its routing is held to --min-routing
        f32_target = opts.exact or all(t in ("f32", "f16") for t in model.weights.matrix_types)
        if root:
            assert plan is not None and decoded is not None and batch is not None
            target = Pass(str(plan.target_path), batch, trace.states, trace.routed)
            comparisons.append(_show(_decode_vs_batch(opts, plan, model, tokenizer, tokens, len(prompt),
                                                      Pass(str(plan.target_path), decoded), target)))
            comparisons[0].seconds = time.perf_counter() - started
    finally:
        model.close()
        if opened is not None:
            close_model(opened)
    del model  # the target's weights go before the references run in their place (docs/design.md §5)
    if plan is not None and not plan.compares_target:
        target = None  # the reference itself: nothing more to compare it with
    with comm.agreeing(idle=True):
        if root:
            assert plan is not None
            comparisons += _on_root(opts, plan, tokenizer, tokens, target, comm.describe(), f32_target)
    status = comm.bcast(0 if all(c.passed for c in comparisons) else 1)
    return Outcome(status, comparisons, tokens, len(prompt))


def _write_reports(opts: VerifyOptions, plan: Plan, outcome: Outcome, comm_kind: str, ranks: int,
                   seconds: float) -> None:
    """Rank 0: the --json and --junit reports (docs/design.md §5, "Reports")."""
    if opts.json is None and opts.junit is None:
        return
    doc = {
        "report": "netp-verify", "version": REPORT_VERSION, "passed": outcome.status == 0, "status": outcome.status,
        "target": str(plan.target_path), "ref": None if plan.ref is None else str(plan.ref.path),
        "f32": None if plan.f32 is None else str(plan.f32.path), "hf": plan.hf, "exact": opts.exact,
        "manifest": manifest_hashes(plan.target) if isinstance(plan.target, ShardSet) else None,
        "prompt": {"text": opts.prompt, "tokens": outcome.tokens, "n_prompt": outcome.n_prompt},
        "thresholds": {"max_dlogit": opts.max_dlogit, "max_kl": opts.max_kl, "min_top1": opts.min_top1,
                       "min_routing": opts.min_routing},
        "notes": plan.notes,
        "comparisons": [comparison_json(c) for c in outcome.comparisons],
        "first_diverging_layer": next((c.first_diverging_layer for c in outcome.comparisons
                                       if c.first_diverging_layer is not None), None),
        "environment": environment(comm_kind, ranks, opts.threads), "wall_seconds": seconds,
    }
    if opts.json is not None:
        write_json(opts.json, doc)
        print(f"report: {opts.json}", flush=True)
    if opts.junit is not None:
        write_file(opts.junit, verify_junit(doc, outcome.comparisons, seconds))
        print(f"JUnit report: {opts.junit}", flush=True)


def _check_reports(opts: VerifyOptions) -> None:
    """Before any model runs: the report paths are writable places that are no input."""
    hf = [Path(opts.hf)] if opts.hf is not None and os.path.lexists(opts.hf) else []
    check_report_paths({"--json": opts.json, "--junit": opts.junit},
                       [*model_inputs(opts.target, opts.ref, opts.f32), *hf])


def verify(opts: VerifyOptions, prog: str = "netp verify", debug: bool = False) -> int:
    """Exit status: 0 every comparison passed, 1 one failed (its reason in one error line)."""
    started = time.perf_counter()
    check_prompt(opts.prompt)  # before any model loads
    comm = mpi_world(opts.timeout, prog)

    def finish(c: Comm, plan: Plan | None) -> int:
        outcome = _verify_rank(c, opts, plan)
        if c.is_root:
            assert plan is not None
            _write_reports(opts, plan, outcome, c.kind, c.size, time.perf_counter() - started)
            print(f"\nverify: {'FAIL' if outcome.status else 'PASS'}", flush=True)
            failed = [x for x in outcome.comparisons if not x.passed]
            if failed:
                print(error_line(prog, NetpError(opts.target, f"verification failed: {failed[0].reason}")),
                      file=sys.stderr, flush=True)
        return outcome.status

    def rank_main(c: Comm) -> int:
        plan = None
        try:
            with c.agreeing():  # rank 0 alone makes the plan; its error ends every rank, in one line
                if c.is_root:
                    plan = resolve(opts, c.size)
                    _check_reports(opts)
            return finish(c, plan)
        finally:
            if plan is not None:
                plan.close()

    if comm is None:
        with SoloComm().agreeing():
            solo_plan = resolve(opts, None)
            try:
                _check_reports(opts)
            except BaseException:
                solo_plan.close()
                raise
        try:
            return int(run_world(lambda c: finish(c, solo_plan), solo_plan.world, None, prog, debug))
        finally:
            solo_plan.close()
    return int(run_world(rank_main, 1, comm, prog, debug))
