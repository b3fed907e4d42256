"""Query strings and form bodies into the control commands they stand for.

The dashboard builds the same command structs `jobctl` sends, through the same
msgspec validation, so a bad filter here is the same one-line `bad_request` with the
field's name; only the encoding (a form, not JSON) is the dashboard's own.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import msgspec

from protocol import commands as c
from protocol.errors import BadRequest

MAX_FIELDS = 100

# The runs page's filters: every Filtered field but `ids`, in the order the form shows.
FILTERS = tuple(f for f in c.FILTER_FIELDS if f != "ids")
_TIMES = {f for f in FILTERS if f.endswith(("_after", "_before"))}
PAGE_SIZES = (25, 50, 100, 200)


def parse(text: str) -> list[tuple[str, str]]:
    """`a=1&b=2` as pairs, blank values kept; refuses a NUL, bad UTF-8 or a flood of
    fields with `bad_request` rather than letting them reach a command."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False,
                          max_num_fields=MAX_FIELDS, errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed form or query string: {exc}") from None
    for name, value in pairs:
        if "\0" in name or "\0" in value:
            raise BadRequest(f"NUL byte in form field {name!r}", details={"field": name})
    return pairs


def filters(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """The filter fields present and not blank (state may repeat)."""
    chosen: dict[str, Any] = {}
    for name, value in pairs:
        value = value.strip()
        if name not in FILTERS or not value:
            continue
        if name == "state":
            chosen.setdefault("state", []).append(value)
        elif name in _TIMES:
            chosen[name] = _time(name, value)
        else:
            chosen[name] = value
    return chosen


def command(kind: type[Any], fields: dict[str, Any]) -> Any:
    """`kind(**fields)` validated as if decoded from JSON: wrong types and out-of-range
    values are `bad_request` naming the field."""
    try:
        return msgspec.convert(fields, kind, str_keys=True)
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc)) from None


def integer(pairs: list[tuple[str, str]], name: str, default: int | None = None) -> int | None:
    value = dict(pairs).get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, not {value[:40]!r}",
                         details={"field": name}) from None


def query(fields: dict[str, Any], **extra: Any) -> str:
    """The filters back into a query string (for the next page's link)."""
    pairs: list[tuple[str, str]] = []
    for name, value in {**fields, **extra}.items():
        if value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            pairs.append((name, v.isoformat() if isinstance(v, datetime) else str(v)))
    return urlencode(pairs)


def dashboard_path(value: str | None) -> str:
    """`value` when it is a path inside the dashboard, else the overview: where to go
    after sign-in or an action comes from the form, so anything else would be an open
    redirect (or, with a CR/LF, a header of the attacker's)."""
    if value and _DASHBOARD_PATH.match(value) and "//" not in value:
        return value
    return "/ui/"


_DASHBOARD_PATH = re.compile(r"^/ui/[A-Za-z0-9/_.~%+=&?:,-]*$")


def _time(name: str, value: str) -> datetime:
    """ISO 8601; a time without a zone (what `<input type=datetime-local>` sends) is UTC."""
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{name}: not an ISO 8601 time: {value[:40]!r} "
                         "(e.g. 2026-12-03T09:30 or 2026-12-03T09:30:00+01:00)",
                         details={"field": name}) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)
