"""`ne-run` / `netp run` and `netp verify`: click commands, heavy imports inside.

-t (threads per rank: the block kernels' and OpenBLAS's) must reach OpenBLAS
before numpy loads, so the commands set it first and import the runtime after.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from netp.cliutil import NetpCommand, common_options, progress_bar, run_reporting

SEED_PROMPT = "Once upon a time, there existed a little girl,"

# The default is netp.runtime.comm.DEFAULT_TIMEOUT, written out so --help needs no runtime import.
timeout_option = click.option(
    "--timeout", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="SECONDS",
    help="Under MPI: a rank gives up when a collective with its peers takes longer than this (a lost host); "
         "before the first token 10x as long, at least 120 s (loading, first compile). 0: wait forever.")


def _prog() -> str:
    ctx = click.get_current_context()
    return ctx.command_path or "ne-run"


def _checking(prog: str, debug: bool, fn: Any, *args: Any) -> int:
    """Run a checking command (verify, perplexity): exit 0 passed, 1 a comparison failed,
    2 a bad input or usage (here, under mpiexec, and on the ranks that only learn another's error)."""
    from netp.runtime.comm import PeerFailed

    try:
        return run_reporting(prog, debug, fn, *args, input_status=2)
    except PeerFailed as e:
        raise SystemExit(2 if e.input_error else 1) from None


def _threads(threads: int | None, model: Path) -> int:
    from netp.hostenv import launched_under_mpi
    from netp.runtime.blas import default_threads, manifest_world_size, set_blas_threads

    if threads and threads > 0:
        n = threads
    else:  # under MPI the launcher says how many ranks share this host; else the set's simulated ranks do
        n = default_threads(1 if launched_under_mpi() else manifest_world_size(model))
    set_blas_threads(n)
    return n


@click.command("run", cls=NetpCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-m", "--model", "model", required=True, type=click.Path(path_type=Path),
              help="An NE file, or a shard-set folder (manifest.json + one file per rank).")
@click.option("-p", "--prompt", default=None, help="Prompt text (encoded with the model's tokenizer folder).")
@click.option("--ids", default=None, help="Prompt as token ids, e.g. '1,450,4996' (no tokenizer needed).")
@click.option("-n", "--n_predict", "--n-predict", "n_predict", type=int, default=-1, show_default=True,
              help="Tokens to generate (-1: until EOS or a full context).")
@click.option("-c", "--ctx_size", "--ctx-size", "ctx_size", type=int, default=512, show_default=True,
              help="Context size: the KV cache holds this many tokens.")
@click.option("--seed", type=int, default=-1, show_default=True, help="Sampling seed (-1: random).")
@click.option("-t", "--threads", type=int, default=None,
              help="Kernel (and BLAS) threads per rank (default: cores / ranks); results do not depend on it.")
@click.option("--no_mmap", "--no-mmap", "no_mmap", is_flag=True,
              help="Read the rank's file instead of memory-mapping it.")
@click.option("--top_k", "--top-k", "top_k", type=int, default=40, show_default=True, help="1 = greedy.")
@click.option("--top_p", "--top-p", "top_p", type=float, default=0.95, show_default=True)
@click.option("--temp", type=float, default=0.8, show_default=True, help="Temperature; 0 = greedy.")
@click.option("--repeat_penalty", "--repeat-penalty", "repeat_penalty", type=float, default=1.1, show_default=True,
              help="Penalty for the last 64 tokens (1.0 = off).")
@click.option("--exact", is_flag=True,
              help="Block kernels on f32 activations (default: activations quantized to q8_0, as ggml).")
@click.option("--low-mem", "--low_mem", "low_mem", is_flag=True,
              help="Accepted for old scripts; does nothing: quantized weights always stay in blocks.")
@click.option("--verify", "verify", is_flag=True,
              help="Instead of generating, verify against the unsharded source (see `netp verify`).")
@timeout_option
@common_options
def run_command(model: Path, prompt: str | None, ids: str | None, n_predict: int, ctx_size: int, seed: int,
                threads: int | None, no_mmap: bool, top_k: int, top_p: float, temp: float, repeat_penalty: float,
                exact: bool, low_mem: bool, verify: bool, timeout: float, quiet: bool, debug: bool) -> None:
    """Generate text from an NE file or a shard set, on 1 or N tensor-parallel ranks.

    \b
    Examples:
      ne-run -m ne-q4_0.bin -p "Once upon a time" -n 32
      mpiexec -n 2 ne-run -m shards/ --seed 1234 -t 1 -c 68 -n 32 -p "Once upon a time, there existed a little girl," --no_mmap
      mpiexec -n 2 ne-run -m ne-q4_0.bin -p "Hello"   # each rank slices the unsharded file
      ne-run -m shards/ --verify                       # simulates the set's ranks in one process
    """
    prog = _prog()
    n_threads = _threads(threads, model)
    if verify:
        from netp.runtime.verify import VerifyOptions, verify as run_verify

        opts = VerifyOptions(target=model, prompt=prompt or SEED_PROMPT,
                             n_tokens=n_predict if n_predict > 0 else 16, threads=n_threads,
                             use_mmap=not no_mmap, exact=exact, timeout=timeout)
        raise SystemExit(_checking(prog, debug, run_verify, opts, prog, debug))
    from netp.runtime.run import RunOptions, parse_ids, run
    from netp.runtime.sampling import SamplingParams

    def go() -> int:
        opts = RunOptions(
            model=model, prompt=prompt, ids=None if ids is None else parse_ids(ids), n_predict=n_predict,
            n_ctx=ctx_size, threads=n_threads, use_mmap=not no_mmap, exact=exact,
            sampling=SamplingParams(top_k=top_k, top_p=top_p, temp=temp, repeat_penalty=repeat_penalty, seed=seed),
            timeout=timeout)
        return run(opts, prog, debug)

    raise SystemExit(run_reporting(prog, debug, go))


@click.command("verify", cls=NetpCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("shards", type=click.Path(path_type=Path))
@click.option("--ref", type=click.Path(path_type=Path), default=None,
              help="Unsharded NE file to compare with (default: the manifest's source, if present).")
@click.option("--f32", "f32", type=click.Path(path_type=Path), default=None,
              help="The f32 NE file: compared with --hf, and with a quantized --ref (KL, top-1).")
@click.option("--hf", type=str, default=None,
              help="transformers' model: an HF folder, a cached hub id or a .gguf file (needs torch). "
                   "Safetensors stream a decoder layer at a time; a .gguf is loaded whole (transformers "
                   "dequantizes the whole file).")
@click.option("-p", "--prompt", default=SEED_PROMPT, show_default=True)
@click.option("-n", "--n_tokens", "--n-tokens", "n_tokens", type=int, default=16, show_default=True,
              help="Greedy tokens of the reference to teacher-force after the prompt.")
@click.option("--max-dlogit", "max_dlogit", type=click.FloatRange(min=0), default=1e-3, show_default=True,
              help="Two runs of the same weights (the set vs --ref, --f32 vs --hf): largest |logit difference|; "
                   "the argmax must agree wherever the reference's top-2 margin exceeds it.")
@click.option("--max-kl", "max_kl", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="A lossy step (quantized --ref vs --f32, q8_0 activations vs --exact): largest mean KL "
                   "divergence, nats per position.")
@click.option("--min-top1", "min_top1", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="A lossy step: smallest share of positions with the same most likely token.")
@click.option("--min-routing", "min_routing", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="A mixture of experts, the same weights in f32: smallest share of (token, MoE layer) pairs "
                   "routed to the reference's experts (reported, not held, for a lossy step).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Write every comparison's figures, limits and verdict as JSON (schema: docs/design.md §5).")
@click.option("--junit", "junit_path", type=click.Path(path_type=Path), default=None,
              help="Write a JUnit XML report: one testcase per comparison.")
@click.option("-t", "--threads", type=int, default=None, help="Kernel (and BLAS) threads per rank.")
@click.option("--no_mmap", "--no-mmap", "no_mmap", is_flag=True)
@click.option("--exact", is_flag=True, help="Both sides run the block kernels on f32 activations.")
@timeout_option
@common_options
def verify_command(shards: Path, ref: Path | None, f32: Path | None, hf: str | None, prompt: str, n_tokens: int,
                   max_dlogit: float, max_kl: float, min_top1: float, min_routing: float, json_path: Path | None,
                   junit_path: Path | None, threads: int | None, no_mmap: bool, exact: bool, timeout: float,
                   quiet: bool, debug: bool) -> None:
    """Prove a shard set right: logits under N ranks against the unsharded
    file, the f32 file against transformers, and quantized against f32.

    \b
    Launched plainly it simulates the set's N ranks in one process; under
    `mpiexec -n N` it uses the real ranks. Teacher-forced along the
    target's own greedy tokens; the references (--ref, --f32, --hf) run on
    rank 0 one layer at a time. Each comparison is held to its limits
    (--max-dlogit, --max-kl, --min-top1, --min-routing); a failure names the first layer
    whose hidden state diverged. Exit status: 0 every comparison passed,
    1 one failed, 2 a bad input or usage.
    \b
    Examples:
      netp verify shards/ --ref ne-q4_0.bin --f32 ne-f32.bin --hf model.gguf
      mpiexec -n 2 netp verify shards/ --ref ne-q4_0.bin --json verify.json --junit report.xml
    """
    prog = _prog()
    n_threads = _threads(threads, shards)
    from netp.runtime.verify import VerifyOptions, verify as run_verify

    opts = VerifyOptions(target=shards, ref=ref, f32=f32, hf=hf, prompt=prompt, n_tokens=n_tokens,
                         max_dlogit=max_dlogit, max_kl=max_kl, min_top1=min_top1, min_routing=min_routing,
                         json=json_path,
                         junit=junit_path, threads=n_threads, use_mmap=not no_mmap, exact=exact, timeout=timeout)
    raise SystemExit(_checking(prog, debug, run_verify, opts, prog, debug))


@click.command("perplexity", cls=NetpCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-f", "--file", "text", required=True, type=click.Path(path_type=Path),
              help="The text to score (UTF-8), read whole and tokenized once.")
@click.option("-c", "--ctx", "ctx", type=int, default=512, show_default=True,
              help="Window of tokens; each is scored on its second half. Even, at most the model's context.")
@click.option("--ref", type=click.Path(path_type=Path), default=None,
              help="An NE file of the same model (say f32) run on rank 0 over the same windows: adds the KL "
                   "divergence and top-1 agreement of MODEL against it.")
@click.option("--chunks", type=click.IntRange(min=1), default=None,
              help="Score only the first N windows (default: all).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Write the figures as JSON to this file (schema: docs/design.md §5).")
@click.option("-t", "--threads", type=int, default=None, help="Kernel (and BLAS) threads per rank.")
@click.option("--no_mmap", "--no-mmap", "no_mmap", is_flag=True)
@click.option("--exact", is_flag=True, help="Block kernels on f32 activations (default: q8_0, as ggml).")
@timeout_option
@common_options
def perplexity_command(model: Path, text: Path, ctx: int, ref: Path | None, chunks: int | None,
                       json_path: Path | None, threads: int | None, no_mmap: bool, exact: bool, timeout: float,
                       quiet: bool, debug: bool) -> None:
    """Perplexity of MODEL (an NE file or a shard set) over a text, as llama.cpp's
    llama-perplexity measures it: the text tokenized once (BOS first when the
    model adds one), cut into windows of --ctx tokens, each window's first
    token replaced by BOS when the model uses one, each scored on the
    predictions of its second half; PPL = exp(mean NLL) +/- its standard error.
    With --ref also llama-perplexity --kl-divergence's figures: mean, 99% and
    maximum KL divergence and "same top p".

    \b
    Launched plainly a shard set's ranks are simulated in one process; under
    `mpiexec -n N` the real ranks run it (only rank 0 reads the text and --ref).
    Exit status: 0 done, 2 a bad input or usage.
    Examples:
      netp perplexity ne-q4_0.bin -f wiki.test.raw
      mpiexec -n 2 netp perplexity shards/ -f text.txt --ctx 512 --ref ne-f32.bin --json ppl.json
    """
    prog = _prog()
    n_threads = _threads(threads, model)
    from netp.runtime.perplexity import PerplexityOptions, perplexity

    opts = PerplexityOptions(model=model, text=text, ctx=ctx, ref=ref, chunks=chunks, json=json_path,
                             threads=n_threads, use_mmap=not no_mmap, exact=exact, timeout=timeout)

    def go() -> int:
        with progress_bar("perplexity", unit="window", quiet=quiet) as bar:
            return perplexity(opts, prog, debug, bar)

    raise SystemExit(_checking(prog, debug, go))



@click.command("serve", cls=NetpCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; anyone who reaches it can use the model).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="TCP port (0: any free port, printed at start).")
@click.option("--api-key", "--api_key", "api_key", default=None, envvar="NETP_API_KEY",
              help="Require `Authorization: Bearer KEY` on /v1 requests (or set NETP_API_KEY).")
@click.option("-c", "--ctx_size", "--ctx-size", "ctx_size", type=int, default=2048, show_default=True,
              help="Context size: prompt plus generated tokens of one request.")
@click.option("--queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests that may wait while one generates; more get 503 with Retry-After.")
@click.option("-t", "--threads", type=int, default=None,
              help="Kernel (and BLAS) threads per rank (default: cores / ranks).")
@click.option("--no_mmap", "--no-mmap", "no_mmap", is_flag=True,
              help="Read the rank's file instead of memory-mapping it.")
@timeout_option
@common_options
def serve_command(model: Path, host: str, port: int, api_key: str | None, ctx_size: int, queue: int,
                  threads: int | None, no_mmap: bool, timeout: float, quiet: bool, debug: bool) -> None:
    """Serve an NE file or a shard set over HTTP with OpenAI's API
    (/v1/chat/completions, /v1/completions, /v1/models, /health).

    \b
    One generation at a time, in arrival order; rank 0 serves HTTP and
    the other ranks run the same forward. SIGTERM or Ctrl-C finishes the
    current generation and exits 0.

    \b
    Examples:
      netp serve shards/                               # simulates the set's ranks in one process
      mpiexec -n 2 netp serve shards/ --port 8080 -c 4096
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'
    """
    prog = _prog()
    n_threads = _threads(threads, model)
    from netp.runtime.serve.server import ServeOptions, serve

    opts = ServeOptions(model=model, host=host, port=port, api_key=api_key or None, n_ctx=ctx_size, queue=queue,
                        threads=n_threads, use_mmap=not no_mmap, timeout=timeout)
    raise SystemExit(run_reporting(prog, debug, serve, opts, prog, debug))
