"""Progress for long CLI work (replay, DLQ replay/purge, backfill): a bar on a terminal, plain lines otherwise.

Writes to stderr only, so stdout stays clean for --json and pipes; redraws at most
a few times a second.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class StatusLine:
    """One status line: redrawn in place on a terminal, else printed as plain lines, at most one
    per `plain_every` seconds unless forced (a state change, the last line)."""

    def __init__(self, stream: TextIO | None = None, plain_every: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.plain_every = plain_every
        self._last_plain = float("-inf")
        self._drawn = False

    def show(self, text: str, force: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self._drawn = True
        else:
            now = time.monotonic()
            if not force and now - self._last_plain < self.plain_every:
                return
            self._last_plain = now
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the redrawn line, so what follows starts on its own."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class Progress:
    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None,
                 interval: float = 0.25) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.status = StatusLine(stream)
        self.tty = self.status.tty
        self.interval = interval if self.tty else 0.0  # the status line throttles plain output itself
        self.started = time.monotonic()
        self._drawn = 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._drawn >= self.interval:
            self._drawn = now
            self.status.show(self.line())

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

    def finish(self) -> None:
        self.status.show(self.line(), force=True)
        self.status.finish()
