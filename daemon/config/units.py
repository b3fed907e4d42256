"""Durations and rates as a config file writes them ("30s", "5m", "5/s", or a number),
decoded once, with the file, into floats: nothing downstream parses them again, and a
bad value is refused by the decoder with its key's path like any other wrong type.
"""

from __future__ import annotations

from typing import Any

from protocol.durations import parse_duration, parse_rate


class Seconds(float):
    """A duration in seconds ("500ms", "30s", "10m", "2h", "7d", or a number of seconds).

    Only the decoder sees this type: the config Structs turn it into a plain float as
    they are built (`format_duration` writes one back the way a file would)."""

    __slots__ = ()


class PerSecond(float):
    """A rate in events per second ("5/s", "30/m", "90/10s", or a number per second)."""

    __slots__ = ()


def seconds(text: str) -> Seconds:
    """A default written as the file would write it: `lease: Seconds = seconds("30s")`."""
    return Seconds(parse_duration(text))


def decode_hook(type_: type, value: Any) -> Any:
    """msgspec's `dec_hook`: a ValueError here becomes a ValidationError naming the key."""
    if type_ is Seconds:
        if not isinstance(value, str | int | float):
            raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 30s, 10m, 2h, 7d)")
        return Seconds(parse_duration(value))
    if type_ is PerSecond:
        if not isinstance(value, str | int | float):
            raise ValueError(f"not a rate: {value!r} (use e.g. 5/s, 30/m, 1000/h)")
        return PerSecond(parse_rate(value))
    raise NotImplementedError(f"no decoder for {type_!r}")
