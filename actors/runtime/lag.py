"""Event-loop lag: how late the loop runs, and which handler holds it when it stalls.

Two cheap parts. `probe` sleeps a short interval again and again and reports how late
it woke (the lag every task saw). `Watchdog`, a thread, asks the loop a few times per
threshold to run a stamp; a stamp still not run after `threshold_s` means one task step
holds the loop, and the thread reads the loop thread's stack to name it: the attempt of
the worker task whose coroutine is on that stack (the dispatcher records in `RUNNING`
which attempt each worker task runs), else the function at the top. An `async` handler
that calls blocking code (time.sleep, a sync SDK) is found this way while it still
blocks; such code belongs in a plain `def` handler, which runs on a thread.

A trio Instrument timing every task step did this before; trio's instrument dispatch
cost 8-11 % of the loop's CPU on every path (bench/profile_jobd.py), the watchdog a
few wake-ups a second.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from time import perf_counter
from types import FrameType

import trio

from actors.runtime.clock import Clock

log = logging.getLogger("jobd.lag")

# Worker task -> (kind, job id) of the attempt it is running; see attempt_started.
RUNNING: dict[trio.lowlevel.Task, tuple[str, int]] = {}


def attempt_started(task: trio.lowlevel.Task, kind: str, job_id: int) -> None:
    """The dispatcher's worker `task` starts an attempt (named if it blocks the loop)."""
    RUNNING[task] = (kind, job_id)


def attempt_ended(task: trio.lowlevel.Task) -> None:
    RUNNING.pop(task, None)


class Watchdog:
    """Warns (and calls `on_block(kind or None, seconds)` on the loop) once per stall
    when one task step holds the loop for `threshold_s` or more, naming the handler it
    runs. Start it from the loop it watches; `stop` before that loop ends."""

    def __init__(self, threshold_s: float,
                 on_block: Callable[[str | None, float], None] | None = None):
        self.threshold_s = threshold_s
        self._on_block = on_block
        self._check_s = min(max(threshold_s / 4, 0.005), 0.25)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_thread = 0
        self._posted: float | None = None  # when the stamp not yet run was posted
        self._seq = 0  # the stamp's number; a stamp that runs clears only its own
        self._reported = -1  # the stamp whose stall was reported

    def start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        self._thread = threading.Thread(target=self._watch, name="jobd-loop-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def _stamp(self, seq: int) -> None:  # on the loop
        if self._seq == seq:
            self._posted = None

    def _watch(self) -> None:
        assert self._token is not None
        while not self._stopped.wait(self._check_s):
            posted, now = self._posted, perf_counter()
            if posted is None:
                self._seq += 1
                self._posted = now
                try:
                    self._token.run_sync_soon(self._stamp, self._seq)
                except trio.RunFinishedError:
                    return
            elif now - posted >= self.threshold_s and self._reported != self._seq:
                self._reported = self._seq
                self._blocked(now - posted)

    def _blocked(self, took: float) -> None:
        try:
            frame = sys._current_frames().get(self._loop_thread)
            running = _holder(frame)
            if running is not None:
                kind, job_id = running
                log.warning("handler %s (job %s) has blocked the event loop for %.3f s; "
                            "blocking code belongs in a sync (def) handler, which runs on "
                            "a thread", kind, job_id, took,
                            extra={"event": "loop.blocked", "kind": kind, "job_id": job_id,
                                   "blocked_s": round(took, 6)})
            else:
                where = (f"{frame.f_code.co_name} ({frame.f_code.co_filename}:"
                         f"{frame.f_lineno})") if frame is not None else "an unknown place"
                log.warning("the event loop has been blocked for %.3f s in %s", took, where,
                            extra={"event": "loop.blocked", "where": where,
                                   "blocked_s": round(took, 6)})
            if self._on_block is not None and self._token is not None:
                self._token.run_sync_soon(self._on_block,
                                          running[0] if running else None, took)
        except Exception:  # noqa: BLE001 - the watchdog must outlive any odd state
            pass


def _holder(frame: FrameType | None) -> tuple[str, int] | None:
    """The attempt whose worker task's coroutine is on the loop thread's stack."""
    on_stack = set()
    while frame is not None:
        on_stack.add(id(frame))
        frame = frame.f_back
    for _ in range(3):  # the loop may change RUNNING while we read it
        try:
            running = list(RUNNING.items())
            break
        except RuntimeError:
            continue
    else:
        return None
    for task, attempt in running:
        coro_frame = getattr(task.coro, "cr_frame", None)
        if coro_frame is not None and id(coro_frame) in on_stack:
            return attempt
    return None


async def probe(clock: Clock, interval_s: float, observe: Callable[[float], None]) -> None:
    """Forever: sleep `interval_s`, report how much later than that the loop woke us."""
    while True:
        start = clock.now()
        await clock.sleep(interval_s)
        observe(max(0.0, clock.now() - start - interval_s))
