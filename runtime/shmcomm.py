"""Collectives through shared memory between the MPI ranks of one host (docs/design.md §9).

A decode step's collectives carry a few KB (one row of f64 partial sums per
all-reduce, a token's logits slice, a token id); through MPICH (ch4, shared
memory) each costs ~10 µs here, and a SmolLM2 token has 62 of them. When
every rank of the world runs on one host, the ranks instead share one MPI
window (MPI_Win_allocate_shared, so MPI owns and frees the memory). Each
rank's slot holds a round counter and two payload buffers. Every rank takes
part in every round, in the same order; round s:
- publish: copy this rank's bytes into its buffer s % 2, then store s in
  its counter (release);
- once every counter reads >= s (acquire), read: an all-reduce sums the
  ranks' buffers in rank order, so every rank computes the same bits (as
  SimComm does); a gather or a broadcast reads the buffers it needs.
Two buffers suffice: a rank writes buffer s % 2 again only in round s + 2,
after every peer has published s + 1, which each does only after reading
round s. The counters are atomics written as LLVM IR through numba
intrinsics (as runtime/simd.py does), so the ordering holds on any CPU
numba targets, not only x86's.

Waits spin a bounded number of times and return False when peers are not
there yet: the caller (runtime.comm.MPIComm) keeps the deadline and yields
or naps between tries, as for MPI's own collectives. Payloads larger than a
buffer (prefill's) go through MPI.
"""
from __future__ import annotations

import platform
from typing import Any

import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

BUFFER_BYTES = 1 << 20  # per buffer: decode rows of any model (n_embd <= 131072 in f64), short prefills
_HEADER = 128  # the counter, alone on its cache lines
SPINS = 1 << 16  # counter reads (~0.1 ms) per try before the caller checks its deadline and yields


@intrinsic
def _load_acquire(typingctx, arr, i):  # arr[i] of an int64 array, an atomic acquire load
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], a, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)
    return types.int64(arr, i), codegen


@intrinsic
def _store_release(typingctx, arr, i, v):  # arr[i] = v of an int64 array, an atomic release store
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], a, [args[1]])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()
    return types.void(arr, i, v), codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _pause(typingctx):  # a spin-wait hint (x86 `pause`): a waiting rank leaves the core's pipeline to others
    def codegen(context, builder, sig, args):
        if _X86:
            fn = builder.module.globals.get("llvm.x86.sse2.pause") or \
                ir.Function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@njit(cache=True, nogil=True)
def publish(counters, stride, rank, payload, x, s):
    """payload (n,) = x (this rank's buffer s % 2), then counters[rank * stride] = s."""
    for i in range(x.shape[0]):
        payload[i] = x[i]
    _store_release(counters, rank * stride, s)


@njit(cache=True, nogil=True)
def _publish_and_sum(counters, stride, rank, payloads, x, s, spins):
    """publish then await_sum into x (one call for the common case: the peers are ready)."""
    publish(counters, stride, rank, payloads[rank], x, s)
    return await_sum(counters, stride, payloads, s, spins, x)


@njit(cache=True, nogil=True)
def await_all(counters, stride, size, s, spins):
    """True once each of the `size` ranks has published round s; False if one has not within `spins`
    reads of its counter."""
    for r in range(size):
        tries = 0
        while _load_acquire(counters, r * stride) < s:
            _pause()
            tries += 1
            if tries >= spins:
                return False
    return True


@njit(cache=True, nogil=True)
def await_sum(counters, stride, payloads, s, spins, out):
    """False if some rank has not published round s within `spins` reads of its counter; else
    out (n,) = payloads[0] + payloads[1] + ... (rank order, in their type), True."""
    if not await_all(counters, stride, payloads.shape[0], s, spins):
        return False
    n = out.shape[0]
    for i in range(n):
        out[i] = payloads[0, i]
    for r in range(1, payloads.shape[0]):
        for i in range(n):
            out[i] += payloads[r, i]
    return True


