"""`netp perplexity MODEL -f TEXT`: perplexity, and with --ref the KL divergence and top-1
agreement against a reference, measured as llama.cpp's llama-perplexity does
(docs/design.md §5, "Perplexity").

The text is tokenized once, with BOS first when the model's tokenizer adds
one; it is cut into windows of --ctx tokens (a last partial window is
dropped), each window's first token replaced by BOS when the model uses
one, and each window run as one causal batch from position 0. Scored: the
predictions of the tokens at positions ctx/2 + 1 .. ctx - 1 (ctx/2 - 1
per window, from the logits at ctx/2 .. ctx - 2). PPL = exp(mean NLL), and
its standard error PPL x sqrt(var(NLL) / (n - 1)). With --ref, the reference
(an NE file, at 1 rank on rank 0) runs the same windows: KL(ref || model)
per scored token, its mean, 99th percentile and maximum, and the share of
tokens where both give the same most likely token.

Memory does not grow with the text: one window's logits at a time, the
running sums, and per scored token the few scalars the percentiles need.
Launched under mpiexec the model runs on the real ranks (rank 0 tokenizes,
broadcasts each window, scores); plainly, a shard set's ranks are simulated.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from netp.errors import NetpError
from netp.formats.paths import read_capped, read_json
from netp.runtime.comm import DEFAULT_TIMEOUT, Comm, SoloComm, mpi_world, run_world
from netp.runtime.comparisons import kl_divergence, log_softmax
from netp.runtime.model import RankModel, load_rank_model
from netp.runtime.report import REPORT_VERSION, check_report_paths, environment, model_inputs, write_json
from netp.runtime.run import load_tokenizer, tokenizer_path
from netp.runtime.sources import ResolvedModel, close_model, resolve_model, source_world_size

TEXT_CAP = 1 << 30  # bytes of text read whole (the text is tokenized once, as llama-perplexity does)
ROWS_PER_STEP = 32  # logits rows scored at once: bounds the f64 work arrays to 32 x n_vocab

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PerplexityOptions:
    model: Path
    text: Path
    ctx: int = 512
    ref: Path | None = None
    chunks: int | None = None  # score at most this many windows (llama-perplexity's --chunks)
    json: Path | None = None
    threads: int = 1
    use_mmap: bool = True
    exact: bool = False  # f32 activations in the block kernels
    timeout: float | None = DEFAULT_TIMEOUT


@dataclass
class KLFigures:
    """llama-perplexity --kl-divergence's figures, KL(ref || model) in nats per token."""

    mean: float
    mean_stderr: float
    p99: float
    p999: float
    median: float
    max: float
    top1: float  # share of scored tokens whose most likely next token is the same
    top1_stderr: float
    ref_ppl: float
    ref_ppl_stderr: float


@dataclass
class PerplexityResult:
    tokens: int  # the text's tokens (BOS included when added)
    add_bos: bool
    windows: int
    scored: int  # tokens scored: windows x (ctx/2 - 1)
    mean_nll: float
    ppl: float
    ppl_stderr: float
    kl: KLFigures | None = None
    running_ppl: list[float] = field(default_factory=list)  # after each window, as llama-perplexity's [i]x lines


def mean_and_stderr(total: float, total2: float, count: int) -> tuple[float, float]:
    """Mean of n values from their sum and sum of squares, and the standard error of that
    mean, sqrt(var / (n - 1)): llama-perplexity's formula (0 when the variance is not positive)."""
    mean = total / count
    var = total2 / count - mean * mean
    return mean, math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0


