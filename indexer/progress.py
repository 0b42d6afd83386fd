"""Progress of an indexing run: a bar on a terminal, a log line every few seconds everywhere else.

Batch jobs run under schedulers whose logs are files: the log line (docs/s, ETA) is what an
operator reads there; the bar is for people at a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self, total: int, interval_s: float = 30.0, label: str = "indexing", out: TextIO | None = None
    ):
        self._total = total
        self._interval = interval_s
        self._label = label
        self._out = out or sys.stderr
        self._started = time.monotonic()
        self._last_log = self._started
        self._bar = None
        if self._out.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="doc", desc=label, file=self._out)

    def update(self, done: int, indexed: int) -> None:
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            return
        now = time.monotonic()
        if now - self._last_log >= self._interval or done >= self._total:
            self._last_log = now
            self._out.write(self.line(done, indexed, now - self._started) + "\n")
            self._out.flush()

    def line(self, done: int, indexed: int, elapsed: float) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self._total - done) / rate if rate > 0 else float("inf")
        share = done / self._total if self._total else 1.0
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "unknown"
        return (
            f"{self._label}: {done}/{self._total} lines ({share:.0%}), {indexed} encoded, "
            f"{rate:.1f} docs/s, ETA {eta_text}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
