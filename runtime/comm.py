"""The communicator a rank-local forward talks to, with three back ends.

- `MPIComm`: one rank of `mpiexec -n N` (mpi4py on COMM_WORLD).
- `SimWorld`: N ranks as N threads of one process. Collectives meet at a
  barrier and combine the ranks' values in rank order (all-reduce sums
  rank 0 + rank 1 + ..., gather concatenates in rank order), so a
  simulated run computes exactly what its ranks would.
- `SoloComm`: one rank, every collective the identity.

`run_world(fn, n, comm)` runs fn(comm) on every rank of whichever applies:
the MPI world it was launched in (comm), else n simulated ranks.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn, Sequence

import numpy as np

from netp.errors import NetpError, error_line
from netp.hostenv import launched_under_mpi
from netp.runtime.rollcall import RollCall

if TYPE_CHECKING:
    from netp.runtime.shmcomm import ShmCollectives


# Deadlines of MPI collectives (docs/design.md §9): --timeout after the
# first forward; before it (loading, numba's first compile) STARTUP_FACTOR
# times as long, at least STARTUP_FLOOR seconds.
DEFAULT_TIMEOUT = 30.0
STARTUP_FACTOR, STARTUP_FLOOR = 10.0, 120.0
# Polling a collective: Test and yield the core for SPIN_SECONDS (as MPICH's
# blocking calls spin, MPIR_CVAR_POLLS_BEFORE_YIELD), then sleep, doubling from NAP_FIRST to NAP_MAX.
SPIN_SECONDS, NAP_FIRST, NAP_MAX = 0.02, 1e-4, 2e-3
PATIENT_NAP_MAX = 0.01  # a wait expected to be long (a server's ranks between requests) naps up to this
ROLL_CALL_SECONDS = 2.0  # a rank giving up listens this long for the peers still alive
ABORT_GRACE = 5  # seconds MPI_Abort may take before the rank ends itself
BCAST_HEAD = 256  # bytes of a broadcast's first message
SHARED_MEMORY_ENV = "NETP_SHARED_MEMORY"  # "0": collectives go through MPI even between ranks of one host


class PeerFailed(SystemExit):
    """Another rank failed and said so; this one exits non-zero without a second message.
    input_error: the other rank's failure was a NetpError (a bad input), so a command whose
    exit status tells bad input apart (verify, perplexity: 2) exits as that rank does."""

    def __init__(self, input_error: bool = False) -> None:
        super().__init__(1)
        self.input_error = input_error


@dataclass
class Traffic:
    """Payload bytes this rank has sent: the all-reduce vectors it
    contributed and the logits slices it gathered to rank 0. (On the wire an
    all-reduce moves a multiple of its vector that depends on MPI's
    algorithm, e.g. once per round of recursive doubling.)"""

    allreduce: int = 0
    gather: int = 0

    def since(self, before: "Traffic") -> "Traffic":
        return Traffic(self.allreduce - before.allreduce, self.gather - before.gather)


class Comm:
    """What every back end offers. Arrays are float32."""

    rank: int = 0
    size: int = 1
    kind: str = "single"  # "mpi", "simulated" or "single"
    traffic: Traffic
    shm: "ShmCollectives | None" = None  # collectives through shared memory (MPI ranks of one host)

    def __init__(self) -> None:
        self.traffic = Traffic()

    def warm(self) -> None:
        """The first forward has run: collectives from now on get the short deadline (MPI only)."""

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        """Sum of x over ranks, as f32 (may reuse x's memory). Partials may come in f64 (the block
        kernels' column-split slices, see runtime/kernels.py): the sum is then rounded to f32 once."""
        return np.asarray(x, dtype=np.float32)

    def wait_shm(self, out: np.ndarray) -> None:
        """Finish, under this communicator's deadline, the shared-memory round a compiled caller started
        (runtime/fused.py), its sum into out (f64)."""
        raise NotImplementedError

    def gather_cols(self, x: np.ndarray, widths: Sequence[int]) -> np.ndarray | None:
        """Concatenate every rank's (T, widths[r]) along the last axis on rank 0; None elsewhere."""
        return x

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather(self, obj: Any, patient: bool = False) -> list[Any]:
        """Every rank's obj, in rank order. patient: a long wait is expected (a server's
        ranks waiting for the next request): sleep while waiting rather than spin."""
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
        reports = self.allgather(None if error is None else (str(error), isinstance(error, NetpError)))
        failed = [r for r in reports if r is not None]
        if error is not None:
            if str(error) in [r[0] for r in reports[: self.rank] if r is not None]:
                raise PeerFailed(isinstance(error, NetpError)) from None
            error.netp_agreed = True  # type: ignore[attr-defined]  # every rank knows: no MPI Abort needed
            raise error
        if failed:
            raise PeerFailed(failed[0][1])


class SoloComm(Comm):
    pass


# -- MPI ----------------------------------------------------------------------

class MPIComm(Comm):
    """One rank of an MPI world whose every collective runs under a deadline.

    Each collective is started nonblocking and polled (docs/design.md §9): a
    peer that died or lost its link would otherwise leave every other rank
    blocked in MPI forever (measured: 590 s until killed). Until the first
    forward has run, collectives wait for `startup_timeout` (the ranks load
    their files and numba may compile); after it, `timeout`. A collective
    that does not complete in time, or fails, ends this rank: see `_lost`.
    """

    kind = "mpi"

    def __init__(self, timeout: float | None = DEFAULT_TIMEOUT, prog: str = "netp") -> None:
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise NetpError(None, "launched under MPI but mpi4py is not installed "
                                  "(pip install 'netp[mpi]' gives mpi4py and mpich)") from e
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        super().__init__()
        self.prog = prog
        self.timeout = timeout if timeout else None
        self.startup_timeout = None if self.timeout is None else max(STARTUP_FACTOR * self.timeout, STARTUP_FLOOR)
        self.warmed = False
        # Called with the one-line reason before a rank that lost a peer ends (a server answers
        # its clients first); it must return soon.
        self.on_lost: Callable[[str], None] | None = None
        self.rollcall: RollCall | None = None
        # All ranks on one host: collectives go through shared memory (docs/design.md §9).
        if self.size > 1 and os.environ.get(SHARED_MEMORY_ENV, "1") != "0":
            from netp.runtime.shmcomm import ShmCollectives  # numba: imported by ranks only

            shm = None
            with contextlib.suppress(MPI.Exception):  # an MPI without shared windows: MPI's own collectives
                shm = ShmCollectives.open(self.comm, MPI)
            self.shm = shm if all(self.allgather(shm is not None)) else None  # every rank takes the same path
        if self.size > 2:  # of two ranks the silent one is known without asking
            with contextlib.suppress(OSError):
                self.rollcall = RollCall()
            cards = self.allgather(None if self.rollcall is None else self.rollcall.card)
            if self.rollcall is not None:
                if any(c is None for c in cards):
                    self.rollcall.close()
                    self.rollcall = None
                else:
                    self.rollcall.join(self.rank, cards)

    def warm(self) -> None:
        self.warmed = True

    def _wait(self, done: Callable[[], bool], what: str, idle: bool = False, patient: bool = False) -> None:
        """Poll done() (a request's Test) until True: spin yielding the core while a peer
        is likely to answer soon (within one layer's work), then sleep with
        backoff so a long wait leaves the core to the ranks it waits for.
        idle: some ranks do long work first (the startup deadline, no spin);
        patient: a long wait under the usual deadline (no spin, longer naps)."""
        limit = self.startup_timeout if idle or not self.warmed else self.timeout
        start = time.monotonic()
        spin_until = start + (0.0 if idle or patient else SPIN_SECONDS)
        nap, nap_max = NAP_FIRST, PATIENT_NAP_MAX if patient else NAP_MAX
        try:
            while not done():
                now = time.monotonic()
                if limit is not None and now - start > limit:
                    self._lost(what, f"not complete after {limit:g} s (--timeout)")
                if now < spin_until:
                    os.sched_yield()
                else:
                    time.sleep(nap)
                    nap = min(nap * 2, nap_max)
        except self.MPI.Exception as e:
            self._lost(what, f"failed: {e.Get_error_string().strip()}")

    def _lost(self, what: str, why: str) -> NoReturn:
        """This rank gives up on a collective: name the peers not heard
        from, print one line, exit non-zero at once. os._exit, not an
        exception: MPI_Finalize would wait for the lost peer too. Among the
        ranks still in touch, only the lowest prints, and it aborts the job."""
        silent, heard = self._roll_call()
        who = ("rank " if len(silent) == 1 else "ranks ") + ", ".join(map(str, silent)) if silent else "a peer"
        msg = f"lost contact with {who}: {what} {why}; this rank gives up"
        if self.on_lost is not None:
            with contextlib.suppress(Exception):
                self.on_lost(msg)
        if not any(r < self.rank for r in heard):
            print(error_line(self.prog, NetpError(None, msg)), file=sys.stderr, flush=True)
            sys.stdout.flush()
            # Abort makes mpiexec end the job and return at once; without it
            # mpiexec waits forever for an unreachable host's proxy (measured).
            # Should Abort itself stall, SIGALRM's default action ends us.
            signal.alarm(ABORT_GRACE)
            time.sleep(0.5)  # as in abort(): the launcher drops output still in its pipes when it kills
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # MPICH's own abort banner: the line above says it
            self.comm.Abort(1)
        sys.stdout.flush()
        os._exit(1)

    def _roll_call(self) -> tuple[list[int], set[int]]:
        """Best effort: every rank that gives up tells every other one so (over
        runtime/rollcall.py's UDP side channel, never MPI: sending to a peer that
        died crashed MPICH's UCX layer, SIGSEGV) and listens for ROLL_CALL_SECONDS;
        those it heard from are alive. Of two ranks the silent one is known."""
        if self.size == 2:
            return [1 - self.rank], set()
        heard = self.rollcall.call(self.rank, ROLL_CALL_SECONDS) if self.rollcall is not None else set()
        return [r for r in range(self.size) if r != self.rank and r not in heard], heard

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)
        self.traffic.allreduce += x.nbytes
        if self.shm is not None and self.shm.fits(x.nbytes):  # ranks of one host (runtime/shmcomm.py)
            if not self.shm.start(x):
                self._wait(self.shm.finish, "all-reduce")
        else:
            self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, x, op=self.MPI.SUM).Test, "all-reduce")
        return x.astype(np.float32, copy=False)

    def wait_shm(self, out: np.ndarray) -> None:
        assert self.shm is not None
        self.shm.resume(out)
        self._wait(self.shm.finish, "all-reduce")

    def gather_cols(self, x: np.ndarray, widths: Sequence[int]) -> np.ndarray | None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows = x.shape[0]
        if self.shm is not None and self.shm.fits(rows * max(widths) * 4):  # a token's logits
            self.shm.post(x)
            self._wait(self.shm.arrived, "gather of the logits")
            if self.rank != 0:
                self.traffic.gather += x.nbytes
                return None
            return np.concatenate([self.shm.received(r, np.float32, rows * w).reshape(rows, w)
                                   for r, w in enumerate(widths)], axis=1)
        if self.rank != 0:
            self.traffic.gather += x.nbytes
            self._wait(self.comm.Igatherv(x, None, root=0).Test, "gather of the logits")
            return None
        counts = [rows * w for w in widths]
        flat = np.empty(sum(counts), dtype=np.float32)
        self._wait(self.comm.Igatherv(x, [flat, counts, self.MPI.FLOAT], root=0).Test, "gather of the logits")
        parts, at = [], 0
        for w in widths:  # rank r's block is its (rows, w) slice
            parts.append(flat[at:at + rows * w].reshape(rows, w))
            at += rows * w
        return np.concatenate(parts, axis=1)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        if self.shm is not None:  # the pickle through shared memory when it fits (a token id does)
            data = pickle.dumps(obj) if self.rank == root else b""
            fits = self.shm.fits(8 + len(data))
            self.shm.post(np.frombuffer((len(data) if fits else -1).to_bytes(8, "little", signed=True) +
                                        (data if fits else b""), dtype=np.uint8))
            self._wait(self.shm.arrived, "broadcast")
            n = int(self.shm.received(root, np.int64, 1)[0])
            if n >= 0:  # (the root too reads a copy, as from MPI)
                return pickle.loads(self.shm.received(root, np.uint8, 8 + n)[8:].tobytes())
        # One fixed-size broadcast carries the pickle when it fits (a token
        # id does), a second one the rest.
        head = np.zeros(BCAST_HEAD, dtype=np.uint8)
        data = b""
        if self.rank == root:
            data = pickle.dumps(obj)
            head[:8] = np.frombuffer(len(data).to_bytes(8, "little"), dtype=np.uint8)
            first = data[:BCAST_HEAD - 8]
            head[8:8 + len(first)] = np.frombuffer(first, dtype=np.uint8)
        self._wait(self.comm.Ibcast(head, root=root).Test, "broadcast")
        n = int.from_bytes(head[:8].tobytes(), "little")
        if n <= BCAST_HEAD - 8:
            return pickle.loads(head[8:8 + n].tobytes())
        rest = np.empty(n - (BCAST_HEAD - 8), dtype=np.uint8)
        if self.rank == root:
            rest[:] = np.frombuffer(data[BCAST_HEAD - 8:], dtype=np.uint8)
        self._wait(self.comm.Ibcast(rest, root=root).Test, "broadcast")
        return pickle.loads(head[8:].tobytes() + rest.tobytes())

    def allgather(self, obj: Any, patient: bool = False) -> list[Any]:
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        sizes = np.zeros(self.size, dtype=np.int64)
        self._wait(self.comm.Iallgather(np.array([data.size], dtype=np.int64), sizes).Test, "all-gather",
                   patient=patient)
        flat = np.empty(int(sizes.sum()), dtype=np.uint8)
        self._wait(self.comm.Iallgatherv(data, [flat, sizes.tolist(), self.MPI.BYTE]).Test, "all-gather")
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return [pickle.loads(flat[a:b].tobytes()) for a, b in zip(bounds[:-1], bounds[1:])]

    def idle_barrier(self) -> None:
        self._wait(self.comm.Ibarrier().Test, "wait for the ranks doing rank-0-only work", idle=True)

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
        super().__init__()
        self.world, self.rank, self.size = world, rank, world.size

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        self.traffic.allreduce += x.nbytes  # what this rank would send under MPI
        return self.world.exchange(self.rank, x, _sum_in_rank_order).astype(np.float32)

    def gather_cols(self, x: np.ndarray, widths: Sequence[int]) -> np.ndarray | None:
        if self.rank != 0:
            self.traffic.gather += x.nbytes
        full = self.world.exchange(self.rank, x, lambda parts: np.concatenate(parts, axis=-1))
        return full if self.rank == 0 else None

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.world.exchange(self.rank, obj, lambda objs: objs[root])

    def allgather(self, obj: Any, patient: bool = False) -> list[Any]:
        return list(self.world.exchange(self.rank, obj, list))

    def barrier(self) -> None:
        self.world.exchange(self.rank, None, lambda _: None)


# -- entry -----------------------------------------------------------------------

def mpi_world(timeout: float | None = DEFAULT_TIMEOUT, prog: str = "netp") -> MPIComm | None:
    """This process's MPI rank when launched under mpiexec, else None.
    timeout: each collective's deadline after the first forward (None or 0: none)."""
    return MPIComm(timeout, prog) if launched_under_mpi() else None


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
