"""The `netp` command group and the standalone `shard` and `ne-run` scripts.

Subcommands are loaded lazily from their stage's cli module, so
`netp --help` imports nothing heavy.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from netp.cliutil import OneLineErrors

# command name -> (module, attribute, one-line help shown by `netp --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "convert": ("netp.convert.cli", "convert_command", "HF checkpoint dir, cached hub id or .gguf -> NE f32/f16."),
    "quantize": ("netp.quantize.cli", "quantize_command", "NE f32/f16 -> q4_0, q4_1 or q8_0 blocks."),
    "shard": ("netp.shard.cli", "shard_command", "Pre-split an NE file into one file per rank + manifest."),
    "pipeline": ("netp.pipeline.cli", "pipeline_command", "MODEL -> shard set in one pass (convert, quantize, shard)."),
    "reshard": ("netp.shard.cli", "reshard_command", "Cut a shard set for another number of ranks."),
    "run": ("netp.runtime.cli", "run_command", "Generate text from an NE file or shard set (MPI-aware)."),
    "verify": ("netp.runtime.cli", "verify_command", "Check a shard set against its source and transformers."),
    "perplexity": ("netp.runtime.cli", "perplexity_command", "Perplexity (and KL vs a reference) over a text."),
    "serve": ("netp.runtime.cli", "serve_command", "Serve a model over HTTP with OpenAI's API (MPI-aware)."),
    "inspect": ("netp.inspect", "inspect_command", "Show an NE file, GGUF file or shard set."),
}


class LazyGroup(OneLineErrors, click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table, so `netp --help` imports no stage.
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="netp")
def netp() -> None:
    """netp: turn LLM checkpoints into compact, pre-sharded, verified NE files
    for CPU tensor-parallel inference.

    \b
    Pipeline (neural-speed-compatible forms in scripts/):
      netp convert --outtype f32 --outfile ne-f32.bin MODEL
      netp quantize ne-f32.bin ne-q4_0.bin --type q4_0
      netp shard --ranks 2 ne-q4_0.bin shards/
      (or all three at once: netp pipeline MODEL shards/ --outtype q4_0 --ranks 2)
      mpiexec -n 2 netp run -m shards/ -p "Once upon a time" -n 32
      netp verify shards/ --f32 ne-f32.bin --hf MODEL
      mpiexec -n 2 netp serve shards/ --port 8080
    """


def main() -> Any:
    return netp.main(prog_name="netp")


def _standalone(name: str, prog: str) -> Any:
    module, attr, _ = COMMANDS[name]
    command = getattr(importlib.import_module(module), attr)
    return command.main(args=sys.argv[1:], prog_name=prog)


def shard_main() -> Any:
    return _standalone("shard", "shard")


def ne_run_main() -> Any:
    return _standalone("run", "ne-run")
