"""The communicator a rank-local forward talks to, with three back ends.

- `MPIComm`: one rank of `mpiexec -n N` (mpi4py on COMM_WORLD).
- `SimWorld`: N ranks as N threads of one process. Collectives meet at a
  barrier and combine the ranks' values in rank order (all-reduce sums
  rank 0 + rank 1 + ..., gather concatenates in rank order), so a
  simulated run computes exactly what its ranks would.
- `SoloComm`: one rank, every collective the identity.

`run_world(n, fn)` runs fn(comm) on every rank of whichever applies:
the MPI world it was launched in, else n simulated ranks.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from netp.errors import NetpError, error_line
from netp.hostenv import launched_under_mpi

class PeerFailed(SystemExit):
    """Another rank failed and said so; this one exits non-zero without a second message."""

    def __init__(self) -> None:
        super().__init__(1)


class Comm:
    """What every back end offers. Arrays are float32."""

    rank: int = 0
    size: int = 1
    kind: str = "single"  # "mpi", "simulated" or "single"

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        """Sum of x over ranks, as f32 (may reuse x's memory). Partials may come in f64 (the block
        kernels' column-split slices, see runtime/kernels.py): the sum is then rounded to f32 once."""
        return np.asarray(x, dtype=np.float32)

    def gather_cols(self, x: np.ndarray, widths: Sequence[int]) -> np.ndarray | None:
        """Concatenate every rank's (T, widths[r]) along the last axis on rank 0; None elsewhere."""
        return x

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    def idle_barrier(self) -> None:
        """A barrier that sleeps while it waits (MPI's blocking calls spin a core)."""
        self.barrier()

    def describe(self) -> str:
        return {"mpi": f"{self.size} MPI ranks", "simulated": f"{self.size} ranks simulated in one process",
                "single": "1 rank"}[self.kind]

    @contextlib.contextmanager
    def agreeing(self, idle: bool = False) -> Iterator[None]:
        """Run a block that may fail on some ranks only (loading a rank file):
        afterwards every rank learns whether any failed. A rank that failed
        raises its own error; the others raise PeerFailed. An error every
        rank hit alike (a world size mismatch) is reported by the lowest rank
        only, so the user reads one line. idle: the block is long work on
        some ranks only; the others wait without spinning a core."""
        error: BaseException | None = None
        try:
            yield
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - reported below, on every rank
            error = e
        if idle:
            self.idle_barrier()
        messages = self.allgather(None if error is None else str(error))
        if error is not None:
            if str(error) in messages[: self.rank]:
                raise PeerFailed() from None
            error.netp_agreed = True  # type: ignore[attr-defined]  # every rank knows: no MPI Abort needed
            raise error
        if any(m is not None for m in messages):
            raise PeerFailed()


class SoloComm(Comm):
    pass


# -- MPI ----------------------------------------------------------------------

class MPIComm(Comm):
    kind = "mpi"

    def __init__(self) -> None:
        # MPICH busy-waits inside collectives. Where ranks share cores with
        # other work (or more ranks than cores run), a spinning rank starves
        # the peer it waits for; yielding every few polls keeps latency at a
        # few microseconds when cores are free and avoids that when not.
        os.environ.setdefault("MPIR_CVAR_POLLS_BEFORE_YIELD", "10")
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise NetpError(None, "launched under MPI but mpi4py is not installed "
                                  "(pip install 'netp[mpi]' gives mpi4py and mpich)") from e
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)
        self.comm.Allreduce(self.MPI.IN_PLACE, x, op=self.MPI.SUM)
        return x.astype(np.float32, copy=False)

    def gather_cols(self, x: np.ndarray, widths: Sequence[int]) -> np.ndarray | None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows = x.shape[0]
        if self.rank != 0:
            self.comm.Gatherv(x, None, root=0)
            return None
        counts = [rows * w for w in widths]
        flat = np.empty(sum(counts), dtype=np.float32)
        self.comm.Gatherv(x, [flat, counts, self.MPI.FLOAT], root=0)
        parts, at = [], 0
        for w in widths:  # rank r's block is its (rows, w) slice
            parts.append(flat[at:at + rows * w].reshape(rows, w))
            at += rows * w
        return np.concatenate(parts, axis=1)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    def idle_barrier(self) -> None:
        req = self.comm.Ibarrier()
        while not req.Test():
            time.sleep(0.002)

    def abort(self, code: int = 1) -> None:
        # The launcher kills every rank on Abort and may drop output still in
        # its pipes: give our one-line error a moment to reach the user first.
        sys.stderr.flush()
        time.sleep(0.5)
        # MPICH prints its own "application called MPI_Abort" line on this rank's stderr:
        # one failure is one line (docs/design.md §8), so stderr goes to /dev/null first.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        self.comm.Abort(code)
        os._exit(code)  # Abort may return before the launcher kills us: never report twice


