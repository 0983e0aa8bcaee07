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

from typing import Callable

import torch

from sdar_engine.process_memory import peak_rss_bytes, reset_peak_rss, rss_bytes

METHOD_CUDA = "cuda-max-allocated"
METHOD_HWM = "rss-hwm-reset"
METHOD_FRESH = "rss-fresh"


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
