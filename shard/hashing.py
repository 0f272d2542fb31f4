"""sha256 on a background thread while a shard set is written.

Each worker runs sha256 in order, so hashing overlaps reading and writing
(hashlib releases the GIL for buffers over 2 KiB); a whole file's sha256 is
netp.formats.fileio.sha256_file.

Callers hand over views of reused buffers; `fence()` after the last update
that used a buffer and `wait(fence)` before refilling it keep the worker
from hashing bytes that have already been overwritten.
"""
from __future__ import annotations

import hashlib
import queue
import threading
from typing import Any


class HashWorker:
    """One FIFO thread that runs `hasher.update(data)` jobs in submission order."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._done = 0
        self._submitted = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="netp-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            hasher, data = job
            try:
                if self._error is None:
                    hasher.update(data)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = e
            with self._cond:
                self._done += 1
                self._cond.notify_all()

    def submit(self, hasher: Any, data: Any) -> None:
        self._submitted += 1
        self._jobs.put((hasher, data))

    def fence(self) -> int:
        """A token for 'everything submitted so far'."""
        return self._submitted

    def wait(self, fence: int | None = None) -> None:
        """Block until the jobs up to `fence` (default: all) are hashed."""
        target = self._submitted if fence is None else fence
        with self._cond:
            while self._done < target:
                self._cond.wait()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def __enter__(self) -> "HashWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HashPool:
    """Two HashWorkers behind HashWorker's fence/wait interface, so the source
    and the rank files are hashed on two cores at once (one worker alone was
    the shard stage's bottleneck: sha256 runs at ~1.8 GB/s per core)."""

    def __init__(self, n: int = 2) -> None:
        self.workers = [HashWorker() for _ in range(n)]

    def fence(self) -> tuple[int, ...]:
        return tuple(w.fence() for w in self.workers)

    def wait(self, fence: tuple[int, ...] | None = None) -> None:
        for i, w in enumerate(self.workers):
            w.wait(None if fence is None else fence[i])

    def close(self) -> None:
        for w in self.workers:
            w.close()

    def __enter__(self) -> "HashPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QueuedSha256:
    """A sha256 whose updates run on a HashWorker; `hexdigest` waits for them."""

    def __init__(self, worker: HashWorker):
        self._worker = worker
        self._h = hashlib.sha256()

    def update(self, data: Any) -> None:
        self._worker.submit(self._h, data)

    def hexdigest(self) -> str:
        self._worker.wait()
        return self._h.hexdigest()