class Scores:
    """Running sums over scored tokens; per token only the KL value and top-1 agreement are kept."""

    def __init__(self, with_ref: bool):
        self.count = 0
        self.nll = self.nll2 = 0.0
        self.ref_nll = self.ref_nll2 = 0.0
        self.kl = self.kl2 = 0.0
        self.same_top = 0
        self.kl_values: list[np.ndarray] | None = [] if with_ref else None
        self.running: list[float] = []

    def add(self, logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray | None = None) -> None:
        """logits (n, V) predicting targets (n,); ref_logits (n, V) the reference's, with --ref."""
        rows = np.arange(len(targets))
        for a in range(0, len(targets), ROWS_PER_STEP):
            b = min(a + ROWS_PER_STEP, len(targets))
            logp = log_softmax(logits[a:b])
            nll = -logp[rows[: b - a], targets[a:b]]
            self.nll += float(nll.sum())
            self.nll2 += float((nll * nll).sum())
            if ref_logits is not None and self.kl_values is not None:
                ref_logp = log_softmax(ref_logits[a:b])
                ref_nll = -ref_logp[rows[: b - a], targets[a:b]]
                self.ref_nll += float(ref_nll.sum())
                self.ref_nll2 += float((ref_nll * ref_nll).sum())
                kl = kl_divergence(ref_logp, logp)
                self.kl += float(kl.sum())
                self.kl2 += float((kl * kl).sum())
                self.kl_values.append(kl.astype(np.float32))
                self.same_top += int((logits[a:b].argmax(axis=-1) == ref_logits[a:b].argmax(axis=-1)).sum())
        self.count += len(targets)
        self.running.append(math.exp(self.nll / self.count))

    def result(self, tokens: int, add_bos: bool, windows: int) -> PerplexityResult:
        mean_nll, stderr = mean_and_stderr(self.nll, self.nll2, self.count)
        ppl = math.exp(mean_nll)
        kl = None
        if self.kl_values is not None:
            values = np.concatenate(self.kl_values).astype(np.float64)
            kl_mean, kl_stderr = mean_and_stderr(self.kl, self.kl2, self.count)
            ref_mean, ref_stderr = mean_and_stderr(self.ref_nll, self.ref_nll2, self.count)
            top1 = self.same_top / self.count
            # llama-perplexity's percentiles interpolate linearly between sorted values: numpy's default
            kl = KLFigures(mean=kl_mean, mean_stderr=kl_stderr, p99=float(np.percentile(values, 99)),
                           p999=float(np.percentile(values, 99.9)), median=float(np.median(values)),
                           max=float(values.max()), top1=top1,
                           top1_stderr=math.sqrt(top1 * (1 - top1) / (self.count - 1)) if self.count > 1 else 0.0,
                           ref_ppl=math.exp(ref_mean), ref_ppl_stderr=math.exp(ref_mean) * ref_stderr)
        return PerplexityResult(tokens=tokens, add_bos=add_bos, windows=windows, scored=self.count,
                                mean_nll=mean_nll, ppl=ppl, ppl_stderr=ppl * stderr, kl=kl,
                                running_ppl=list(self.running))


# -- inputs ----------------------------------------------------------------------------

def check_ctx(ctx: int) -> None:
    if ctx < 4 or ctx % 2:
        raise NetpError(None, f"--ctx {ctx}: the window must be an even number of tokens, at least 4 "
                              "(its second half is scored)")


