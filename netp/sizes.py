"""Byte counts for people: one formatter, binary units, everywhere netp prints a size."""
from __future__ import annotations


def human_size(n: float) -> str:
    """`512 B`, `3.4 KiB`, `120.5 MiB`, `1.2 GiB`."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
