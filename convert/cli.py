"""`netp convert` and `python scripts/convert.py` (neural-speed's flags): one command.

Only click and netp's CLI plumbing are imported here; the stage
(netp.convert.stage: numpy, safetensors, gguf, ...) loads inside the command.
"""
from __future__ import annotations

import shlex
from typing import Any

import click

from netp.cliutil import NetpCommand, common_options, progress_bar, run_reporting

class ConvertCommand(NetpCommand):
    """Remembers the raw arguments so a usage error can show the corrected line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["netp.convert.argv"] = list(args)
        return super().parse_args(ctx, args)

    def usage_hint(self, e: click.UsageError) -> str:
        ctx = e.ctx
        argv = ctx.meta.get("netp.convert.argv") if ctx is not None else None
        missing_model = isinstance(e, click.MissingParameter) and e.param is not None and e.param.name == "model"
        if not missing_model or argv is None:
            return e.format_message()
        return missing_model_hint(ctx.command_path if ctx is not None else "convert.py", argv)


def _option_value(argv: list[str], names: tuple[str, ...]) -> tuple[int, str] | None:
    """(index of the value, value) of the last use of an option in argv."""
    found = None
    for i, a in enumerate(argv):
        if a in names and i + 1 < len(argv):
            found = (i + 1, argv[i + 1])
        for n in names:
            if a.startswith(n + "="):
                found = (i, a)
    return found


def missing_model_hint(prog: str, argv: list[str]) -> str:
    """The seed's published line forgets MODEL and gives the model as --outfile:
    say so and show the corrected line."""
    argv = list(argv)
    outfile = _option_value(argv, ("--outfile", "-o"))
    outtype = _option_value(argv, ("--outtype",))
    kind = (outtype[1].split("=", 1)[-1] if outtype else "f32")
    if outfile is not None:
        index, raw = outfile
        value = raw.split("=", 1)[1] if raw.startswith("-") else raw
        from netp.convert.resolve import looks_like_hub_id

        if "/" in value and looks_like_hub_id(value):
            # --outfile got the model: it goes last, and the NE file gets a name.
            argv[index] = f"--outfile=ne-{kind}.bin" if raw.startswith("-") else f"ne-{kind}.bin"
            line = shlex.join([*prog.split(), *argv, value])
            return (f"MODEL is missing: {value} was given as --outfile, but it names the model, which comes last "
                    f"(an HF folder, cached hub id or .gguf); did you mean: {line}")
    line = shlex.join([*prog.split(), *argv]) + " MODEL"
    return f"MODEL is missing (an HF folder, cached hub id or .gguf file, given last): {line}"


@click.command("convert", cls=ConvertCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", metavar="MODEL")
@click.option("--outtype", type=click.Choice(["f32", "f16"]), default="f32", show_default=True,
              help="Type of the 2-D weights; 1-D tensors (norms, biases) stay f32.")
@click.option("--outfile", "-o", type=click.Path(dir_okay=False), default=None,
              help="NE file to write (default ne-<outtype>.bin); its tokenizer goes to <stem>.tokenizer/ beside it.")
@common_options
def convert_command(model: str, outtype: str, outfile: str | None, quiet: bool, debug: bool) -> None:
    """Convert MODEL to an NE file: an HF model folder (safetensors, sharded or
    not, f32/f16/bf16; or pytorch_model.bin with the torch extra), a hub id
    already in the local Hugging Face cache (never downloaded), or a .gguf file.

    \b
    Examples:
      python scripts/convert.py --outtype f32 --outfile ne-f32.bin EleutherAI/gpt-j-6b
      netp convert --outtype f16 --outfile ne-f16.bin ./my-llama/
      netp convert --outfile smollm2-f32.bin SmolLM2-135M-Instruct.Q4_1.gguf
    """
    prog = click.get_current_context().command_path

    def run() -> Any:
        from netp.convert.stage import convert, summary_line

        with progress_bar("convert", unit="tensor", quiet=quiet) as on_progress:
            result = convert(model, outfile or f"ne-{outtype}.bin", outtype, on_progress=on_progress)
        for warning in result.warnings:  # shown even with --quiet: it is not progress
            click.echo(f"{prog}: warning: {model}: {warning}", err=True)
        if not quiet:
            click.echo(summary_line(result), err=True)
        return result

    run_reporting(prog, debug, run)
