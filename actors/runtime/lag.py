"""Event-loop lag: how late the loop runs, and which handler held it when it stalled.

Two cheap parts. `probe` sleeps a short interval again and again and reports how late
it woke (the lag every task saw). `LoopLag`, a trio Instrument, times every task step
and, past a threshold, names the task that took it; the dispatcher records in `RUNNING`
which attempt each of its worker tasks is running, so the warning names the kind and
the job. An `async` handler that calls blocking code (time.sleep, a sync SDK) is found
this way; such code belongs in a plain `def` handler, which runs on a thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import perf_counter

import trio

from actors.runtime.clock import Clock

log = logging.getLogger("jobd.lag")

# Worker task -> (kind, job id) of the attempt it is running; see attempt_started.
RUNNING: dict[trio.lowlevel.Task, tuple[str, int]] = {}
_active: LoopLag | None = None  # the installed instrument, if any


def attempt_started(task: trio.lowlevel.Task, kind: str, job_id: int) -> float:
    """The dispatcher's worker `task` starts an attempt; returns its start for
    attempt_ended."""
    RUNNING[task] = (kind, job_id)
    return perf_counter()


def attempt_ended(task: trio.lowlevel.Task, started: float) -> None:
    """The attempt ended. Quick attempts run back to back within one task step, so the
    step's own check could only name the last of them: the part of this attempt that
    ran in the current step is checked here, where we know whose it was."""
    running = RUNNING.pop(task, None)
    instrument = _active
    if instrument is not None and running is not None:
        instrument.check_attempt(task, running, started)


class LoopLag(trio.abc.Instrument):
    """Warns (and calls `on_block(kind or None, seconds)`) when one task step holds the
    loop for `threshold_s` or more, naming the handler it was running. Costs two
    perf_counter calls per task step, and two per attempt."""

    def __init__(self, threshold_s: float,
                 on_block: Callable[[str | None, float], None] | None = None):
        self.threshold_s = threshold_s
        self._on_block = on_block
        self._step_started = perf_counter()
        self._reported = False  # this step's block was already named by an attempt

    def install(self) -> None:
        global _active
        trio.lowlevel.add_instrument(self)
        _active = self

    def uninstall(self) -> None:
        global _active
        if _active is self:
            _active = None
        trio.lowlevel.remove_instrument(self)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._reported = False
        self._step_started = perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = perf_counter() - self._step_started
        if took >= self.threshold_s and not self._reported:
            self._blocked(task, RUNNING.get(task), took)

    def check_attempt(self, task: trio.lowlevel.Task, running: tuple[str, int],
                      started: float) -> None:
        took = perf_counter() - max(started, self._step_started)
        if took >= self.threshold_s:
            self._reported = True
            self._blocked(task, running, took)

    def _blocked(self, task: trio.lowlevel.Task, running: tuple[str, int] | None,
                 took: float) -> None:
        try:
            if running is not None:
                kind, job_id = running
                log.warning("handler %s (job %s) blocked the event loop for %.3f s; "
                            "blocking code belongs in a sync (def) handler, which runs on "
                            "a thread", kind, job_id, took,
                            extra={"event": "loop.blocked", "kind": kind, "job_id": job_id,
                                   "blocked_s": round(took, 6)})
            else:
                log.warning("task %s blocked the event loop for %.3f s", task.name, took,
                            extra={"event": "loop.blocked", "task": task.name,
                                   "blocked_s": round(took, 6)})
            if self._on_block is not None:
                self._on_block(running[0] if running else None, took)
        except Exception:  # noqa: BLE001 - an instrument that raises is removed by trio
            pass


async def probe(clock: Clock, interval_s: float, observe: Callable[[float], None]) -> None:
    """Forever: sleep `interval_s`, report how much later than that the loop woke us."""
    while True:
        start = clock.now()
        await clock.sleep(interval_s)
        observe(max(0.0, clock.now() - start - interval_s))
