"""Durations, as Consul and Go write them: "10s", "500ms", "1m30s", "6h".

One grammar for every duration meshgw reads (settings, Consul's ?wait=, a registration's
DeregisterCriticalServiceAfter); a bare number means seconds.
"""

from __future__ import annotations

import math
import re

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | float) -> float:
    """Seconds in `value`: a number of seconds, or a Go duration ("10s", "5m", "1m30s").
    ValueError for anything else, negative or not finite."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds, pos = 0.0, 0
            for match in _PART.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if not text or pos != len(text):
                raise ValueError(
                    f"{value!r} is not a duration: write 10s, 500ms, 5m, 1h or a number of seconds"
                ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a non-negative duration")
    return seconds


def go_duration(seconds: float) -> str:
    """Seconds as a Go duration: "300s", "500ms", "6h"."""
    if seconds >= 3600 and float(seconds / 3600).is_integer():
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and float(seconds / 60).is_integer():
        return f"{int(seconds // 60)}m"
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"
