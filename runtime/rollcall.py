"""The roll call of ranks that lost a peer, over UDP beside MPI
(docs/design.md §9).

A rank whose collective missed its deadline asks which peers are still
alive, so that one line names the silent ones and only one rank prints it.
Asking through MPI crashed: sending to a process that died makes MPICH's
UCX layer fail with SIGSEGV (measured with 3 ranks, hydra told not to clean
up), before any line is printed. A datagram to a dead process, or to a host
whose link is down, is simply lost. So every rank binds a UDP socket at
start and the ranks exchange their addresses once, through MPI, while all
are alive; a rank that gives up sends "rank r gives up" to every address of
every peer and listens. Datagrams wait in the socket's buffer, so a rank
that gives up later still reads those of ranks that gave up (and may have
exited) earlier.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

MAGIC = b"netp-lost"
SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def ipv4_addresses() -> list[str]:
    """This host's IPv4 addresses, one per interface that has one (loopback included)."""
    out: list[str] = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                packed = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
                out.append(socket.inet_ntoa(packed[20:24]))
    except OSError:
        pass
    finally:
        probe.close()
    return out or ["127.0.0.1"]


def host_id() -> str:
    """What tells two ranks they share a host (and so may use its loopback)."""
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{socket.gethostname()}/{f.read().strip()}"
    return socket.gethostname()


@dataclass(frozen=True)
class Card:
    """What a rank tells the others at start: where its roll-call socket listens."""
    host: str
    addresses: tuple[str, ...]
    port: int
    token: bytes  # rank 0's is the job's: datagrams of another job are ignored


class RollCall:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.setblocking(False)
        self.card = Card(host_id(), tuple(ipv4_addresses()), self.sock.getsockname()[1], os.urandom(8))
        self.peers: dict[int, Card] = {}
        self.token = self.card.token

    def join(self, rank: int, cards: list[Card]) -> None:
        """Every rank's card, in rank order."""
        self.token = cards[0].token
        self.peers = {r: c for r, c in enumerate(cards) if r != rank}

    def _targets(self, peer: Card) -> list[tuple[str, int]]:
        same_host = peer.host == self.card.host
        return [(a, peer.port) for a in peer.addresses if same_host or not a.startswith("127.")]

    def call(self, rank: int, seconds: float) -> set[int]:
        """Tell every peer this rank gives up; the ranks heard from within `seconds` (those
        that gave up too, earlier or meanwhile) are alive."""
        message = MAGIC + self.token + rank.to_bytes(4, "little")
        for peer in self.peers.values():
            for target in self._targets(peer):
                with contextlib.suppress(OSError):
                    self.sock.sendto(message, target)
        heard: set[int] = set()
        until = time.monotonic() + seconds
        while len(heard) < len(self.peers):
            left = until - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(OSError, ValueError):
                ready, _, _ = select.select([self.sock], [], [], left)
                while ready:
                    try:
                        data = self.sock.recv(64)
                    except BlockingIOError:
                        break
                    if len(data) == len(message) and data.startswith(MAGIC + self.token):
                        sender = int.from_bytes(data[-4:], "little")
                        if sender in self.peers:
                            heard.add(sender)
        return heard

    def close(self) -> None:
        self.sock.close()
