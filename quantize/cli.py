"""The two quantize entry points, one stage (netp.quantize.stage) behind them.

- `netp quantize IN OUT --type q4_0` (llama-quantize style; the type may also
  come third, as llama-quantize takes it: `netp quantize IN OUT q4_0`);
- `python scripts/quantize.py --model_name llama --model_file ne-f32.bin
  --out_file ne-q4_0.bin --weight_dtype int4` (neural-speed's flags).

neural-speed's quantize options map onto ggml's block types (docs/design.md §3):
int4 + sym + group 32 = q4_0, int4 + asym = q4_1, int8 + sym = q8_0. What
those blocks cannot express (another group size, int8 asym, fp8/nf4/fp4,
bf16 scales, a compute dtype for neural-speed's own kernels) is refused by
name, never changed silently.
"""
from __future__ import annotations

from typing import Any

import click

from netp.cliutil import NetpCommand, common_options, progress_bar, run_reporting
from netp.errors import NetpError
from netp.typenames import OVERRIDE_TYPE_NAMES as OVERRIDE_TYPES
from netp.typenames import QK
from netp.typenames import QUANTIZED_TYPE_NAMES as TYPE_CHOICES

# neural-speed --weight_dtype / --alg -> ggml type name
NS_TYPES = {("int4", "sym"): "q4_0", ("int4", "asym"): "q4_1", ("int8", "sym"): "q8_0"}
NS_SUPPORTED = "int4 sym = q4_0, int4 asym = q4_1, int8 sym = q8_0"
GROUP_SIZE = QK  # ggml's blocks hold 32 values


class QuantizeCommand(NetpCommand):
    def usage_hint(self, e: click.UsageError) -> str:
        return f"{e.format_message().rstrip('.')}; usage: netp quantize IN OUT [--type q4_0|q4_1|q8_0]"


def _run(src: str, dst: str, type_name: str, nthread: int | None, model_name: str | None,
         output_type: str | None, embedding_type: str | None, quiet: bool) -> None:
    from netp.formats.constants import type_from_name
    from netp.quantize.stage import quantize_file

    with progress_bar(f"quantize {type_name}", quiet=quiet) as on_progress:
        result = quantize_file(src, dst, type_from_name(type_name), nthread=nthread, model_name=model_name,
                               output_type=output_type and type_from_name(output_type),
                               embedding_type=embedding_type and type_from_name(embedding_type),
                               on_progress=on_progress)
    if not quiet:
        click.echo(result.summary())


def type_override_options(f: Any) -> Any:
    """--output_type / --embedding_type (llama-quantize's --output-tensor-type / --token-embedding-type)."""
    for flag, what in (("embedding_type", "token embedding"), ("output_type", "output head (for a tied model: "
                                                                             "the embedding's output.weight copy)")):
        f = click.option(f"--{flag}", f"--{flag.replace('_', '-')}", flag, default=None,
                         type=click.Choice(OVERRIDE_TYPES, case_sensitive=False),
                         help=f"Type of the {what} (default: as the other weights).")(f)
    return f


