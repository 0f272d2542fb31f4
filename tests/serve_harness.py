"""A `netp serve` process for tests: started on a free port of 127.0.0.1,
read until it says where it listens, always stopped (SIGTERM, then SIGKILL
of every process it started, the MPI ranks included)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

BIN = Path(sys.executable).parent
LISTENING = re.compile(r"serving \S+ on (http://[^/\s]+)/v1 ")


def descendants(pid: int) -> list[int]:
    """Every process below pid (the MPI ranks sit in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class Server:
    """`[mpiexec -n N] netp serve MODEL --port 0 ...`; `url` once it listens."""

    def __init__(self, model: Path, args: Sequence[str] = (), mpi: int | None = 2,
                 mpi_options: Sequence[str] = (), start_limit: float = 300):
        cmd = [str(BIN / "netp"), "serve", str(model), "--port", "0", "-t", "1", *args]
        if mpi:
            cmd = [str(BIN / "mpiexec"), *mpi_options, "-n", str(mpi), *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = ""
        try:
            self.url = self._wait_listening(start_limit)
        except BaseException:
            self.kill()
            raise

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _wait_listening(self, limit: float) -> str:
        until = time.monotonic() + limit
        while time.monotonic() < until:
            for line in self.lines:
                m = LISTENING.search(line)
                if m:
                    return m.group(1)
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise AssertionError(f"netp serve exited {self.proc.returncode}:\n" + "\n".join(self.lines))
            time.sleep(0.05)
        raise AssertionError("netp serve did not listen within the limit:\n" + "\n".join(self.lines))

    @property
    def base(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, pattern: str, limit: float = 30) -> re.Match:
        until = time.monotonic() + limit
        while time.monotonic() < until:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log()}")

    def ranks(self) -> dict[int, int]:
        """{rank: pid} of the MPI ranks (hydra tells each its rank in PMI_RANK)."""
        out = {}
        for p in descendants(self.proc.pid):
            try:
                env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            rank = [e.split(b"=", 1)[1] for e in env if e.startswith(b"PMI_RANK=")]
            if rank and b"netp" in cmd and b"hydra" not in cmd:
                out[int(rank[0])] = p
        return out

    def stop(self, limit: float = 60) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(limit)
        finally:
            self.kill()

    def kill(self) -> None:
        """Every process the server started, then the server."""
        for pid in descendants(self.proc.pid) + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(5)