class ShmCollectives:
    """The all-reduce of the ranks of `world` (an mpi4py communicator) when they share one host.

    `open(world)` returns None when they do not (the ranks learn this together,
    so all take the same path). An all-reduce: start(x), then finish() until
    True. A gather or broadcast: post(x), arrived() until True, received(r).
    Every rank takes part in every round, in the same order."""

    def __init__(self, world: Any, node: Any, MPI: Any):
        self.rank, self.size = world.Get_rank(), world.Get_size()
        self._slot = _HEADER + 2 * BUFFER_BYTES
        self._win = MPI.Win.Allocate_shared(self.size * self._slot if self.rank == 0 else 0, 1, comm=node)
        buf, _ = self._win.Shared_query(0)
        raw = np.frombuffer(buf, dtype=np.uint8).reshape(self.size, self._slot)
        self._raw = raw
        self._counters = raw.view(np.int64).reshape(-1)  # rank r's counter at r * stride
        self._stride = self._slot // 8
        if self.rank == 0:
            self._counters[::self._stride] = 0
        node.Barrier()  # counters zeroed before anyone publishes
        self.round_box = np.zeros(1, dtype=np.int64)  # the last round started; compiled callers advance it too
        self._pending: tuple[np.ndarray, np.ndarray] | None = None
        self._views: dict[tuple[int, np.dtype, int], np.ndarray] = {}

    @classmethod
    def open(cls, world: Any, MPI: Any) -> "ShmCollectives | None":
        node = world.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            if node.Get_size() != world.Get_size():
                return None
            return cls(world, node, MPI)
        finally:
            node.Free()

    def fits(self, nbytes: int) -> bool:
        """Whether a payload of nbytes fits a buffer (larger ones go through MPI)."""
        return nbytes <= BUFFER_BYTES

    def _payloads(self, parity: int, dtype: np.dtype, n: int) -> np.ndarray:
        """Buffer `parity` of every rank as (ranks, n) values (views kept: a decode asks for one shape)."""
        key = (parity, dtype, n)
        v = self._views.get(key)
        if v is None:
            lo = _HEADER + parity * BUFFER_BYTES
            v = self._views[key] = self._raw[:, lo:lo + n * dtype.itemsize].view(dtype)
        return v

    def start(self, x: np.ndarray) -> bool:
        """Publish this rank's contiguous f32 or f64 x (x.nbytes <= BUFFER_BYTES) for the next round;
        True if the sum is already in x (as finish())."""
        s = int(self.round_box[0]) + 1
        self.round_box[0] = s
        flat = x.reshape(-1)
        payloads = self._payloads(s % 2, flat.dtype, flat.shape[0])
        if _publish_and_sum(self._counters, self._stride, self.rank, payloads, flat, s, SPINS):
            return True
        self._pending = (payloads, x)
        return False

    def fused_args(self, n: int) -> tuple[np.ndarray, int, int, np.ndarray, np.ndarray, np.ndarray]:
        """What a compiled caller (runtime/fused.py) publishes and waits with, for vectors of n f64:
        counters, their stride, this rank, both buffers of every rank as (ranks, n), the round."""
        f64 = np.dtype(np.float64)
        return (self._counters, self._stride, self.rank, self._payloads(0, f64, n), self._payloads(1, f64, n),
                self.round_box)

    def resume(self, out: np.ndarray) -> None:
        """The round a compiled caller published is to be finished here, into out (f64, contiguous)."""
        flat = out.reshape(-1)
        self._pending = (self._payloads(int(self.round_box[0]) % 2, flat.dtype, flat.shape[0]), out)

    def finish(self) -> bool:
        """True once every rank has published this round: x then holds the sum (in place)."""
        assert self._pending is not None
        payloads, x = self._pending
        if not await_sum(self._counters, self._stride, payloads, self.round_box[0], SPINS, x.reshape(-1)):
            return False
        self._pending = None
        return True

    # -- gathers and broadcasts: a round whose buffers each rank reads as it needs ---------------------

    def post(self, x: np.ndarray) -> None:
        """Publish this rank's contiguous x (x.nbytes <= BUFFER_BYTES) as the next round's bytes; then wait
        with `arrived` and read the others' with `received`."""
        s = int(self.round_box[0]) + 1
        self.round_box[0] = s
        flat = x.reshape(-1).view(np.uint8)
        publish(self._counters, self._stride, self.rank, self._payloads(s % 2, np.dtype(np.uint8), flat.shape[0])[
            self.rank], flat, s)

    def arrived(self) -> bool:
        """True once every rank has posted the current round."""
        return bool(await_all(self._counters, self._stride, self.size, self.round_box[0], SPINS))

    def received(self, rank: int, dtype: npt.DTypeLike, n: int) -> np.ndarray:
        """The first n values (of dtype) rank `rank` posted this round: a view, valid until this rank posts
        twice more."""
        return self._payloads(int(self.round_box[0]) % 2, np.dtype(dtype), n)[rank]
