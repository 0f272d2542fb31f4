"""The shard-set manifest: `OUTDIR/manifest.json`, written by `netp shard`.

A shard set is a folder holding one NE file per tensor-parallel rank
(`rank-00000-of-00002.bin`, ...: 5-digit rank and world size), the
tokenizer folder and this manifest, which says what every rank file holds
and how to check it. Its schema (format version 1) is written once, in
docs/design.md §4, "manifest.json".

Each rank file is a complete NE file: the source's header and vocab
unchanged, then only that rank's tensors (a subset of `tensors`, same order),
each with its local shape: the global shape with `axis` cut to stop - start.
`load_manifest` validates all of this (a NetpError naming the manifest
otherwise), reading the file up to a size cap and refusing a FIFO or device
(docs/design.md §8); checking the files' bytes is `netp shard --check`.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

from netp.errors import NetpError
from netp.formats import atomic
from netp.formats.constants import (
    BLOCK_SIZE, NE_HEADER_FIELDS, QUANTIZED_TYPES, SPLIT_AXIS, SPLIT_KINDS, SPLIT_UNITS, TYPE_NAMES, type_from_name,
)
from netp.formats.names import KNOWN_TOKENIZER_FILES, MANIFEST_NAME, TOKENIZER_FILES
from netp.formats.paths import plain_name, read_json

__all__ = [
    "MANIFEST_NAME", "MANIFEST_FORMAT", "MANIFEST_VERSION", "SPLIT_KINDS", "SPLIT_UNITS",
    "SourceInfo", "RankFile", "TensorEntry", "Manifest", "rank_file_name", "load_manifest", "local_nbytes",
]

MANIFEST_FORMAT = "netp-shards"
MANIFEST_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_WORLD = 99999  # 5 digits in the rank file names


def rank_file_name(rank: int, world_size: int) -> str:
    """`rank-00000-of-00002.bin`: rank and world size, 5 digits each."""
    if not 1 <= world_size <= _MAX_WORLD or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size} has no file name")
    return f"rank-{rank:05d}-of-{world_size:05d}.bin"


@dataclass(frozen=True)
class SourceInfo:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class RankFile:
    file: str
    size: int
    sha256: str


@dataclass(frozen=True)
class TensorEntry:
    """One source tensor and which part of it each rank stores."""

    name: str
    shape: tuple[int, ...]  # global, numpy order
    type: str  # ggml type name: "f32", "q4_0", ...
    split: str  # rows | cols | rank0 | replicated
    unit: str | None
    axis: int | None
    ranges: tuple[tuple[int, int] | None, ...]  # per rank; None = not stored there

    def held_by(self, rank: int) -> bool:
        return self.ranges[rank] is not None

    def range_of(self, rank: int) -> tuple[int, int] | None:
        return self.ranges[rank]

    def local_shape(self, rank: int) -> tuple[int, ...] | None:
        """Shape of this tensor in rank `rank`'s file (None: not stored there)."""
        r = self.ranges[rank]
        if r is None:
            return None
        if self.axis is None:
            return self.shape
        out = list(self.shape)
        out[self.axis] = r[1] - r[0]
        return tuple(out)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "type": self.type, "split": self.split,
                "unit": self.unit, "axis": self.axis,
                "ranges": [None if r is None else list(r) for r in self.ranges]}


