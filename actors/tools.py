"""Flow-control tools a handler declares (README "Flow-control tools"): debounce,
batching, throttle, singleton and unique-key windows.

`Tools` is what Postgres applies: the daemon writes each kind's into `jobd.kind_tools`
(at start and on reload) and every insertion path reads it there (migration 0020), so
the rules hold for SQL `jobd.enqueue` and across daemons. A tool's key is an args field
name (usable from SQL too) or a function of the decoded args, which only a Python
enqueue can call: it sends the computed key with the row (`keys()`).
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import msgspec

from protocol.durations import parse_duration, parse_rate

BATCH_SIZE_MAX = 10_000
_DURATION_MAX_S = 31_536_000.0  # one year, as a timeout
_UNIQUE_FOR_MAX_S = 315_360_000.0  # ten years

ToolKey = str | Callable[[Any], Any] | None


class Tools(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One kind's tools, as jobd.kind_tools stores them (None: not used)."""

    debounce_s: float | None = None
    debounce_max_s: float | None = None
    debounce_field: str | None = None
    batch_size: int | None = None
    batch_timeout_s: float | None = None
    batch_field: str | None = None
    throttle_per_s: float | None = None
    throttle_burst: int | None = None
    throttle_mode: str | None = None
    throttle_field: str | None = None
    singleton_mode: str | None = None
    singleton_field: str | None = None
    unique_for_s: float | None = None
    unique_mode: str | None = None

    def any(self) -> bool:
        return any(getattr(self, f) is not None for f in self.__struct_fields__)


class ToolSpec(msgspec.Struct, kw_only=True):
    """A declaration's tools plus the key functions Postgres cannot run."""

    tools: Tools
    key_fns: dict[str, Callable[[Any], Any]] = {}

    def keys(self, decoded: Any) -> dict[str, str]:
        """The keys the functions give for these args ({"debounce": "ebay", ...})."""
        return {tool: str(fn(decoded)) for tool, fn in self.key_fns.items()}


