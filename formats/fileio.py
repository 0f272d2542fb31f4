"""Reading files into buffers: a byte range, whatever its size; a whole file's sha256.

One `os.preadv` call returns at most 0x7ffff000 bytes on Linux (~2 GiB),
and any call may return short, so a read loops until the buffer is full;
only a call that returns nothing means the file ends first. Every reader
that fills a buffer from a file offset (the NE reader's --no_mmap and
streaming reads, the safetensors reader, the one-pass reader) uses this.
"""
from __future__ import annotations

import hashlib
import mmap
import os

import numpy as np

from netp.errors import NetpError


def float32_out(out: np.ndarray, count: int) -> np.ndarray:
    """A caller's buffer for `count` float32 values, flat; anything else is a programming error."""
    if out.dtype != np.float32 or out.size != count or not out.flags.c_contiguous:
        raise ValueError(f"out must be {count} contiguous float32 values, not {out.size} {out.dtype}")
    return out.reshape(-1)


def drop_mapped_pages(mapped: mmap.mmap, offset: int = 0, nbytes: int | None = None) -> None:
    """Release this process's hold on the pages of bytes [offset, offset + nbytes) of a file
    mapping (all of it without nbytes), the partial pages at its ends included (MADV_DONTNEED):
    they stay in the page cache and fault back in when touched, so bytes already copied out
    do not count in the RSS a second time."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    if nbytes is None:
        mapped.madvise(mmap.MADV_DONTNEED)
        return
    start = offset - offset % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)


def read_exact_at(fd: int, out: np.ndarray | memoryview, offset: int, path: str | os.PathLike,
                  short: str) -> None:
    """Fill `out` (a writable, C-contiguous buffer) with the bytes of `fd` from `offset`;
    a file that ends first is the NetpError (path, short)."""
    view = (out.data if isinstance(out, np.ndarray) else out).cast("B")
    done = 0
    while done < view.nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise NetpError(path, short)
        done += got


_HASH_CHUNK = 8 << 20


def sha256_fd(fd: int) -> str:
    """sha256 of the whole file open as `fd`, read with pread in chunks into one reused
    buffer (the file position is left alone; no memory map: its pages would count as ours)."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    offset = 0
    while n := os.preadv(fd, [view], offset):
        h.update(view[:n])
        offset += n
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file (see sha256_fd)."""
    with open(path, "rb", buffering=0) as f:
        return sha256_fd(f.fileno())
