"""Templates (Jinja2, autoescaped) and the filters they format values with."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

PRETTY_MAX_CHARS = 64 * 1024  # a bigger value is cut on the page; jobctl get shows it whole

_TEMPLATES = Path(__file__).with_name("templates")


class Renderer:
    def __init__(self, *, region: str, refresh_ms: int):
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=True,
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self._env.filters.update(ago=ago, at=at, took=took, pretty=pretty, seconds=span)
        self._env.globals.update(region=region, refresh_ms=refresh_ms)

    def page(self, template: str, context: dict[str, Any], **values: Any) -> str:
        return self._env.get_template(template).render(**context, **values)

    def login(self, next_path: str, error: str | None = None) -> str:
        return self.page("login.html", {"session": None, "csrf": "", "flash": "",
                                        "partial": False}, next=next_path, error=error)

    def message(self, title: str, text: str, context: dict[str, Any] | None = None) -> str:
        base = context or {"session": None, "csrf": "", "flash": "", "partial": False}
        return self.page("message.html", base, title=title, text=text)


def ago(when: datetime | None) -> str:
    """'3m ago', 'in 5s'."""
    if when is None:
        return "–"
    delta = (datetime.now(UTC) - when).total_seconds()
    text = span(abs(delta))
    return f"{text} ago" if delta >= 0 else f"in {text}"


def span(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{seconds % 86400 // 3600:02.0f}h"


def took(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "–"
    return span((end - start).total_seconds())


def at(when: datetime | None) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if when else "–"


def pretty(value: Any) -> str:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    if len(text) > PRETTY_MAX_CHARS:
        return text[:PRETTY_MAX_CHARS] + f"\n… ({len(text) - PRETTY_MAX_CHARS} more characters)"
    return text
