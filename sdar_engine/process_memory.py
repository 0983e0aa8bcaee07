"""This process's memory as Linux reports it: resident set size and its high-water mark.

One home for the /proc readings that the memory guard (``memory_levers``) and the benchmarks
(``benchmarks/memory.py``) both take. Bytes throughout; every function degrades to a
documented fallback where /proc is missing (not Linux) instead of raising.
"""
from __future__ import annotations

import ctypes
import resource
from typing import Optional


def status_kb(key: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (e.g. "VmRSS", "VmHWM"); None when unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size in bytes (0 when /proc is unavailable)."""
    return (status_kb("VmRSS") or 0) * 1024


def peak_rss_bytes() -> int:
    """Peak RSS in bytes since the process started or the last ``reset_peak_rss``."""
    hwm = status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return status_kb("VmHWM") is not None


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``) so RSS counts live memory
    only; without it a measurement reuses pages an earlier one freed and its growth is
    under-counted. A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