@dataclass
class Manifest:
    source: SourceInfo
    world_size: int
    architecture: str
    hparams: dict[str, int | float]  # the NE header fields by name
    tokenizer: str | None
    tensors: dict[str, TensorEntry]  # file order
    ranks: list[RankFile] = field(default_factory=list)
    version: int = MANIFEST_VERSION
    tokenizer_files: list[RankFile] = field(default_factory=list)  # name, size, sha256 inside `tokenizer`

    def files_for_rank(self, rank: int) -> list[str]:
        """What a host running rank `rank` needs, as names inside the shard set: its rank
        file, the manifest and the tokenizer folder (docs/design.md §9)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside the world of {self.world_size}")
        return [self.ranks[rank].file, MANIFEST_NAME] + ([self.tokenizer] if self.tokenizer else [])

    def tensors_of(self, rank: int) -> list[TensorEntry]:
        """The tensors rank `rank`'s file holds, in file order."""
        return [t for t in self.tensors.values() if t.held_by(rank)]

    def ne_header(self) -> Any:
        """The global NE header as netp.formats.ne.NEHeader."""
        from netp.formats.ne import NEHeader

        return NEHeader(**self.hparams)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT, "version": self.version,
            "source": {"name": self.source.name, "size": self.source.size, "sha256": self.source.sha256},
            "world_size": self.world_size, "architecture": self.architecture, "hparams": dict(self.hparams),
            "tokenizer": self.tokenizer,
            "tensors": [t.to_json() for t in self.tensors.values()],
            "ranks": [{"file": r.file, "size": r.size, "sha256": r.sha256} for r in self.ranks],
            "tokenizer_files": [{"file": f.file, "size": f.size, "sha256": f.sha256} for f in self.tokenizer_files],
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `folder/manifest.json` (validated first) under a temporary name, then rename."""
        path = Path(folder) / MANIFEST_NAME
        data = self.to_json()
        _Validator(path).manifest(data)  # never write a manifest we would refuse to read
        return atomic.write_file(path, _to_text(data).encode("utf-8"))


def load_manifest(folder: str | os.PathLike, architectures: Collection[str] | None = None) -> Manifest:
    """Read and validate `folder/manifest.json` (or a path to the manifest itself).

    architectures: the architecture names the caller can run (netp.models
    knows them; formats does not import it); None leaves the name unchecked.
    """
    path = Path(folder)
    if path.is_dir() or not path.name.endswith(".json"):
        path = path / MANIFEST_NAME
    if not os.path.lexists(path):
        raise NetpError(path, "no such file (not a shard set?)")
    data = read_json(path, what="a manifest")  # capped; a FIFO or /dev/zero is refused unread
    return _Validator(path, architectures).manifest(data)


class _Validator:
    """Schema checks with one-line errors naming the manifest and the field."""

    def __init__(self, path: Path, architectures: Collection[str] | None = None):
        self.path = path
        self.architectures = architectures

    def bad(self, what: str) -> NetpError:
        return NetpError(self.path, f"invalid manifest: {what}")

    def _get(self, obj: dict[str, Any], key: str, kinds: type | tuple[type, ...], where: str) -> Any:
        if key not in obj:
            raise self.bad(f"{where} lacks {key!r}")
        value = obj[key]
        # bool is an int in Python; no field here is a bool.
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self.bad(f"{where}{key} is {value!r:.60}, expected {_kind_names(kinds)}")
        return value

    def _int(self, obj: dict[str, Any], key: str, where: str, minimum: int = 0) -> int:
        value = self._get(obj, key, int, where)
        if value < minimum:
            raise self.bad(f"{where}{key} is {value}, must be at least {minimum}")
        return value

    def _sha(self, obj: dict[str, Any], where: str) -> str:
        value = self._get(obj, "sha256", str, where)
        if not _SHA256.fullmatch(value):
            raise self.bad(f"{where}sha256 is not 64 lowercase hex digits")
        return value

    def manifest(self, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise self.bad("top level is not a JSON object")
        if data.get("format") != MANIFEST_FORMAT:
            raise self.bad(f"format is {data.get('format')!r:.40}, expected {MANIFEST_FORMAT!r}")
        version = self._get(data, "version", int, "")
        if version != MANIFEST_VERSION:
            newer = " (written by a newer netp)" if version > MANIFEST_VERSION else ""
            raise self.bad(f"version {version} is not supported{newer}; this netp reads version {MANIFEST_VERSION}")
        src = self._get(data, "source", dict, "")
        source_name = self._get(src, "name", str, "source.")
        if not _plain_name(source_name):  # verify looks for it beside the set: never elsewhere
            raise self.bad(f"source.name {source_name!r:.60} is not a plain file name (no folders or '..')")
        source = SourceInfo(source_name, self._int(src, "size", "source."), self._sha(src, "source."))
        world = self._int(data, "world_size", "", minimum=1)
        if world > _MAX_WORLD:
            raise self.bad(f"world_size {world} is more than {_MAX_WORLD}")
        arch = self._get(data, "architecture", str, "")
        if self.architectures is not None and arch not in self.architectures:
            raise self.bad(f"unknown architecture {arch!r} (supported: {', '.join(sorted(self.architectures))})")
        hparams = self.hparams(self._get(data, "hparams", dict, ""))
        tokenizer = data.get("tokenizer")
        if tokenizer is not None and (not isinstance(tokenizer, str) or not _plain_name(tokenizer)):
            raise self.bad(f"tokenizer is {tokenizer!r:.60}, expected a folder name inside the shard set or null")
        ranks = self.ranks(self._get(data, "ranks", list, ""), world)
        entries = self._get(data, "tensors", list, "")
        if not entries:
            raise self.bad("tensors is empty")
        tensors: dict[str, TensorEntry] = {}
        for i, item in enumerate(entries):
            t = self.tensor(item, i, world)
            if t.name in tensors:
                raise self.bad(f"tensor {t.name} listed twice")
            tensors[t.name] = t
        for r in range(world):
            if not any(t.held_by(r) for t in tensors.values()):
                raise self.bad(f"rank {r} holds no tensor")
        tokenizer_files = self.tokenizer_files(data.get("tokenizer_files"), tokenizer)
        return Manifest(source, world, arch, hparams, tokenizer, tensors, ranks, version, tokenizer_files)

    def tokenizer_files(self, items: Any, tokenizer: str | None) -> list[RankFile]:
        """The tokenizer folder's files: required with a tokenizer, plain names netp knows."""
        if tokenizer is None:
            if items:
                raise self.bad("tokenizer_files listed without a tokenizer folder")
            return []
        if not isinstance(items, list):
            raise self.bad(f"tokenizer_files is {items!r:.60}, expected a list of the tokenizer folder's files")
        out: list[RankFile] = []
        for i, item in enumerate(items):
            where = f"tokenizer_files[{i}]."
            if not isinstance(item, dict):
                raise self.bad(f"tokenizer_files[{i}] is not an object")
            name = self._get(item, "file", str, where)
            if name not in KNOWN_TOKENIZER_FILES or name in (f.file for f in out):
                raise self.bad(f"{where}file is {name!r:.60}, not one of the tokenizer files netp knows "
                               f"({', '.join(KNOWN_TOKENIZER_FILES)}) listed once")
            out.append(RankFile(name, self._int(item, "size", where), self._sha(item, where)))
        missing = [f for f in TOKENIZER_FILES if f not in (e.file for e in out)]
        if missing:
            raise self.bad(f"tokenizer_files lacks {missing[0]}")
        return out

    def hparams(self, obj: dict[str, Any]) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for name, fmt, _ in NE_HEADER_FIELDS:
            kinds = int if fmt == "i" else (int, float)
            value = self._get(obj, name, kinds, "hparams.")
            if fmt == "i" and not -(1 << 31) <= value < 1 << 31:
                raise self.bad(f"hparams.{name} is {value}, which the NE header's int32 cannot hold")
            if fmt == "f" and not math.isfinite(value):
                raise self.bad(f"hparams.{name} is {value}, not a finite number")
            out[name] = int(value) if fmt == "i" else float(value)
        extra = set(obj) - set(out)
        if extra:
            raise self.bad(f"hparams has unknown field(s) {', '.join(sorted(extra))}")
        for name in ("n_vocab", "n_embd", "n_head", "n_layer"):
            if out[name] <= 0:
                raise self.bad(f"hparams.{name} is {out[name]}, must be positive")
        return out

    def ranks(self, items: list[Any], world: int) -> list[RankFile]:
        if len(items) != world:
            raise self.bad(f"ranks lists {len(items)} files for world_size {world}")
        out = []
        for r, item in enumerate(items):
            where = f"ranks[{r}]."
            if not isinstance(item, dict):
                raise self.bad(f"ranks[{r}] is not an object")
            name = self._get(item, "file", str, where)
            if name != rank_file_name(r, world):
                raise self.bad(f"{where}file is {name!r:.60}, expected {rank_file_name(r, world)!r}")
            out.append(RankFile(name, self._int(item, "size", where), self._sha(item, where)))
        return out

    def tensor(self, item: Any, i: int, world: int) -> TensorEntry:
        if not isinstance(item, dict):
            raise self.bad(f"tensors[{i}] is not an object")
        name = self._get(item, "name", str, f"tensors[{i}].")
        if not name:
            raise self.bad(f"tensors[{i}].name is empty")
        where = f"tensor {name}: "
        shape = self._get(item, "shape", list, where)
        if not 1 <= len(shape) <= 4 or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape):
            raise self.bad(f"{where}shape {shape!r:.60} is not 1 to 4 positive integers")
        type_name = self._tensor_type(item, shape, where)
        split, unit, axis = self._split(item, shape, where)
        ranges = self._ranges(item, where, world, shape, type_name, split, axis)
        self._check_holders(where, split, ranges, shape[0] if axis is None else shape[axis])
        return TensorEntry(name, tuple(shape), type_name, split, unit, axis, tuple(ranges))

    def _tensor_type(self, item: dict[str, Any], shape: list[int], where: str) -> str:
        type_name = self._get(item, "type", str, where)
        try:
            ggml_type = type_from_name(type_name)
        except ValueError as e:
            raise self.bad(f"{where}{e}") from e
        if type_name != TYPE_NAMES[ggml_type]:
            raise self.bad(f"{where}type {type_name!r} is not spelled {TYPE_NAMES[ggml_type]!r}")
        if ggml_type in QUANTIZED_TYPES and shape[-1] % BLOCK_SIZE:
            raise self.bad(f"{where}row length {shape[-1]} is not whole {BLOCK_SIZE}-value blocks of {type_name}")
        return type_name

    def _split(self, item: dict[str, Any], shape: list[int], where: str) -> tuple[str, str | None, int | None]:
        split = self._get(item, "split", str, where)
        if split not in SPLIT_KINDS:
            raise self.bad(f"{where}split {split!r:.40} is not one of {', '.join(SPLIT_KINDS)}")
        unit, axis = item.get("unit"), item.get("axis")
        if split in SPLIT_AXIS:
            if unit not in SPLIT_UNITS:
                raise self.bad(f"{where}unit {unit!r:.40} is not one of {', '.join(SPLIT_UNITS)}")
            expected_axis = min(SPLIT_AXIS[split], len(shape) - 1)  # a 1-D tensor is cut along its only axis
            if axis != expected_axis or isinstance(axis, bool):
                raise self.bad(f"{where}axis is {axis!r:.20}, a {split} split of shape {shape} cuts axis {expected_axis}")
        elif unit is not None or axis is not None:
            raise self.bad(f"{where}a {split} tensor has no unit or axis")
        return split, unit, axis

    def _ranges(self, item: dict[str, Any], where: str, world: int, shape: list[int], type_name: str, split: str,
                axis: int | None) -> list[tuple[int, int] | None]:
        """Per rank [start, stop) inside the cut axis, or None; whole tensors [0, shape[0]]."""
        ranges = self._get(item, "ranges", list, where)
        if len(ranges) != world:
            raise self.bad(f"{where}ranges lists {len(ranges)} ranks for world_size {world}")
        extent = shape[0] if axis is None else shape[axis]
        cuts_blocks = type_from_name(type_name) in QUANTIZED_TYPES and axis == len(shape) - 1
        parsed: list[tuple[int, int] | None] = []
        for r, rng in enumerate(ranges):
            if rng is None:
                parsed.append(None)
                continue
            if (not isinstance(rng, list) or len(rng) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) for v in rng)):
                raise self.bad(f"{where}range of rank {r} is {rng!r:.40}, expected [start, stop] or null")
            a, b = rng
            if not 0 <= a < b <= extent:
                raise self.bad(f"{where}range of rank {r} [{a}, {b}) is empty or outside 0..{extent}")
            if axis is None and (a, b) != (0, extent):
                raise self.bad(f"{where}a {split} tensor is stored whole: range must be [0, {extent}]")
            if cuts_blocks and (a % BLOCK_SIZE or b % BLOCK_SIZE):
                raise self.bad(f"{where}range of rank {r} [{a}, {b}) cuts {type_name} blocks of {BLOCK_SIZE}")
            parsed.append((a, b))
        return parsed

    def _check_holders(self, where: str, split: str, ranges: list[tuple[int, int] | None], extent: int) -> None:
        if split == "rank0":
            if ranges[0] is None or any(r is not None for r in ranges[1:]):
                raise self.bad(f"{where}a rank0 tensor must be stored on rank 0 only")
            return
        if any(r is None for r in ranges):
            raise self.bad(f"{where}a {split} tensor must be stored on every rank")
        if split == "replicated":
            return
        # Split ranges ascend and together cover the whole axis (they may overlap).
        covered = 0
        for r, (a, b) in enumerate(ranges):  # type: ignore[misc]
            if a > covered:
                raise self.bad(f"{where}elements {covered}..{a} are on no rank")
            if r and a < ranges[r - 1][0]:  # type: ignore[index]
                raise self.bad(f"{where}ranges are not in rank order")
            covered = max(covered, b)
        if covered != extent:
            raise self.bad(f"{where}elements {covered}..{extent} are on no rank")


def _to_text(data: dict[str, Any]) -> str:
    """JSON with one line per tensor and per rank file (readable, diffable)."""
    parts = []
    for key, value in data.items():
        if key in ("tensors", "ranks", "tokenizer_files"):
            items = ",\n".join("  " + json.dumps(v, separators=(", ", ": ")) for v in value)
            parts.append(f" {json.dumps(key)}: [\n{items}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: " + json.dumps(value, indent=1).replace("\n", "\n "))
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _plain_name(name: str) -> bool:
    try:
        plain_name(name, None, "name")
    except NetpError:
        return False
    return True


def local_nbytes(entry: TensorEntry, rank: int) -> int:
    """Data bytes of `entry` in rank `rank`'s file (0 when not stored)."""
    from netp.formats.ne import tensor_nbytes

    shape = entry.local_shape(rank)
    return 0 if shape is None else tensor_nbytes(type_from_name(entry.type), shape)