def declare(kind: str, args_type: Any, *, debounce: str | float | None = None,
            debounce_key: ToolKey = None, debounce_max: str | float | None = None,
            batch_size: int | None = None, batch_timeout: str | float | None = None,
            batch_key: ToolKey = None, throttle: str | float | None = None,
            throttle_key: ToolKey = None, throttle_burst: int | None = None,
            throttle_mode: str | None = None, singleton_key: ToolKey = None,
            singleton_mode: str | None = None, mode: str | None = None,
            unique_for: str | float | None = None, unique_mode: str | None = None,
            ) -> ToolSpec | None:
    """The tools of `@job(kind, ...)`, checked; None when it declares none. Every misuse
    is a one-line ValueError or TypeError naming the kind and the option."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"@job({kind!r}): {msg}")

    def duration(name: str, value: str | float | None, top: float = _DURATION_MAX_S) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise bad(f"{name} must be a duration like '5s', got {value!r}")
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise bad(f"{name}: {exc}") from None
        if not 0 < seconds <= top:
            raise bad(f"{name} must be > 0 and <= {top:g} s, got {value!r}")
        return seconds

    if mode is not None:
        if throttle is not None and singleton_key is not None:
            raise bad("mode= is ambiguous with both throttle and singleton_key; "
                      "use throttle_mode= and singleton_mode=")
        if throttle is not None:
            throttle_mode = throttle_mode or mode
        elif singleton_key is not None:
            singleton_mode = singleton_mode or mode
        else:
            raise bad("mode= needs throttle= or singleton_key=")
    tools = Tools(
        debounce_s=duration("debounce", debounce),
        debounce_max_s=duration("debounce_max", debounce_max),
        batch_timeout_s=duration("batch_timeout", batch_timeout),
        unique_for_s=duration("unique_for", unique_for, _UNIQUE_FOR_MAX_S),
    )
    if tools.debounce_max_s is not None:
        if tools.debounce_s is None:
            raise bad("debounce_max needs debounce")
        if tools.debounce_max_s < tools.debounce_s:
            raise bad(f"debounce_max ({debounce_max!r}) must be >= debounce ({debounce!r})")
    if batch_size is not None or tools.batch_timeout_s is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise bad(f"batch_size must be an integer 1..{BATCH_SIZE_MAX}, got {batch_size!r}")
        if not 1 <= batch_size <= BATCH_SIZE_MAX:
            raise bad(f"batch_size must be 1..{BATCH_SIZE_MAX}, got {batch_size}")
        if tools.batch_timeout_s is None:
            raise bad("batch_size needs batch_timeout (how long a partial batch waits)")
        if tools.debounce_s is not None:
            raise bad("debounce and batching cannot be combined on one kind")
        if batch_item_type(args_type) is None:
            raise bad(f"a batch handler's args type must be list[...], got {args_type!r}")
        tools.batch_size = batch_size
    if throttle is not None:
        if isinstance(throttle, bool) or not isinstance(throttle, str | int | float):
            raise bad(f"throttle must be a rate like '10/m', got {throttle!r}")
        try:
            per_s = parse_rate(throttle)
        except ValueError as exc:
            raise bad(f"throttle: {exc}") from None
        if not 0 < per_s <= 1e6:
            raise bad(f"throttle must be > 0 and <= 1000000/s, got {throttle!r}")
        tools.throttle_per_s = per_s
        tools.throttle_mode = throttle_mode or "delay"
        if tools.throttle_mode not in ("delay", "drop"):
            raise bad(f"throttle mode must be 'delay' or 'drop', got {tools.throttle_mode!r}")
        if throttle_burst is not None:
            if isinstance(throttle_burst, bool) or not isinstance(throttle_burst, int) \
                    or not 1 <= throttle_burst <= 1_000_000:
                raise bad(f"throttle_burst must be an integer 1..1000000, got {throttle_burst!r}")
            tools.throttle_burst = throttle_burst
    elif throttle_mode is not None or throttle_key is not None or throttle_burst is not None:
        raise bad("throttle_key/throttle_mode/throttle_burst need throttle=")
    if singleton_key is not None:
        tools.singleton_mode = singleton_mode or "skip"
        if tools.singleton_mode not in ("skip", "cancel"):
            raise bad(f"singleton mode must be 'skip' or 'cancel', got {tools.singleton_mode!r}")
        if tools.batch_size is not None or tools.debounce_s is not None:
            raise bad("singleton cannot be combined with debounce or batching")
    elif singleton_mode is not None:
        raise bad("singleton_mode needs singleton_key=")
    if unique_mode is not None and unique_mode not in ("keep", "replace"):
        raise bad(f"unique_mode must be 'keep' or 'replace', got {unique_mode!r}")
    tools.unique_mode = unique_mode
    if debounce_key is not None and tools.debounce_s is None:
        raise bad("debounce_key needs debounce=")
    if batch_key is not None and tools.batch_size is None:
        raise bad("batch_key needs batch_size=")

    key_fns: dict[str, Callable[[Any], Any]] = {}
    for tool, key in (("debounce", debounce_key), ("batch", batch_key),
                      ("throttle", throttle_key), ("singleton", singleton_key)):
        if key is None:
            continue
        if isinstance(key, str):
            if not key or "\x00" in key or len(key) > 200:
                raise bad(f"{tool}_key must be an args field name (1..200 characters) "
                          f"or a function, got {key!r}")
            setattr(tools, f"{tool}_field", key)
        elif callable(key):
            key_fns[tool] = key
        else:
            raise TypeError(f"@job({kind!r}): {tool}_key must be an args field name or a "
                            f"function of the args, got {type(key).__name__}")
    if not tools.any():
        return None
    return ToolSpec(tools=tools, key_fns=key_fns)


def batch_item_type(args_type: Any) -> Any:
    """The item type of a batch handler's `list[Item]` args; None if it is not a list."""
    if typing.get_origin(args_type) is list:
        (item,) = typing.get_args(args_type) or (Any,)
        return item
    return None


def override(spec: ToolSpec | None, args_type: Any, settings: Tools) -> ToolSpec | None:
    """A declaration with the config's [kinds.<kind>] values laid over it (a field the
    config sets replaces the declaration's); checked again as a whole."""
    base = msgspec.structs.asdict(spec.tools) if spec is not None else {}
    merged = {**base, **{k: v for k, v in msgspec.structs.asdict(settings).items()
                         if v is not None}}
    tools = Tools(**merged)
    if tools.batch_size is not None and tools.debounce_s is not None:
        raise ValueError("debounce and batching cannot be combined on one kind")
    if tools.batch_size is not None and batch_item_type(args_type) is None:
        raise ValueError("batching needs a handler whose args type is list[...]")
    if (tools.batch_size is None) != (tools.batch_timeout_s is None):
        raise ValueError("batch_size and batch_timeout go together")
    if tools.debounce_max_s is not None and (tools.debounce_s is None
                                             or tools.debounce_max_s < tools.debounce_s):
        raise ValueError("debounce_max needs debounce and must be >= it")
    if (tools.throttle_per_s is None) != (tools.throttle_mode is None):
        if tools.throttle_per_s is None:
            raise ValueError("throttle_mode needs throttle")
        tools.throttle_mode = "delay"
    key_fns = dict(spec.key_fns) if spec is not None else {}
    return ToolSpec(tools=tools, key_fns=key_fns) if tools.any() else None
