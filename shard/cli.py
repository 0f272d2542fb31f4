"""`shard --ranks N IN OUTDIR` / `netp shard ...`, and `--check OUTDIR`.

Imports only click and netp.cliutil at module level; the stage loads inside
the command so `netp --help` stays fast.
"""
from __future__ import annotations

from pathlib import Path

import click

from netp.cliutil import NetpCommand, common_options, fail, progress_bar, run_reporting

_CORRECT = "shard --ranks N IN OUTDIR   (or: shard --check OUTDIR)"


class ShardCommand(NetpCommand):
    def usage_hint(self, e: click.UsageError) -> str:
        return f"{e.format_message()}; usage: {_CORRECT}"


def _prog(ctx: click.Context) -> str:
    return "netp shard" if ctx.parent is not None else ctx.info_name or "shard"


@click.command("shard", cls=ShardCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", metavar="IN", required=False, type=click.Path(path_type=Path))
@click.argument("outdir", metavar="OUTDIR", required=False, type=click.Path(path_type=Path))
@click.option("--ranks", "-r", type=int, help="Number of tensor-parallel ranks (1 .. the model's head count).")
@click.option("--force", is_flag=True, help="Replace OUTDIR if it exists and is not empty.")
@click.option("--check", "check_dir", metavar="OUTDIR", type=click.Path(path_type=Path),
              help="Re-hash every file of an existing shard set against its manifest; exit 1 on any mismatch.")
@common_options
@click.pass_context
def shard_command(ctx: click.Context, src: Path | None, outdir: Path | None, ranks: int | None, force: bool,
                  check_dir: Path | None, quiet: bool, debug: bool) -> None:
    """Pre-split NE file IN into one NE file per tensor-parallel rank in OUTDIR:
    rank-00000-of-0000N.bin ..., manifest.json (split ranges + sha256 of
    every file) and tokenizer/ (copied from IN's <stem>.tokenizer/).

    Row cuts, column cuts and quantized blocks are copied byte for byte, so
    the ranks together hold exactly the source's bytes. Query heads are cut
    as evenly as possible; a KV head shared by two ranks is stored on both.

    \b
    Examples:
      shard --ranks 2 ne-q4_0.bin shards/
      netp shard --ranks 3 --force ne-f32.bin shards-3/
      shard --check shards/
    """
    prog = _prog(ctx)
    if check_dir is not None:
        if src is not None or ranks is not None or force:
            raise click.UsageError("--check OUTDIR takes no IN, --ranks or --force", ctx)
        _check(prog, check_dir, debug)
        return
    if src is None or outdir is None:
        missing = "IN and OUTDIR" if src is None else "OUTDIR"
        raise click.UsageError(f"missing {missing}", ctx)
    if ranks is None:
        raise click.UsageError("missing --ranks N", ctx)
    if ranks < 1:
        raise click.UsageError(f"--ranks must be at least 1, got {ranks}", ctx)

    def work() -> str:
        from netp.shard.stage import shard_file, summary_line

        with progress_bar(f"shard x{ranks}", quiet=quiet) as on_progress:
            return summary_line(shard_file(src, outdir, ranks, force=force, on_progress=on_progress))

    line = run_reporting(prog, debug, work)
    if not quiet:
        click.echo(line)


def _check(prog: str, folder: Path, debug: bool) -> None:
    def work():
        from netp.shard.check import check_shard_set

        return check_shard_set(folder)

    report = run_reporting(prog, debug, work)
    for line in report.lines():
        click.echo(line)
    if (error := report.error()) is not None:
        fail(prog, error)


@click.command("reshard", cls=NetpCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("shards", metavar="SHARDS", type=click.Path(path_type=Path))
@click.argument("outdir", metavar="OUTDIR", type=click.Path(path_type=Path))
@click.option("--ranks", "-r", type=int, required=True, help="Number of tensor-parallel ranks of the new set.")
@click.option("--force", is_flag=True, help="Replace OUTDIR if it exists and is not empty.")
@common_options
def reshard_command(shards: Path, outdir: Path, ranks: int, force: bool, quiet: bool, debug: bool) -> None:
    """Cut the shard set SHARDS for another number of ranks into OUTDIR, from its
    rank files alone (no source NE file needed). Every rank file is checked
    against the manifest first; quantized bytes are copied, never re-quantized.
    The new set equals `shard --ranks M` of the source, byte for byte.

    \b
    Examples:
      netp reshard shards-4/ --ranks 8 shards-8/
      netp reshard shards/ --ranks 1 single/
    """
    prog = click.get_current_context().command_path
    if ranks < 1:
        raise click.UsageError(f"--ranks must be at least 1, got {ranks}")

    def work() -> str:
        from netp.shard.stage import summary_line
        from netp.shard.reshard import reshard

        with progress_bar(f"reshard x{ranks}", quiet=quiet) as on_progress:
            return summary_line(reshard(shards, outdir, ranks, force=force, on_progress=on_progress))

    line = run_reporting(prog, debug, work)
    if not quiet:
        click.echo(line)
