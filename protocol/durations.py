"""Durations as people write them in configs and commands: "500ms", "30s", "10m", "2h", "7d"."""

from __future__ import annotations

import re
from decimal import Decimal

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | float | int) -> float:
    """'30m' -> 1800.0; bare numbers are seconds; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative: {value}")
        return float(value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 30s, 10m, 2h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """1800.0 -> '30m': the largest unit that writes it whole, and it parses back the same."""
    if not seconds:
        return "0s"
    for unit in ("d", "h", "m", "s", "ms"):
        count = round(seconds / _UNITS[unit])
        if count >= 1 and count * _UNITS[unit] == seconds:
            return f"{count}{unit}"
    return f"{Decimal(repr(float(seconds))):f}s"  # positional: the parser takes no exponent


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h|d)\s*$")


def parse_rate(value: str | float | int) -> float:
    """'5/s' -> 5.0, '5/m' -> 0.0833, '90/10s' -> 9.0 (events per second)."""
    if isinstance(value, bool):
        raise ValueError(f"not a rate: {value!r}")
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError(f"a rate must be positive: {value}")
        return float(value)
    match = _RATE.match(value)
    if not match:
        raise ValueError(f"not a rate: {value!r} (use e.g. 5/s, 30/m, 1000/h)")
    count, span, unit = match.groups()
    seconds = float(span or 1) * _UNITS[unit]
    if float(count) <= 0 or seconds <= 0:
        raise ValueError(f"a rate must be positive: {value!r}")
    return float(count) / seconds
