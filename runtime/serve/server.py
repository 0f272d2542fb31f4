"""`netp serve`: an OpenAI-compatible HTTP server on rank 0, the other ranks
following (docs/design.md §11).

Launched under mpiexec each process is one rank; launched plainly, a shard
set's ranks are simulated in one process, as `run` does. Every rank loads
its weights and warms the kernels once; rank 0 then serves HTTP while all
ranks meet in rounds (runtime/serve/engine.py). SIGTERM or Ctrl-C: the
generation under way finishes, every rank exits 0; a second signal stops
it at its next token.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netp.errors import NetpError
from netp.runtime.comm import DEFAULT_TIMEOUT, Comm, MPIComm, mpi_world, run_world
from netp.runtime.model import RankModel, load_rank_model
from netp.runtime.sources import source_world_size, tokenizer_dir

KEEPALIVE_FRACTION = 0.25  # rank 0 meets the peers at least this often, in units of --timeout
KEEPALIVE_MAX = 10.0  # seconds, also without a deadline
MIN_CTX = 2  # a one-token prompt and one generated token


@dataclass(frozen=True)
class ServeOptions:
    model: Path
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    n_ctx: int = 2048
    queue: int = 16
    threads: int = 1
    use_mmap: bool = True
    timeout: float | None = DEFAULT_TIMEOUT

    @property
    def name(self) -> str:
        """The model id clients name: the shard set's folder or the NE file's name."""
        return Path(self.model).resolve().name or str(self.model)

    @property
    def keepalive(self) -> float:
        return min(self.timeout * KEEPALIVE_FRACTION, KEEPALIVE_MAX) if self.timeout else KEEPALIVE_MAX


def check_installed() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise NetpError(None, f"netp serve needs {' and '.join(missing)}: pip install 'netp[serve]'")


def _load_text_side(opts: ServeOptions) -> tuple[Any, Any]:
    """Rank 0's tokenizer and chat template (None when the folder has no template)."""
    from netp.runtime.run import load_tokenizer
    from netp.runtime.serve.text import load_chat_template

    if tokenizer_dir(opts.model) is None:
        raise NetpError(opts.model, "has no tokenizer folder; the server needs one to read prompts")
    return load_tokenizer(opts.model), load_chat_template(opts.model)


class Signals:
    """SIGTERM / SIGINT: the first asks to stop after the current generation, the second at once."""

    def __init__(self, prog: str, rank0: bool):
        self.stopping, self.hurry = threading.Event(), threading.Event()
        self.prog, self.rank0 = prog, rank0
        self.asked = threading.Event()  # a signal came to this process (what a peer tells rank 0)

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.asked.is_set():
            self.hurry.set()
            if self.rank0:
                print(f"{self.prog}: stopping now", file=sys.stderr, flush=True)
        else:
            if self.rank0:
                print(f"{self.prog}: stopping after the current request ({signal.Signals(signum).name}; "
                      f"again: at once)", file=sys.stderr, flush=True)
        self.asked.set()
        self.stopping.set()


def _rank_main(comm: Comm, opts: ServeOptions, signals: Signals, prog: str) -> int:
    from netp.runtime.serve.engine import Engine, JobQueue, serve_loop, warm_up

    t0 = time.perf_counter()
    sock = tokenizer = chat = None
    with comm.agreeing():
        if comm.is_root:
            from netp.runtime.serve.http import listen

            sock = listen(opts.host, opts.port)
            tokenizer, chat = _load_text_side(opts)
        try:
            if opts.n_ctx < MIN_CTX:
                raise NetpError(None, f"-c {opts.n_ctx}: the context must hold at least {MIN_CTX} tokens")
            model: RankModel = load_rank_model(opts.model, comm, opts.n_ctx, use_mmap=opts.use_mmap,
                                               nthread=opts.threads)
        except BaseException:
            if sock is not None:
                sock.close()
            raise
    warm_up(comm, model)
    load_s = time.perf_counter() - t0
    warm = comm.allgather(model.weights.kernels)
    try:
        if not comm.is_root:
            serve_loop(comm, model, None, signals.asked)
            return 0
        from netp.runtime.serve.http import HttpThread, ServedModel, ServerState, make_app

        assert sock is not None
        queue = JobQueue(opts.queue)
        engine = Engine(queue, signals.stopping, signals.hurry, opts.keepalive)
        if isinstance(comm, MPIComm):
            comm.on_lost = engine.lost_peer
        served = ServedModel(opts.name, opts.n_ctx, model.hp.n_vocab, tokenizer, chat, int(time.time()))
        state = ServerState(served, queue, signals.stopping, opts.api_key, prog, lambda: engine.failed)
        http = HttpThread(make_app(state), sock)
        http.start()
        host, port = sock.getsockname()[:2]
        kernels = [w for w in warm if w is not None]
        started = max(kernels, key=lambda w: (w.compiled, w.seconds)) if kernels else None
        kern = "" if started is None else \
            f", kernels {'compiled' if started.compiled else 'loaded'} in {started.seconds:.1f} s"
        state.log(f"serving {served.name} on http://{host}:{port}/v1 ({comm.describe()} x {opts.threads} "
                  f"thread(s), context {opts.n_ctx}, queue {opts.queue}, "
                  f"chat template {'yes' if chat is not None else 'none'}; loaded in {load_s:.1f} s{kern})")
        try:
            serve_loop(comm, model, engine, signals.asked)
        finally:
            http.stop()
        state.log("stopped")
        return 0
    finally:
        model.close()


def serve(opts: ServeOptions, prog: str = "netp serve", debug: bool = False) -> int:
    check_installed()
    if opts.queue < 0:
        raise NetpError(None, f"--queue {opts.queue}: must be 0 or more")
    comm = mpi_world(opts.timeout, prog)
    size = comm.size if comm is not None else (source_world_size(opts.model) or 1)
    signals = Signals(prog, rank0=comm is None or comm.rank == 0)
    signals.install()
    return run_world(lambda c: _rank_main(c, opts, signals, prog), size, comm, prog, debug)