def read_text(path: Path) -> str:
    """The text file as UTF-8; refused when it is not text or empty."""
    data = read_capped(path, TEXT_CAP, "a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NetpError(path, f"is not UTF-8 text (byte {e.start} cannot be read)") from e
    if not text.strip():
        raise NetpError(path, "is empty: there is no text to score")
    return text


def adds_bos(model: ResolvedModel, tokenizer: Any, bos: int) -> bool:
    """Whether the model's tokenizer puts BOS before a text (llama.cpp's add_bos): its
    tokenizer_config.json's add_bos_token when it says, else whether the tokenizer's own
    post-processor adds it (transformers builds that from add_bos_token)."""
    config = read_json(tokenizer_path(model, "tokenizer_config.json"), what="a tokenizer_config.json")
    said = config.get("add_bos_token") if isinstance(config, dict) else None
    if isinstance(said, bool):
        return said
    with_special = tokenizer.encode("a").ids
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    return with_special[:1] == [bos] and plain[:1] != [bos]


def _tokenize(opts: PerplexityOptions, resolved: ResolvedModel) -> tuple[Any, np.ndarray]:
    """(tokenizer, the text's token ids without BOS) on rank 0, before the weights load."""
    text = read_text(opts.text)
    tokenizer = load_tokenizer(resolved, hint="")
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    if ids.size == 0:
        raise NetpError(opts.text, "encodes to no tokens")
    return tokenizer, ids


def _windows(model: RankModel, resolved: ResolvedModel, opts: PerplexityOptions, tokenizer: Any,
             ids: np.ndarray) -> tuple[np.ndarray, bool, int]:
    """(tokens with BOS first when the model adds one, add_bos, windows to score), checked against the model."""
    hp, ctx = model.hp, opts.ctx
    if hp.max_seq_len and ctx > hp.max_seq_len:
        raise NetpError(opts.model, f"--ctx {ctx} is larger than the model's context of {hp.max_seq_len} tokens")
    bos = hp.bos_token_id
    add_bos = bos is not None and 0 <= bos < hp.n_vocab and adds_bos(resolved, tokenizer, bos)
    tokens = np.concatenate([[bos], ids]) if add_bos else ids
    if tokens.max() >= hp.n_vocab:
        raise NetpError(opts.model, f"its tokenizer gives token id {int(tokens.max())}, outside the vocabulary "
                                    f"of {hp.n_vocab}")
    if len(tokens) < 2 * ctx:
        raise NetpError(opts.text, f"tokenizes to {len(tokens)} tokens; --ctx {ctx} needs at least {2 * ctx} "
                                   "(two windows)")
    windows = len(tokens) // ctx
    if opts.chunks is not None:
        windows = min(windows, opts.chunks)
    return tokens, add_bos, windows


def _load_ref(path: Path, opts: PerplexityOptions, model: RankModel) -> RankModel:
    ref = load_rank_model(path, SoloComm(), opts.ctx, use_mmap=opts.use_mmap, nthread=opts.threads,
                          exact=opts.exact)
    if ref.hp.n_vocab != model.hp.n_vocab:
        ref.close()
        raise NetpError(path, f"has a vocabulary of {ref.hp.n_vocab} tokens, the model {model.hp.n_vocab}: "
                                  "--ref must be the same model in another form (f32, another type)")
    return ref


# -- the program ---------------------------------------------------------------------

def _score(comm: Comm, opts: PerplexityOptions, resolved: ResolvedModel | None, progress: Progress | None,
           started: float) -> int:
    """One rank's part; `resolved`: the model found once for every simulated rank, or None
    under MPI, where each rank resolves its own."""
    opened = None
    try:
        if resolved is None:
            with comm.agreeing():
                resolved = opened = resolve_model(opts.model)
        return _score_model(comm, opts, resolved, progress, started)
    finally:
        if opened is not None:
            close_model(opened)


def _score_model(comm: Comm, opts: PerplexityOptions, resolved: ResolvedModel, progress: Progress | None,
                 started: float) -> int:
    root = comm.is_root
    tokenizer = ids = None
    with comm.agreeing():
        if root:
            check_report_paths({"--json": opts.json},
                               [*model_inputs(opts.model, opts.ref), opts.text])
            tokenizer, ids = _tokenize(opts, resolved)
        model = load_rank_model(resolved, comm, opts.ctx, use_mmap=opts.use_mmap, nthread=opts.threads,
                                exact=opts.exact)
    try:
        tokens = add_bos = ref = None
        windows = 0
        with comm.agreeing(idle=True):
            if root:
                assert ids is not None
                tokens, add_bos, windows = _windows(model, resolved, opts, tokenizer, ids)
                if opts.ref is not None:
                    ref = _load_ref(opts.ref, opts, model)
        windows, with_ref = comm.bcast((windows, ref is not None))
        try:
            return _run_windows(comm, opts, model, ref if with_ref else None, tokens, bool(add_bos), windows,
                                with_ref, progress, started)
        finally:
            if ref is not None:
                ref.close()
    finally:
        model.close()


def _run_windows(comm: Comm, opts: PerplexityOptions, model: RankModel, ref: RankModel | None,
                 tokens: np.ndarray | None, add_bos: bool, windows: int, with_ref: bool,
                 progress: Progress | None, started: float) -> int:
    """Every rank: the windows through the model; rank 0 runs the reference (others wait idle) and scores."""
    root, ctx, first = comm.is_root, opts.ctx, opts.ctx // 2
    scores = Scores(with_ref) if root else None
    if root:
        assert tokens is not None
        print(f"perplexity of {opts.model} on {comm.describe()} x {opts.threads} thread(s): {opts.text}, "
              f"{len(tokens)} tokens{' (BOS first)' if add_bos else ''}, {windows} windows of {ctx}, each scored "
              f"on its last {ctx - first - 1} predictions{f'; KL against {opts.ref} on rank 0' if ref else ''}",
              flush=True)
    for w in range(windows):
        window = None
        if root:
            assert tokens is not None
            window = tokens[w * ctx:(w + 1) * ctx].copy()
            if add_bos:
                window[0] = model.hp.bos_token_id
        window = comm.bcast(window)
        logits = model.forward(window, 0, all_logits=True)
        ref_logits = None
        if with_ref:  # the reference's run is rank 0's alone: the others wait idle
            with comm.agreeing(idle=True):
                if ref is not None:
                    ref_all = ref.forward(window, 0, all_logits=True)
                    assert ref_all is not None  # a 1-rank run's logits
                    ref_logits = ref_all[first:ctx - 1]
        if root:
            assert scores is not None and logits is not None
            scores.add(logits[first:ctx - 1], window[first + 1:], ref_logits)
            if progress is not None:
                progress(1, windows)
    if not root:
        return 0
    assert scores is not None and tokens is not None
    result = scores.result(len(tokens), add_bos, windows)
    print(result_text(result, opts), flush=True)
    if opts.json is not None:
        write_json(opts.json, report(result, opts, comm, time.perf_counter() - started))
        print(f"report: {opts.json}", flush=True)
    return 0


def result_text(r: PerplexityResult, opts: PerplexityOptions) -> str:
    lines = [f"[{i + 1}]{p:.4f}" for i, p in enumerate(r.running_ppl)]
    out = [",".join(lines), f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_stderr:.5f} "
                            f"({r.scored} tokens scored in {r.windows} windows of {opts.ctx})"]
    if r.kl is not None:
        k = r.kl
        out += [f"Mean PPL(ref)   : {k.ref_ppl:10.6f} +/- {k.ref_ppl_stderr:10.6f}  ({opts.ref})",
                f"Mean    KLD: {k.mean:10.6f} +/- {k.mean_stderr:10.6f}",
                f"Maximum KLD: {k.max:10.6f}",
                f"99.9%   KLD: {k.p999:10.6f}",
                f"99.0%   KLD: {k.p99:10.6f}",
                f"Median  KLD: {k.median:10.6f}",
                f"Same top p: {100 * k.top1:6.3f} +/- {100 * k.top1_stderr:5.3f} %"]
    return "\n".join(out)


