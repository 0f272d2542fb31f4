"""`netp pipeline MODEL OUTDIR --outtype TYPE --ranks N`: convert, quantize and
shard in one pass. Imports only click and netp's CLI plumbing at module level.
"""
from __future__ import annotations

from pathlib import Path

import click

from netp.cliutil import NetpCommand, common_options, progress_bar, run_reporting
from netp.quantize.cli import type_override_options
from netp.typenames import TYPE_NAMES


class PipelineCommand(NetpCommand):
    def usage_hint(self, e: click.UsageError) -> str:
        return f"{e.format_message().rstrip('.')}; usage: netp pipeline MODEL OUTDIR --outtype q4_0 --ranks N"


@click.command("pipeline", cls=PipelineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", metavar="MODEL")
@click.argument("outdir", metavar="OUTDIR", type=click.Path(path_type=Path))
@click.option("--outtype", type=click.Choice(list(TYPE_NAMES)), default="q4_0",
              show_default=True, help="Type of the 2-D weights (q*: quantized from f32, as quantize does).")
@click.option("--ranks", "-r", type=int, required=True, help="Number of tensor-parallel ranks.")
@click.option("--force", is_flag=True, help="Replace OUTDIR if it exists and is not empty.")
@click.option("--nthread", type=click.IntRange(min=1), help="Quantize threads (default: all available cores).")
@type_override_options
@common_options
def pipeline_command(model: str, outdir: Path, outtype: str, ranks: int, force: bool, nthread: int | None,
                     output_type: str | None, embedding_type: str | None, quiet: bool, debug: bool) -> None:
    """Convert MODEL (an HF folder, a cached hub id or a .gguf), quantize it and
    cut it into a shard set in OUTDIR in one pass: no unsharded NE file is
    written. The rank files and manifest equal those of

    \b
      netp convert --outtype f32 --outfile ne-f32.bin MODEL   (f16 for --outtype f16)
      netp quantize ne-f32.bin ne-q4_0.bin --type q4_0        (quantized outtypes only)
      netp shard --ranks N ne-q4_0.bin OUTDIR

    byte for byte; the manifest's source is that ne-<outtype>.bin, hashed as it streams.

    \b
    Examples:
      netp pipeline SmolLM2-135M-Instruct.Q4_1.gguf shards/ --outtype q4_0 --ranks 2
      netp pipeline ./my-llama/ shards-3/ --outtype q8_0 --ranks 3 --output_type f16
    """
    prog = click.get_current_context().command_path
    if ranks < 1:
        raise click.UsageError(f"--ranks must be at least 1, got {ranks}")

    def work() -> str:
        from netp.pipeline.onepass import run_pipeline, summary_line

        with progress_bar(f"pipeline {outtype} x{ranks}", quiet=quiet) as on_progress:
            result = run_pipeline(model, outdir, outtype, ranks, output_type=output_type and output_type.lower(),
                                  embedding_type=embedding_type and embedding_type.lower(), force=force,
                                  nthread=nthread, on_progress=on_progress)
        return summary_line(result)

    line = run_reporting(prog, debug, work)
    if not quiet:
        click.echo(line)