def _nthread_ok(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter(f"must be at least 1, got {value}")
    return value


@click.command("quantize", cls=QuantizeCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@click.argument("type_arg", metavar="[TYPE]", required=False,
                type=click.Choice(TYPE_CHOICES, case_sensitive=False))
@click.option("--type", "-t", "type_opt", type=click.Choice(TYPE_CHOICES, case_sensitive=False),
              help="Block type for the weight matrices (default q4_0).")
@click.option("--nthread", type=int, callback=_nthread_ok, help="Threads (default: all available cores).")
@type_override_options
@common_options
@click.pass_context
def quantize_command(ctx: click.Context, src: str, dst: str, type_arg: str | None, type_opt: str | None,
                     nthread: int | None, output_type: str | None, embedding_type: str | None,
                     quiet: bool, debug: bool) -> None:
    """Quantize an NE f32/f16 file to q4_0 (default), q4_1 or q8_0 blocks.

    \b
    Every 2-D weight matrix whose rows fill 32-value blocks is quantized
    (token embedding and output head included); norms, biases and MoE
    routers stay f32.
    Bytes are identical to gguf-py's gguf.quants (ggml's reference). The
    tokenizer folder IN-stem.tokenizer/ is copied to OUT-stem.tokenizer/.

    \b
      netp quantize ne-f32.bin ne-q4_0.bin --type q4_0
      netp quantize ne-f32.bin ne-q8_0.bin q8_0
      netp quantize ne-f32.bin ne-q4_0.bin --output_type q8_0 --embedding_type q8_0
    """
    if type_arg and type_opt and type_arg.lower() != type_opt.lower():
        raise click.UsageError(f"type given twice: {type_arg} and --type {type_opt}")
    type_name = (type_opt or type_arg or "q4_0").lower()
    prog = "netp quantize" if ctx.parent is not None else ctx.info_name or "quantize"
    run_reporting(prog, debug, _run, src, dst, type_name, nthread, None, output_type and output_type.lower(),
                  embedding_type and embedding_type.lower(), quiet)


# -- neural-speed's scripts/quantize.py ----------------------------------------

# neural-speed flags netp does not implement, and why (refused by name).
NS_REFUSED = {
    "compute_dtype": "it picks neural-speed's own matmul kernels; netp writes ggml blocks and computes in f32",
    "build_dir": "it points at neural-speed's compiled quantizer; netp quantizes in Python",
    "config": "netp reads the hyper-parameters from the NE file itself",
}


class NSQuantizeCommand(NetpCommand):
    def usage_hint(self, e: click.UsageError) -> str:
        msg = e.format_message()
        if "Missing option" in msg:
            return (f"{msg.rstrip('.')}; e.g. python scripts/quantize.py --model_name llama --model_file ne-f32.bin "
                    "--out_file ne-q4_0.bin --weight_dtype int4")
        return msg


def _refused_option(name: str) -> Any:
    return click.option(f"--{name}", name, hidden=True, default=None,
                        help=f"neural-speed's --{name}: not supported by netp.")


def ns_options(f: Any) -> Any:
    for name in reversed(NS_REFUSED):
        f = _refused_option(name)(f)
    return f


@click.command("quantize.py", cls=NSQuantizeCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model_name", help="neural-speed's name (gptj, llama, llama2, mistral, ...); checked against the file.")
@click.option("--model_file", required=True, type=click.Path(dir_okay=False), help="Input NE f32/f16 file.")
@click.option("--out_file", required=True, type=click.Path(dir_okay=False), help="Output NE file.")
@click.option("--weight_dtype", default="int4", show_default=True, help="int4 or int8.")
@click.option("--alg", default="sym", show_default=True, help="sym or asym (asym: int4 only, q4_1).")
@click.option("--group_size", default=GROUP_SIZE, type=int, show_default=True,
              help="Values per scale; ggml's blocks hold 32.")
@click.option("--scale_dtype", default="fp32", show_default=True, help="fp32 (ggml stores it as f16 in the block).")
@click.option("--nthread", type=int, callback=_nthread_ok, help="Threads (default: all available cores).")
@click.option("--use_ggml", is_flag=True, help="Accepted: netp always writes ggml blocks.")
@type_override_options
@ns_options
@common_options
def ns_quantize_command(model_name: str | None, model_file: str, out_file: str, weight_dtype: str, alg: str,
                        group_size: int, scale_dtype: str, nthread: int | None, use_ggml: bool,
                        output_type: str | None, embedding_type: str | None,
                        quiet: bool, debug: bool, **refused: str | None) -> None:
    """Quantize an NE f32/f16 file, with neural-speed's scripts/quantize.py flags.

    \b
      python scripts/quantize.py --model_name llama --model_file ne-f32.bin \\
          --out_file ne-q4_0.bin --weight_dtype int4
    """
    prog = click.get_current_context().info_name or "quantize.py"
    run_reporting(prog, debug, _ns_run, model_name, model_file, out_file, weight_dtype, alg, group_size,
                  scale_dtype, nthread, output_type and output_type.lower(), embedding_type and embedding_type.lower(),
                  quiet, refused)


def ns_type_name(weight_dtype: str, alg: str, group_size: int, scale_dtype: str) -> str:
    """neural-speed's options -> ggml type name, or NetpError naming what is supported."""
    for flag, value in (("--weight_dtype", weight_dtype), ("--alg", alg)):
        known = sorted({k[0] for k in NS_TYPES}) if flag == "--weight_dtype" else ["asym", "sym"]
        if value not in known:
            raise NetpError(None, f"{flag} {value} is not supported (netp writes ggml blocks: {NS_SUPPORTED})")
    if (weight_dtype, alg) not in NS_TYPES:
        raise NetpError(None, f"--weight_dtype {weight_dtype} --alg {alg} has no ggml block type "
                              f"(supported: {NS_SUPPORTED})")
    if group_size != GROUP_SIZE:
        raise NetpError(None, f"--group_size {group_size} is not supported: ggml's q4_0/q4_1/q8_0 blocks hold "
                              f"{GROUP_SIZE} values (supported: --group_size {GROUP_SIZE})")
    if scale_dtype != "fp32":
        raise NetpError(None, f"--scale_dtype {scale_dtype} is not supported (supported: fp32; "
                              "ggml blocks keep the scale as f16 computed from f32)")
    return NS_TYPES[(weight_dtype, alg)]


def _ns_run(model_name: str | None, model_file: str, out_file: str, weight_dtype: str, alg: str, group_size: int,
            scale_dtype: str, nthread: int | None, output_type: str | None, embedding_type: str | None,
            quiet: bool, refused: dict[str, str | None]) -> None:
    for name, value in refused.items():
        if value is not None:
            raise NetpError(None, f"--{name} is not supported: {NS_REFUSED[name]}")
    type_name = ns_type_name(weight_dtype, alg, group_size, scale_dtype)
    _run(model_file, out_file, type_name, nthread, model_name, output_type, embedding_type, quiet)


def ns_main() -> Any:
    """Entry point of scripts/quantize.py."""
    import sys

    return ns_quantize_command.main(args=sys.argv[1:], prog_name="quantize.py")