def report(r: PerplexityResult, opts: PerplexityOptions, comm: Comm, seconds: float) -> dict[str, Any]:
    """The --json document (its schema: docs/design.md §5, "Reports")."""
    return {
        "report": "netp-perplexity", "version": REPORT_VERSION,
        "model": str(opts.model), "ref": None if opts.ref is None else str(opts.ref), "text": str(opts.text),
        "ctx": opts.ctx, "tokens": r.tokens, "add_bos": r.add_bos, "windows": r.windows, "scored": r.scored,
        "mean_nll": r.mean_nll, "ppl": r.ppl, "ppl_stderr": r.ppl_stderr, "running_ppl": r.running_ppl,
        "kl": None if r.kl is None else asdict(r.kl),
        "environment": environment(comm.kind, comm.size, opts.threads), "wall_seconds": seconds,
    }


def perplexity(opts: PerplexityOptions, prog: str = "netp perplexity", debug: bool = False,
               progress: Progress | None = None) -> int:
    started = time.perf_counter()
    check_ctx(opts.ctx)
    if opts.chunks is not None and opts.chunks < 1:
        raise NetpError(None, f"--chunks {opts.chunks}: at least 1 window is scored")
    comm = mpi_world(opts.timeout, prog)
    if comm is not None:  # each rank resolves the model itself, inside the ranks' agreement
        return run_world(lambda c: _score(c, opts, None, progress if c.is_root else None, started), 1, comm, prog,
                         debug)
    resolved = resolve_model(opts.model)
    try:
        return run_world(lambda c: _score(c, opts, resolved, progress if c.is_root else None, started),
                         source_world_size(resolved) or 1, None, prog, debug)
    finally:
        close_model(resolved)
