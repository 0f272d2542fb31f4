"""Which slice of every tensor a tensor-parallel rank holds: one object, used
by shard, the runtime and the tests alike (TensorRT-LLM's Mapping shape).

Rules (docs/design.md §4), one for every world size N:
- query heads are cut into N contiguous ranges, as even as possible (the
  first n_head % N ranks get one more); N > n_head is refused;
- each rank holds every KV head its query heads use, so a KV head whose
  group straddles two ranks is held by both (ranges overlap);
- MLP width and vocab are cut in whole 32-value blocks, as evenly as
  possible, so f32 and quantized shard sets of one model cut alike; every
  expert (and a shared expert) is cut like a dense MLP of its own width.
"""
from __future__ import annotations

from dataclasses import dataclass

from netp.formats.constants import BLOCK_SIZE
from netp.models.architecture import Architecture, SplitRule
from netp.models.hparams import HParams


class SplitError(ValueError):
    """A model that cannot be cut over the requested ranks."""


def even_ranges(n_units: int, world_size: int) -> list[tuple[int, int]]:
    """n_units cut into world_size contiguous ranges, the first n % N one longer."""
    base, extra = divmod(n_units, world_size)
    cuts = [0]
    for r in range(world_size):
        cuts.append(cuts[-1] + base + (r < extra))
    return list(zip(cuts[:-1], cuts[1:]))


def block_ranges(n: int, world_size: int, what: str) -> list[tuple[int, int]]:
    """n elements cut at multiples of BLOCK_SIZE (the last range takes any tail)."""
    n_blocks = -(-n // BLOCK_SIZE)
    if n_blocks < world_size:
        raise SplitError(f"{what} of {n} cannot be cut into {world_size} ranges of whole {BLOCK_SIZE}-value blocks")
    return [(a * BLOCK_SIZE, min(n, b * BLOCK_SIZE)) for a, b in even_ranges(n_blocks, world_size)]


@dataclass(frozen=True)
class TensorSlice:
    """One rank's part of a tensor: `axis` None means the whole tensor,
    `held` False means this rank stores nothing of it (a rank-0-only bias)."""

    rule: SplitRule
    axis: int | None
    start: int
    stop: int
    held: bool = True


class Mapping:
    """Answers "which slice is mine" for rank `rank` of `world_size`."""

    def __init__(self, world_size: int, rank: int, hp: HParams, arch: Architecture):
        if world_size < 1:
            raise SplitError(f"world size must be at least 1, got {world_size}")
        if world_size > hp.n_head:
            raise SplitError(f"{world_size} ranks is more than the model's {hp.n_head} attention heads")
        if not 0 <= rank < world_size:
            raise SplitError(f"rank {rank} outside world size {world_size}")
        self.world_size, self.rank, self.hp, self.arch = world_size, rank, hp, arch
        self._q = even_ranges(hp.n_head, world_size)
        self._vocab = block_ranges(hp.n_vocab, world_size, "vocab")
        # Every MLP width the model has (dense, one expert's, the shared expert's), cut alike;
        # one that cannot be cut is refused here, by name.
        self._ffn: dict[int, list[tuple[int, int]]] = {}
        dense = not hp.n_expert or any(not hp.is_moe_layer(i) for i in range(hp.n_layer))
        for w, what in ((hp.n_ff_expert, "expert MLP width"), (hp.n_ff_shared, "shared expert MLP width"),
                        (hp.n_ff if dense else 0, "MLP width")):
            if w and w not in self._ffn:
                self._ffn[w] = block_ranges(w, world_size, what)

    # -- heads -----------------------------------------------------------------
    def q_heads(self, rank: int | None = None) -> tuple[int, int]:
        return self._q[self.rank if rank is None else rank]

    def kv_heads(self, rank: int | None = None) -> tuple[int, int]:
        """KV heads the rank's query heads use (group = n_head / n_head_kv)."""
        h0, h1 = self.q_heads(rank)
        group = self.hp.n_head // self.hp.n_head_kv
        return h0 // group, (h1 - 1) // group + 1

    def ffn(self, rank: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The rank's range of an MLP width (default: the dense MLP's, hp.n_ff)."""
        width = self.hp.n_ff if width is None else width
        if width not in self._ffn:
            self._ffn[width] = block_ranges(width, self.world_size, "MLP width")
        return self._ffn[width][self.rank if rank is None else rank]

    def vocab(self, rank: int | None = None) -> tuple[int, int]:
        return self._vocab[self.rank if rank is None else rank]

    def unit_range(self, unit: str, rank: int | None = None, extent: int | None = None) -> tuple[int, int]:
        """Element range along the split axis for a split unit; `extent`: the axis's
        length, which says which MLP an "ffn" cut is of (dense, expert, shared expert)."""
        hd = self.hp.head_dim
        if unit == "q_heads":
            a, b = self.q_heads(rank)
            return a * hd, b * hd
        if unit == "kv_heads":
            a, b = self.kv_heads(rank)
            return a * hd, b * hd
        if unit == "qkv_heads":  # fused per-head q|k|v rows (GPT-NeoX)
            a, b = self.q_heads(rank)
            return 3 * a * hd, 3 * b * hd
        if unit == "ffn":
            return self.ffn(rank, extent)
        if unit == "vocab":
            return self.vocab(rank)
        raise KeyError(f"unknown split unit {unit!r}")

    # -- tensors ---------------------------------------------------------------
    def slice_of(self, ne_name: str, shape: tuple[int, ...], rank: int | None = None) -> TensorSlice:
        """This rank's part of tensor `ne_name` (numpy `shape`)."""
        rank = self.rank if rank is None else rank
        rule = self.arch.split_rule(ne_name)
        if rule.kind == "replicated":
            return TensorSlice(rule, None, 0, shape[0])
        if rule.kind == "rank0":
            return TensorSlice(rule, None, 0, shape[0], held=rank == 0)
        assert rule.axis is not None and rule.unit is not None  # a rows/cols rule (SplitRule checks)
        # A 1-D tensor split "by rows" (a bias) is cut along its only axis.
        axis = min(rule.axis, len(shape) - 1)
        start, stop = self.unit_range(rule.unit, rank, shape[axis])
        if stop > shape[axis]:
            raise SplitError(f"{ne_name}: range {start}:{stop} exceeds axis {axis} of shape {shape}")
        return TensorSlice(rule, axis, start, stop)
