"""Several hosts on one machine, for tests (docs/design.md §9).

Each host is a network namespace with its own UTS namespace (its own host
name, so MPICH talks TCP to it, not shared memory) and its own mount
namespace, in which a common folder path shows only that host's files: its
rank file, manifest.json and tokenizer/. The hosts hang on a bridge that
lives in a namespace of its own ("switch"), reached through veth pairs, so
nothing is added to the machine's own network: every address (10.231.0.x)
exists only inside namespaces made here. mpiexec runs in a launcher
namespace and starts one hydra proxy per host through
`-launcher ssh -launcher-exec ssh.sh`; ssh.sh receives `-x HOST COMMAND...`
as ssh would and runs the command inside HOST's namespaces. A hosts file,
bind-mounted over /etc/hosts in every namespace, resolves the names (the
proxies connect back to the launcher's control port by its host name).

`Cluster.close()` kills every process left in its namespaces and removes
them (the bridge and veths go with them); it runs however a test ends.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
SUBNET = "10.231.0"
LAUNCHER_HOST = "launch"
# MPICH's UCX netmod recognises one machine by its boot id, whatever the
# host names, and would pass messages through shared memory between the
# namespaces; across real machines only the network is there, so only TCP.
HOST_ENV = {"UCX_TLS": "tcp,self"}


def unavailable() -> str | None:
    """Why namespaced hosts cannot run here, or None."""
    if os.geteuid() != 0:
        return "multihost tests need root (network, UTS and mount namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"multihost tests need `{tool}` on PATH"
    if not MPIEXEC.is_file():
        return f"multihost tests need hydra's mpiexec ({MPIEXEC})"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def host_name(rank: int) -> str:
    return f"host{rank}"


def host_files(shards: Path, rank: int) -> list[Path]:
    """What host `rank` holds of a shard set: what `netp inspect --files-for-rank` names
    (its rank file, the manifest and the tokenizer folder)."""
    from netp.inspect import files_for_rank

    return files_for_rank(shards, rank)


def _link_tree(src: Path, dst: Path) -> None:
    """Hardlink a file or folder (copy where a hardlink is refused)."""
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_hardlink)
    else:
        _hardlink(src, dst)


def _hardlink(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class Cluster:
    """n hosts (host0..host{n-1}) plus the launcher, each in its namespaces.

    root: a scratch folder; root/hosts/host{r}/ is what host r sees at
    `self.mount` (an empty folder outside the namespaces)."""

    def __init__(self, n: int, root: Path):
        self.n, self.root = n, root
        tag = f"netp{os.getpid()}x{time.monotonic_ns() % 100000}"
        self.switch = f"{tag}-sw"
        self.launcher_ns = f"{tag}-l"
        self.host_ns = [f"{tag}-h{r}" for r in range(n)]
        self.mount = root / "shards"  # the path every host sees its own files at
        self.hosts_file = root / "etc-hosts"
        self.ssh = root / "ssh.sh"
        self.created: list[str] = []
        self.procs: list[subprocess.Popen] = []

    # -- setup ------------------------------------------------------------------------

    def __enter__(self) -> "Cluster":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def veth(self, rank: int) -> str:
        """The switch-side end of host `rank`'s link."""
        return f"vh{rank}"

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{10 + rank}"

    def _start(self) -> None:
        self.mount.mkdir(parents=True, exist_ok=True)
        for ns in (self.switch, self.launcher_ns, *self.host_ns):
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        ends = [("vl", self.launcher_ns, f"{SUBNET}.1")] + [
            (self.veth(r), ns, self.address(r)) for r, ns in enumerate(self.host_ns)]
        for name, ns, addr in ends:
            _ip("-n", self.switch, "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", name, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        lines = ["127.0.0.1 localhost", f"{SUBNET}.1 {LAUNCHER_HOST}"]
        lines += [f"{self.address(r)} {host_name(r)}" for r in range(self.n)]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        for r in range(self.n):
            (self.root / "hosts" / host_name(r)).mkdir(parents=True, exist_ok=True)
        self._write_ssh()

    def _write_ssh(self) -> None:
        cases = "\n".join(f"  {host_name(r)}) ns={self.host_ns[r]} dir={self.root / 'hosts' / host_name(r)} ;;"
                          for r in range(self.n))
        # ssh joins its arguments into one line for the remote shell: so does this.
        self.ssh.write_text(f"""#!/bin/sh
# hydra's ssh stand-in: ssh.sh -x HOST COMMAND... runs COMMAND in HOST's namespaces.
[ "$1" = "-x" ] && shift
host=$1; shift
case "$host" in
{cases}
  *) echo "ssh.sh: unknown host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts --mount sh -c \\
  'hostname "$1" && mount --bind "$2" /etc/hosts && mount --bind "$3" "$4" && exec sh -c "$5"' \\
  ssh.sh "$host" {self.hosts_file} "$dir" {self.mount} "$*"
""")
        self.ssh.chmod(0o755)

    def place(self, shards: Path, skip: Sequence[Path] = ()) -> None:
        """Give host r the files of rank r (hardlinks), minus `skip`."""
        for r in range(self.n):
            folder = self.root / "hosts" / host_name(r)
            for src in host_files(shards, r):
                dst = folder / src.name
                if dst.is_dir():
                    shutil.rmtree(dst)
                elif dst.exists():
                    dst.unlink()
                if src not in skip and src.exists():
                    _link_tree(src, dst)

    def give(self, rank: int, src: Path) -> Path:
        """Put file or folder `src` on host `rank` alone; returns the path it has there."""
        _link_tree(src, self.root / "hosts" / host_name(rank) / src.name)
        return self.mount / src.name

    # -- running ------------------------------------------------------------------------

    def mpiexec_argv(self, command: Sequence[str], n: int | None = None, options: Sequence[str] = ()) -> list[str]:
        n = n or self.n
        hosts = ",".join(f"{host_name(r)}:1" for r in range(self.n))
        inner = [str(MPIEXEC), "-hosts", hosts, "-launcher", "ssh", "-launcher-exec", str(self.ssh), *options,
                 "-n", str(n), *command]
        return ["ip", "netns", "exec", self.launcher_ns, "unshare", "--uts", "--mount", "sh", "-c",
                'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"', "sh",
                LAUNCHER_HOST, str(self.hosts_file), *inner]

    def start(self, command: Sequence[str], n: int | None = None, env: dict | None = None,
              options: Sequence[str] = ()) -> subprocess.Popen:
        """mpiexec [options] of `command` over the hosts, in the background (stdout/stderr piped)."""
        env = dict(os.environ if env is None else env, **HOST_ENV)
        p = subprocess.Popen(self.mpiexec_argv(command, n, options), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def run(self, command: Sequence[str], timeout: float = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
        p = self.start(command, env=env)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            out, err = p.communicate()
            raise AssertionError(f"mpiexec did not return within {timeout} s:\n{out}\n{err}") from None
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def pids(self, ns: str) -> list[int]:
        r = _ip("netns", "pids", ns, check=False)
        return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []

    def rank_pids(self, command_word: str) -> dict[int, list[int]]:
        """Per host, the pids of processes whose command line holds command_word (the ranks)."""
        found: dict[int, list[int]] = {}
        for r, ns in enumerate(self.host_ns):
            for pid in self.pids(ns):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if any(command_word.encode() in part for part in cmd) and b"hydra_pmi_proxy" not in cmd[0]:
                    found.setdefault(r, []).append(pid)
        return found

    def link_down(self, rank: int) -> None:
        _ip("-n", self.switch, "link", "set", self.veth(rank), "down")

    def bytes_from(self, rank: int) -> int:
        """Bytes host `rank` has sent into the switch (its veth's switch side receives them)."""
        return self._stat(self.veth(rank), "rx_bytes")

    def _stat(self, dev: str, counter: str) -> int:
        r = subprocess.run(["ip", "netns", "exec", self.switch, "cat", f"/sys/class/net/{dev}/statistics/{counter}"],
                           check=True, capture_output=True, text=True)
        return int(r.stdout)

    # -- teardown ------------------------------------------------------------------------

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with _quiet():
                    os.killpg(p.pid, signal.SIGKILL)
        for _ in range(50):
            left = [pid for ns in self.created for pid in self.pids(ns)]
            if not left:
                break
            for pid in left:
                with _quiet():
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for p in self.procs:
            with _quiet():
                p.wait(timeout=5)

    def close(self) -> None:
        """Kill every process left in the namespaces and delete them (bridge and veths go with them)."""
        try:
            self.kill_all()
        finally:
            for ns in reversed(self.created):
                _ip("netns", "del", ns, check=False)
            self.created = []


class _quiet:
    def __enter__(self) -> None:
        pass

    def __exit__(self, typ: type | None, *rest: object) -> bool:
        return typ is not None and issubclass(typ, (OSError, subprocess.TimeoutExpired))
