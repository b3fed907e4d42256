"""Shared helpers: a persistent sync SQL connection, CPU/RSS readers, statistics."""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

CLK_TCK = os.sysconf("SC_CLK_TCK")


class PgConn:
    """One asyncpg connection kept open on a private loop in a helper thread.

    Each call is one statement = one transaction, so a caller can count its own
    transactions exactly (`self.statements`) and subtract them from pg_stat_database.
    """

    def __init__(self, url: str):
        import asyncpg

        self.statements = 0
        # Not new_event_loop(): once trio-asyncio is imported, its policy would hand out
        # a loop that runs only inside trio.
        self._loop = asyncio.SelectorEventLoop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._conn = self._call(asyncpg.connect(url))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def fetch(self, query: str, *args: Any) -> list[Any]:
        self.statements += 1
        return self._call(self._conn.fetch(query, *args))

    def fetchval(self, query: str, *args: Any) -> Any:
        self.statements += 1
        return self._call(self._conn.fetchval(query, *args))

    def execute(self, query: str, *args: Any) -> str:
        self.statements += 1
        return self._call(self._conn.execute(query, *args))

    def close(self) -> None:
        try:
            self._call(self._conn.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


@contextmanager
def scratch_db(admin_url: str, prefix: str) -> Iterator[str]:
    """URL of a new empty database `<prefix>_<uuid8>` on the server `admin_url` names,
    dropped (WITH FORCE) afterwards. Needs no test dependencies, unlike tests/conftest."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = PgConn(admin_url)
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(admin_url)._replace(path="/" + name))
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # fields from #3 (state) on


def proc_cpu(pid: int, children: bool = False) -> float:
    """utime + stime (and reaped children's, if asked) of one process, in seconds."""
    try:
        f = _stat_fields(pid)
    except OSError:
        return 0.0
    ticks = int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
    if children:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime
    return ticks / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """utime + stime of each thread of `pid`, in seconds, by "name/tid"."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "stat").read_text()
        name = text[text.index("(") + 1:text.rindex(")")]
        f = text[text.rindex(")") + 2:].split()
        out[f"{name}/{task.name}"] = (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def children_of(ppid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat_fields(int(entry))[1]) == ppid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def pg_cluster_cpu(postmaster: int) -> float:
    """CPU seconds of the whole cluster: postmaster (incl. reaped backends) + live children."""
    return proc_cpu(postmaster, children=True) + sum(proc_cpu(p) for p in children_of(postmaster))


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def latency_summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(ms, 0.50), "p95_ms": pct(ms, 0.95), "p99_ms": pct(ms, 0.99),
            "n": len(ms)}


def summarize(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if isinstance(v, (int, float)) and v == v]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def wait_for(predicate, timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("benchmark condition not reached")
