"""Human units in config files: durations ("50ms", "72h") and byte sizes ("256KiB").

Both are numbers at runtime (seconds as float, bytes as int) and print back in the
unit a human wrote, so `walcar config check` shows what the file meant.
"""

from __future__ import annotations

import re

_DURATION_UNITS = {
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h|d)\s*$")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class Duration(float):
    """Seconds, written in config as "250ms", "2m", "72h" (or a bare number of seconds)."""

    @classmethod
    def parse(cls, value: object) -> Duration:
        if isinstance(value, bool):
            raise ValueError(f"expected a duration like '50ms', got {value!r}")
        if isinstance(value, int | float):
            if value < 0:
                raise ValueError(f"duration must not be negative, got {value!r}")
            return cls(value)
        if isinstance(value, str):
            match = _DURATION_RE.match(value)
            if match:
                return cls(float(match.group(1)) * _DURATION_UNITS[match.group(2)])
            raise ValueError(f"expected a duration like '50ms', '2m' or '72h', got {value!r}")
        raise ValueError(f"expected a duration like '50ms', got {type(value).__name__}")

    def __str__(self) -> str:
        seconds = float(self)
        for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3)):
            count = seconds / size
            if count >= 1 and abs(count - round(count)) < 1e-9:
                return f"{round(count)}{unit}"
        return f"{round(seconds * 1e6)}us"

    def __repr__(self) -> str:
        return f"Duration({str(self)!r})"


class ByteSize(int):
    """Bytes, written in config as "256KiB", "16MiB" (or a bare integer)."""

    @classmethod
    def parse(cls, value: object) -> ByteSize:
        if isinstance(value, bool):
            raise ValueError(f"expected a size like '256KiB', got {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"size must not be negative, got {value}")
            return cls(value)
        if isinstance(value, str):
            match = _SIZE_RE.match(value)
            if match and match.group(2).lower() in _SIZE_UNITS:
                return cls(int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]))
            raise ValueError(f"expected a size like '256KiB' or '16MiB', got {value!r}")
        raise ValueError(f"expected a size like '256KiB', got {type(value).__name__}")

    def __str__(self) -> str:
        value = int(self)
        for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if value >= size and value % size == 0:
                return f"{value // size}{unit}"
        return str(value)

    def __repr__(self) -> str:
        return f"ByteSize({str(self)!r})"


def parse_hostport(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'127.0.0.1:11211' -> ('127.0.0.1', 11211); ':8080' binds the default host."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {value!r}")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} out of range")
    host = host.strip("[]") or default_host
    return host, number
