"""Progress bars that behave in a terminal and in a log file.

``progress(...)`` is the one way the project shows progress on long work. In a terminal it is a
tqdm bar (nested bars, ``nested=True``, vanish when done). When the bar's stream is not a
terminal (``make demo > demo.log 2>&1``, CI, a pipe) tqdm would write carriage returns and
cursor-up escapes (``\\x1b[A``) into the file on every refresh; instead a nested bar is silent and
a top-level bar writes one plain log line (logger ``sdar.progress``) at most every
``log_every_s`` seconds and one when it closes, e.g.

    2026-12-01 18:00:00 sdar.progress INFO sdar RL: 12/30 step (40%), 95.1s, success=0.25

``SDAR_PROGRESS`` overrides the choice: ``auto`` (default), ``bars`` (tqdm always), ``plain``
(log lines always), ``off`` (nothing).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional

log = logging.getLogger("sdar.progress")
MODES = ("auto", "bars", "plain", "off")


def progress_mode(stream: Any = None) -> str:
    """``bars``, ``plain`` or ``off`` for a bar writing to ``stream`` (default ``sys.stderr``)."""
    mode = os.environ.get("SDAR_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"SDAR_PROGRESS={mode!r} is not valid; expected one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    stream = sys.stderr if stream is None else stream
    try:
        return "bars" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return "plain"


class PlainProgress:
    """The tqdm subset the project uses (iterate, update, set_postfix, close, with), written as
    periodic log lines; ``silent`` writes nothing at all (nested bars off a terminal)."""

    def __init__(self, iterable: Optional[Iterable] = None, desc: str = "", total: Optional[float] = None,
                 unit: str = "it", initial: float = 0, silent: bool = False, log_every_s: float = 30.0) -> None:
        self.iterable, self.desc, self.unit, self.silent = iterable, desc, unit, silent
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable) + initial  # tqdm counts a range that starts at ``initial`` the same way
        self.total, self.n, self.log_every_s = total, initial, log_every_s
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.silent and now - self._last >= self.log_every_s:
            self._last = now
            self._emit()

    def set_postfix(self, ordered_dict: Optional[dict] = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self._closed and not self.silent:
            self._emit()
        self._closed = True

    def _emit(self) -> None:
        done = f"{self.n:g}" if self.total is None else f"{self.n:g}/{self.total:g}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %s %s%s, %.1fs%s", self.desc, done, self.unit, share, time.monotonic() - self._start, post)


def quiet_library_bars(stream: Any = None) -> None:
    """Turn off the Hugging Face libraries' own tqdm bars (e.g. transformers' "Loading weights")
    unless this process shows bars (``progress_mode``); a no-op in a terminal."""
    if progress_mode(stream) == "bars":
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub and transformers
    if "transformers" in sys.modules:  # already imported: its switch was read at import time
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def progress(iterable: Optional[Iterable] = None, *, desc: str = "", total: Optional[float] = None,
             unit: str = "it", nested: bool = False, disable: bool = False, initial: float = 0,
             log_every_s: float = 30.0, file: Any = None) -> Any:
    """A progress bar over ``iterable`` (or updated by hand): tqdm in a terminal, plain log lines
    (top-level) or nothing (``nested``) elsewhere; see the module doc. ``disable`` shows nothing."""
    mode = "off" if disable else progress_mode(file)
    if mode == "bars":
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=not nested, initial=initial,
                    file=file)
    return PlainProgress(iterable, desc=desc, total=total, unit=unit, initial=initial,
                         silent=mode == "off" or nested, log_every_s=log_every_s)
