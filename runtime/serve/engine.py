"""The ranks of a server (docs/design.md §11): rank 0 takes one request at a
time, in arrival order, from a bounded queue; every rank runs the same
forward.

Protocol. The ranks meet in rounds; each round is one all-gather in which
rank 0 says what comes next and every other rank says whether it was asked
to stop (a signal):
- ("idle",): nothing; rank 0 sends it when no request came for
  `keepalive` seconds, so a peer waiting for the next round still meets rank
  0 within its collective deadline and a lost rank 0 (or link) is noticed;
- ("generate", prompt ids, max tokens): every rank runs runtime.generate;
  rank 0 samples, and its per-token callback may stop the generation (a
  stop string, a client gone), which travels with the token;
- ("stop",): every rank leaves the loop and exits 0.
A peer's stop flag makes rank 0 finish the current generation and send
("stop",) next, as a signal to rank 0 does.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from netp.runtime.comm import Comm
from netp.runtime.generate import Generation, generate
from netp.runtime.model import RankModel
from netp.runtime.sampling import Sampler, SamplingParams
from netp.runtime.serve.text import StopText, TokenText

IDLE, GENERATE, STOP = "idle", "generate", "stop"
POLL_SECONDS = 0.1  # how often rank 0's wait for a request looks at the stop flag


@dataclass
class Text:
    text: str


@dataclass
class Done:
    gen: Generation
    stopped_by_string: bool


@dataclass
class Failed:
    """The request could not finish: the server is stopping or lost a peer."""
    status: int
    message: str
    code: str


Event = Text | Done | Failed


@dataclass
class Job:
    """One request's generation, from the HTTP side to rank 0's loop. `emit`
    is called from rank 0's loop and must be thread-safe and quick."""

    prompt: list[int]
    n_predict: int  # -1: until EOS or a full context
    sampling: SamplingParams
    stops: Sequence[str]
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # set by the HTTP side once the last event (Done or Failed) went out
    delivered: threading.Event = field(default_factory=threading.Event)
    tokens: int = 0  # generated so far

    def fail(self, status: int, message: str, code: str) -> None:
        self.emit(Failed(status, message, code))


class QueueFull(Exception):
    pass


class QueueClosed(Exception):
    pass


class JobQueue:
    """Requests waiting for the ranks, in arrival order; at most `depth` wait
    beside the one being generated (with depth 0, a request is taken only when
    the ranks are free)."""

    def __init__(self, depth: int):
        self.depth = depth
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed: str | None = None
        self._busy = False  # a job taken and not yet finished

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed is not None:
                raise QueueClosed(self._closed)
            self._waiting = collections.deque(j for j in self._waiting if not j.cancelled.is_set())
            if len(self._waiting) >= self.depth + (0 if self._busy else 1):
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--queue {self.depth})")
            self._waiting.append(job)
            self._cond.notify()

    def take(self, timeout: float, stopping: threading.Event) -> Job | None:
        """The next job not cancelled, waiting up to `timeout` seconds; None when none came
        or `stopping` is set."""
        waited = 0.0
        with self._cond:
            while not stopping.is_set():
                while self._waiting:
                    job = self._waiting.popleft()
                    if not job.cancelled.is_set():
                        self._busy = True
                        return job
                if waited >= timeout:
                    break
                step = min(POLL_SECONDS, timeout - waited)
                self._cond.wait(step)
                waited += step
        return None

    def finished(self) -> None:
        """The job last taken is done: the ranks are free."""
        with self._cond:
            self._busy = False

    def close(self, reason: str) -> list[Job]:
        """Refuse new jobs from now on; returns those still waiting."""
        with self._cond:
            self._closed = reason
            left = [j for j in self._waiting if not j.cancelled.is_set()]
            self._waiting.clear()
            return left


class Engine:
    """Rank 0's side of the loop: the queue, the job being generated, the stop flags."""

    def __init__(self, queue: JobQueue, stopping: threading.Event, hurry: threading.Event, keepalive: float):
        self.queue, self.stopping, self.hurry, self.keepalive = queue, stopping, hurry, keepalive
        self.current: Job | None = None
        self.failed: str | None = None

    def next_command(self) -> tuple[tuple[Any, ...], Job | None]:
        job = self.queue.take(self.keepalive, self.stopping)
        if job is not None:
            return (GENERATE, job.prompt, job.n_predict), job
        return ((STOP,) if self.stopping.is_set() else (IDLE,)), None

    def run_job(self, model: RankModel, job: Job) -> None:
        text = TokenText(model.source.reader.vocab, model.hp.eos_token_id)
        stop = StopText(job.stops)

        def on_token(token: int) -> bool:
            job.tokens += 1
            if job.cancelled.is_set() or self.hurry.is_set():
                return True
            piece = stop.add(text.add(token))
            if piece:
                job.emit(Text(piece))
            return stop.hit

        self.current = job
        try:
            gen = generate(model, job.prompt, job.n_predict, Sampler(job.sampling), on_token)
        finally:
            self.current = None
            self.queue.finished()
        if job.cancelled.is_set():
            return
        if self.hurry.is_set() and gen.stop == "caller" and not stop.hit:
            job.fail(503, "the server is shutting down", "shutting_down")
            return
        rest = stop.add(text.finish()) + stop.finish()
        if rest:
            job.emit(Text(rest))
        job.emit(Done(gen, stop.hit))

    def close(self, status: int, message: str, code: str) -> list[Job]:
        """Fail every waiting job (and the current one); returns them."""
        jobs = self.queue.close(message)
        if self.current is not None:
            jobs.append(self.current)
        for job in jobs:
            job.fail(status, message, code)
        return jobs

    def lost_peer(self, reason: str) -> None:
        """MPIComm.on_lost: answer every client before this rank ends (bounded wait)."""
        self.failed = reason
        self.stopping.set()
        jobs = self.close(500, f"the server lost a rank: {reason}", "rank_lost")
        for job in jobs:
            job.delivered.wait(2.0 / max(len(jobs), 1))


def serve_loop(comm: Comm, model: RankModel, engine: Engine | None, stop_asked: threading.Event) -> None:
    """Every rank: rounds until rank 0 says stop. engine: rank 0's, None elsewhere."""
    while True:
        job = None
        if comm.is_root:
            assert engine is not None
            command, job = engine.next_command()
            said = comm.allgather(command, patient=True)
            if any(said[1:]):
                engine.stopping.set()  # a peer was told to stop: finish this round, then stop
        else:
            said = comm.allgather(stop_asked.is_set(), patient=True)
        command = said[0]
        if command[0] == STOP:
            if engine is not None:
                engine.close(503, "the server is shutting down", "shutting_down")
            return
        if command[0] == GENERATE:
            if engine is not None:
                assert job is not None
                engine.run_job(model, job)
            else:
                generate(model, command[1], command[2], None)


def warm_up(comm: Comm, model: RankModel) -> Generation:
    """One token from a one-token prompt on every rank: the first forward (and its collectives) before
    the first request, after which collectives run under the short deadline."""
    token = model.hp.bos_token_id if 0 <= model.hp.bos_token_id < model.hp.n_vocab else 0
    sampler = Sampler(SamplingParams(top_k=1)) if comm.is_root else None
    return generate(model, [token], 1, sampler)
