"""Progress for long CLI work (replay, DLQ replay/purge, backfill): a bar on a terminal, plain lines otherwise.

Writes to stderr only, so stdout stays clean for --json and pipes; redraws at most
a few times a second.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None,
                 interval: float = 0.25) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if self.tty else 5.0
        self.started = time.monotonic()
        self._drawn = 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._drawn >= self.interval:
            self._drawn = now
            self._draw(now)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        if self.total is None or rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / rate)

    def line(self) -> str:
        parts = [self.label]
        if self.total:
            width = 30
            filled = int(width * min(1.0, self.done / self.total))
            parts.append(f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
        else:
            parts.append(f"{self.done}")
        parts.append(f"{self.rate():,.0f}/s")
        eta = self.eta()
        if eta is not None:
            parts.append(f"eta {eta:,.0f}s")
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self._draw(time.monotonic())
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()