# -- simulated ranks ------------------------------------------------------------

class SimWorld:
    """N ranks as threads; collectives meet at a barrier and combine in rank order."""

    def __init__(self, size: int, timeout: float | None = None):
        self.size = size
        self._slots: list[Any] = [None] * size
        self._op: Callable[[list[Any]], Any] | None = None
        self._result: Any = None
        # Two barriers per collective: all deposited (the last arrival combines), all read.
        self._deposited = threading.Barrier(size, action=self._combine, timeout=timeout)
        self._read = threading.Barrier(size, timeout=timeout)

    def _combine(self) -> None:
        assert self._op is not None
        self._result = self._op(self._slots)

    def exchange(self, rank: int, value: Any, op: Callable[[list[Any]], Any]) -> Any:
        self._slots[rank] = value
        self._op = op  # every rank passes the same operation
        self._deposited.wait()
        result = self._result
        self._read.wait()
        return result

    def abort(self) -> None:
        self._deposited.abort()
        self._read.abort()

    def run(self, fn: Callable[["SimComm"], Any]) -> list[Any]:
        """fn(comm) on every rank, each in its own thread; results in rank order.

        A rank's error breaks the barriers so no rank waits forever; the
        lowest rank's own error is raised (never a BrokenBarrierError of a
        rank that only waited for it)."""
        results: list[Any] = [None] * self.size
        errors: list[BaseException | None] = [None] * self.size

        def target(rank: int) -> None:
            try:
                results[rank] = fn(SimComm(self, rank))
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                errors[rank] = e
                # An error the ranks agreed on is raised after a completed
                # collective: no peer waits for this rank, and breaking the
                # barriers now could hit a peer still leaving that collective.
                if not isinstance(e, PeerFailed) and not getattr(e, "netp_agreed", False):
                    self.abort()

        threads = [threading.Thread(target=target, args=(r,), name=f"netp-rank-{r}", daemon=True)
                   for r in range(self.size)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except KeyboardInterrupt:
            self.abort()
            raise
        real = [(r, e) for r, e in enumerate(errors)
                if e is not None and not isinstance(e, (threading.BrokenBarrierError, PeerFailed))]
        if real:
            rank, e = real[0]
            if isinstance(e, NetpError):
                raise NetpError(e.path, f"{e.message} (rank {rank} of {self.size}, simulated)") from e
            raise e
        failed = [e for e in errors if e is not None]
        if failed:
            raise failed[0]
        return results


def _sum_in_rank_order(values: list[np.ndarray]) -> np.ndarray:
    total = np.array(values[0], dtype=np.result_type(np.float32, *values), copy=True)  # f64 partials stay f64
    for v in values[1:]:
        total += v
    return total


class SimComm(Comm):
    kind = "simulated"

    def __init__(self, world: SimWorld, rank: int):
        self.world, self.rank, self.size = world, rank, world.size

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        return self.world.exchange(self.rank, x, _sum_in_rank_order).astype(np.float32)

    def gather_cols(self, x: np.ndarray, widths: Sequence[int]) -> np.ndarray | None:
        full = self.world.exchange(self.rank, x, lambda parts: np.concatenate(parts, axis=-1))
        return full if self.rank == 0 else None

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.world.exchange(self.rank, obj, lambda objs: objs[root])

    def allgather(self, obj: Any) -> list[Any]:
        return list(self.world.exchange(self.rank, obj, list))

    def barrier(self) -> None:
        self.world.exchange(self.rank, None, lambda _: None)


# -- entry -----------------------------------------------------------------------

def mpi_world() -> MPIComm | None:
    """This process's MPI rank when launched under mpiexec, else None."""
    return MPIComm() if launched_under_mpi() else None


def run_world(fn: Callable[[Comm], Any], simulated_size: int = 1, comm: Comm | None = None,
              prog: str = "netp", debug: bool = False) -> Any:
    """Run fn(comm) on every rank; returns rank 0's result (this rank's under MPI).

    Under MPI (comm given), an error on one rank after the ranks agreed to
    start cannot be announced to peers blocked in a collective, so it ends
    the job: the rank prints its one-line error and calls MPI Abort, and
    mpiexec stops every rank (no hang).
    """
    if isinstance(comm, MPIComm):
        try:
            return fn(comm)
        except SystemExit:
            raise
        except BaseException as e:  # noqa: BLE001
            if comm.size == 1 or getattr(e, "netp_agreed", False):
                raise
            if debug:
                import traceback

                traceback.print_exception(e, file=sys.stderr)
            print(error_line(prog, e), file=sys.stderr, flush=True)
            sys.stdout.flush()
            comm.abort(1)
            raise
    if comm is not None:
        return fn(comm)
    if simulated_size == 1:
        return fn(SoloComm())
    return SimWorld(simulated_size).run(fn)[0]
