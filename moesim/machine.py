"""Facts about the machine that more than one stage reads (here: its memory)."""

from __future__ import annotations

import os


def memory_bytes(available: bool = False) -> int:
    """The machine's memory, or (``available``) what it can hand out now without swapping (Linux's
    MemAvailable; elsewhere the physical memory stands in for both)."""
    key = "MemAvailable:" if available else "MemTotal:"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
