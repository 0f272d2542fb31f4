"""Reading a byte range of a file into a buffer, whatever its size.

One `os.preadv` call returns at most 0x7ffff000 bytes on Linux (~2 GiB),
and any call may return short, so a read loops until the buffer is full;
only a call that returns nothing means the file ends first. Every reader
that fills a buffer from a file offset (the NE reader's --no_mmap and
streaming reads, the safetensors reader, the one-pass reader) uses this.
"""
from __future__ import annotations

import os

import numpy as np

from netp.errors import NetpError


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
