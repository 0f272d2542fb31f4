"""`netp inspect PATH`: what is in an NE file, a GGUF file or a shard set.

Like llama.cpp's gguf-dump: the header, the recognised architecture and its
hparams, the vocab size, a tensor table (name, type, shape, bytes, offset)
and totals by type; for a shard set the world size, each rank file, every
tensor's split and ranges, and whether the checksums hold. `--json` prints
the same facts for machines.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from netp.cliutil import NetpCommand, common_options, fail, run_reporting
from netp.errors import NetpError
from netp.formats.names import MANIFEST_NAME
from netp.sizes import human_size


def _tensor_rows(tensors: list[dict[str, Any]]) -> list[str]:
    width = max([len(t["name"]) for t in tensors] + [4])
    lines = [f"  {'name':<{width}}  {'type':<5} {'shape':<16} {'bytes':>12} {'offset':>12}"]
    for t in tensors:
        shape = "x".join(map(str, t["shape"]))
        lines.append(f"  {t['name']:<{width}}  {t['type']:<5} {shape:<16} {t['nbytes']:>12} {t['offset']:>12}")
    return lines


def _totals(tensors: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    params: Counter[str] = Counter()
    for t in tensors:
        count[t["type"]] += 1
        size[t["type"]] += t["nbytes"]
        n = 1
        for d in t["shape"]:
            n *= d
        params[t["type"]] += n
    return {k: {"tensors": count[k], "bytes": size[k], "elements": params[k]} for k in sorted(count)}


def describe_ne(path: Path) -> dict[str, Any]:
    from netp.formats.constants import TYPE_NAMES
    from netp.formats.ne import NEReader
    from netp.models import ne_model

    with NEReader(path) as r:
        tensors = [{"name": t.name, "type": TYPE_NAMES[t.ggml_type], "shape": list(t.shape),
                    "nbytes": t.nbytes, "offset": t.offset} for t in r.tensors.values()]
        arch, hp = ne_model(r.header, r.shapes, str(path))
        return {"kind": "ne", "path": str(path), "file_size": r.file_size, "architecture": arch.name,
                "header": dataclasses.asdict(r.header), "hparams": dataclasses.asdict(hp),
                "vocab_size": len(r.vocab), "tensors": tensors, "totals": _totals(tensors)}


def describe_gguf(path: Path) -> dict[str, Any]:
    import gguf

    from netp.formats.gguf_in import field_value, open_gguf_reader

    r = open_gguf_reader(path)
    meta: dict[str, Any] = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            meta[name] = f"[{len(field.data)} items]"
        else:
            value = field_value(r, name, path)
            if isinstance(value, str):
                value = value.replace("\n", "\\n")
                value = value if len(value) < 120 else value[:117] + "..."
            meta[name] = value
    tensors = [{"name": t.name, "type": t.tensor_type.name.lower(), "shape": [int(d) for d in reversed(t.shape)],
                "nbytes": int(t.n_bytes), "offset": int(t.data_offset)} for t in r.tensors]
    return {"kind": "gguf", "path": str(path), "file_size": path.stat().st_size, "metadata": meta,
            "tensors": tensors, "totals": _totals(tensors)}


def describe_shards(folder: Path) -> dict[str, Any]:
    """The manifest's facts and a fresh check of every rank file and checksum."""
    from netp.formats.manifest import local_nbytes
    from netp.shard.check import check_shard_set

    report = check_shard_set(folder)
    m = report.manifest
    tensors = []
    for t in m.tensors.values():
        stored = sum(local_nbytes(t, r) for r in range(m.world_size))
        if t.axis is None:
            where = t.split
        else:
            where = f"{t.split}@{t.axis} " + " ".join("-" if r is None else f"{r[0]}:{r[1]}" for r in t.ranges)
        tensors.append({"name": t.name, "type": t.type, "shape": list(t.shape), "nbytes": stored, "offset": where})
    summary = [f"world size: {m.world_size}   architecture: {m.architecture}   tokenizer: {m.tokenizer or 'none'}",
               f"source: {m.source.name} ({m.source.size} bytes, sha256 {m.source.sha256})",
               "rank files (the tensor table's last column is split@axis and per-rank [start:stop)):"]
    summary += report.lines()[1:]
    return {"kind": "shards", "path": str(report.folder), "file_size": sum(r.size for r in m.ranks),
            "manifest": m.to_json() | {"tensors": len(m.tensors)}, "summary_lines": summary,
            "tensors": tensors, "totals": _totals(tensors), "checksums_ok": report.ok,
            "check_error": None if (error := report.error()) is None else str(error)}


def files_for_rank(folder: Path, rank: int) -> list[Path]:
    """The files a host running `rank` of the shard set needs (what to copy there)."""
    from netp.formats.manifest import load_manifest

    if not folder.is_dir():
        raise NetpError(folder, "--files-for-rank needs a shard-set folder")
    m = load_manifest(folder)
    if not 0 <= rank < m.world_size:
        raise NetpError(folder / MANIFEST_NAME, f"--files-for-rank {rank}: the set has ranks 0..{m.world_size - 1}")
    return [folder / name for name in m.files_for_rank(rank)]


def describe(path: Path) -> dict[str, Any]:
    if path.is_dir():
        if not (path / MANIFEST_NAME).exists():
            raise NetpError(path, f"is a directory without {MANIFEST_NAME} (not a shard set)")
        return describe_shards(path)
    from netp.formats.paths import is_gguf

    if is_gguf(path, "an NE file, a GGUF file or a shard set"):
        return describe_gguf(path)
    return describe_ne(path)


def render(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}: {info['kind'].upper()} file, {human_size(info['file_size'])}"]
    if info["kind"] == "ne":
        lines.append(f"architecture: {info['architecture']}   vocab: {info['vocab_size']}")
        lines.append("header: " + "  ".join(f"{k}={v}" for k, v in info["header"].items()))
    elif info["kind"] == "gguf":
        lines += [f"  {k} = {v}" for k, v in info["metadata"].items()]
    elif info["kind"] == "shards":
        lines += info["summary_lines"]
    lines.append(f"tensors: {len(info['tensors'])}")
    lines += _tensor_rows(info["tensors"])
    lines.append("totals by type:")
    for t, v in info["totals"].items():
        lines.append(f"  {t:<5} {v['tensors']:>5} tensors  {v['elements']:>12} values  {human_size(v['bytes']):>10}")
    return "\n".join(lines)


@click.command("inspect", cls=NetpCommand)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--files-for-rank", "files_rank", type=int, default=None, metavar="R",
              help="Shard set only: print, one a line, the files the host of rank R needs (nothing else).")
@common_options
def inspect_command(path: Path, as_json: bool, files_rank: int | None, quiet: bool, debug: bool) -> None:
    """Show what an NE file, a GGUF file or a shard set holds.

    \b
    Examples:
      netp inspect ne-q4_0.bin
      netp inspect model.gguf --json
      netp inspect shards/          # also re-checks every checksum
      netp inspect shards/ --files-for-rank 1   # what to copy to rank 1's host
    """
    if files_rank is not None:
        for f in run_reporting("netp inspect", debug, files_for_rank, path, files_rank):
            click.echo(str(f))
        return
    info = run_reporting("netp inspect", debug, describe, path)
    if as_json:
        json.dump(info, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        click.echo(render(info))
    if info.get("check_error") is not None:  # the report above shows every file; one error line ends it
        fail("netp inspect", NetpError(None, info["check_error"]))
