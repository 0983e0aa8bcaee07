"""Peak memory of one call, measured honestly.

GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
allocated before the call (inputs, weights).

CPU: the peak resident set size of the process (Linux VmHWM; the same counter as
``resource.getrusage(...).ru_maxrss``). Every case runs in a FRESH subprocess (benchmarks/worker.py);
after imports, input creation and the warm-up call the high-water mark is reset
(``/proc/self/clear_refs`` = 5) so the number is the peak of the measured call minus the RSS
before it. Where the reset is not permitted the warm-up is skipped and the delta is taken from
the process's baseline ru_maxrss after imports and inputs ("rss-fresh" method).
"""
from __future__ import annotations

import resource
from typing import Callable, Optional

import torch

METHOD_CUDA = "cuda-max-allocated"
METHOD_HWM = "rss-hwm-reset"
METHOD_FRESH = "rss-fresh"


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size in bytes (0 when /proc is unavailable)."""
    return (_status_kb("VmRSS") or 0) * 1024


def peak_rss_bytes() -> int:
    """Peak RSS of this process in bytes since start or the last ``reset_peak_rss``."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def can_reset_peak_rss() -> bool:
    return reset_peak_rss()


class PeakMeter:
    """Measures the extra peak memory of the code run between ``start()`` and ``stop()`` (bytes)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.method = METHOD_CUDA if self.cuda else (METHOD_HWM if can_reset_peak_rss() else METHOD_FRESH)
        self.base = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            if self.method == METHOD_HWM:
                reset_peak_rss()
            self.base = rss_bytes() if self.method == METHOD_HWM else peak_rss_bytes()

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - self.base)
        return max(0, peak_rss_bytes() - self.base)


def measure_peak(fn: Callable[[], object], device: str) -> tuple[int, str]:
    """(extra peak bytes of one ``fn()`` call, method name)."""
    meter = PeakMeter(device)
    meter.start()
    fn()
    return meter.stop(), meter.method
