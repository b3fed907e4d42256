"""OTP-style supervision: the loop that starts children, restarts them by their spec
(actors/runtime/specs.py) within a restart intensity, and stops them in order.

Each child runs in its own cancel scope inside the supervisor's nursery, so cancelling
a supervisor cancels its whole subtree and nothing is orphaned. A child that exits on
its own reports to the supervisor loop over a channel; children the supervisor stops
itself do not report, so the loop only ever reacts to unrequested exits.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio

from actors.runtime.clock import Clock, TrioClock
from actors.runtime.registry import Registry
from actors.runtime.specs import ChildSpec, Restart, Strategy
from protocol.tree import TreeNode

log = logging.getLogger("jobd.actors")


class SupervisorGaveUp(Exception):
    """Restart intensity exceeded; the parent supervisor sees this as its child crashing."""


class _Incarnation:
    """One run of a child; a restart makes a new one, which is how stale reports are spotted."""

    __slots__ = ("scope", "done", "stopping")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.stopping = False


@dataclass(eq=False)
class _Child:
    spec: ChildSpec
    index: int
    nested: Supervisor | None
    state: str = "stopped"
    restarts: int = 0
    current: _Incarnation | None = None


class _Status:
    """Wraps the real task_status so the supervisor knows whether the child came up."""

    def __init__(self, inner: trio.TaskStatus[Any]) -> None:
        self.inner = inner
        self.up = False

    def started(self, value: Any = None) -> None:
        self.up = True
        self.inner.started(_UP)


_UP = object()  # returned by _start_child for a child that called started()
_STOP = object()  # sent on the supervisor's channel by stop()


class Supervisor:
    def __init__(
        self,
        name: str,
        children: list[ChildSpec],
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        clock: Clock | None = None,
        registry: Registry | None = None,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        names = [c.name for c in children]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate child names under {name!r}: {names}")
        self.name = name
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self._clock = clock or TrioClock()
        self._registry = registry
        self._on_restart = on_restart
        self._children = [_Child(spec, i, _nested(spec)) for i, spec in enumerate(children)]
        self._state = "stopped"
        self._restart_times: deque[float] = deque()
        self._events: trio.MemorySendChannel[Any] | None = None
        self._exited = trio.Event()
        # Names are bound for the supervisor's lifetime, not per run: mailboxes outlive
        # restarts, so a caller may look a name up while its actor is down.
        if registry is not None:
            for spec in children:
                if spec.mailbox is not None:
                    registry.register(spec.name, spec.mailbox)

    @property
    def state(self) -> str:
        return self._state

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children in order, supervise them until `stop()`, then stop them.

        Raises SupervisorGaveUp (after stopping every child) when restart intensity is
        exceeded. Cancelling this task cancels every child.
        """
        if self._registry is not None and self._registry.root is None:
            self._registry.set_root(self)
        # Unbounded on purpose: the only producers are our own children, each incarnation
        # reports at most once, and restart intensity bounds the number of incarnations.
        self._events, events = trio.open_memory_channel[Any](math.inf)
        self._exited = trio.Event()
        self._restart_times.clear()
        self._state = "starting"
        gave_up: SupervisorGaveUp | None = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._start_all(nursery, self._children)
                    self._state = "running"
                    task_status.started()
                    async for event in events:
                        if event is _STOP:
                            break
                        child, incarnation, outcome = event
                        if child.current is incarnation:  # else a restart already replaced it
                            await self._start_all(nursery, await self._on_exit(child, outcome))
                except SupervisorGaveUp as exc:
                    # Raised outside the nursery below, or it would arrive as an ExceptionGroup.
                    gave_up = exc
                self._state = "stopping"
                await self._stop(self._children)
        finally:
            self._state = "failed" if gave_up is not None else "stopped"
            for child in self._children:
                if child.current is not None:  # cancelled from outside with the nursery
                    child.current = None
                    child.state = "stopped"
            self._events = None
            events.close()
            self._exited.set()
        if gave_up is not None:
            raise gave_up

    async def stop(self) -> None:
        """Stop the children in reverse start order, then return once `run()` has ended."""
        if self._events is None:
            return
        if self._state in ("starting", "running"):
            self._events.send_nowait(_STOP)
        await self._exited.wait()

    def tree(self) -> TreeNode:
        return TreeNode(
            name=self.name,
            kind="supervisor",
            state=self._state,
            strategy=self.strategy.value,
            children=[_node(c) for c in self._children],
        )

    async def _start_all(self, nursery: trio.Nursery, children: Iterable[_Child]) -> None:
        todo = sorted(children, key=lambda c: c.index)
        while todo:
            child = todo.pop(0)
            outcome = await self._start_child(nursery, child)
            if outcome is not _UP:
                # Failing to start is a crash; its restarts join this pass instead of recursing.
                assert outcome is None or isinstance(outcome, Exception)
                more = await self._on_exit(child, outcome)
                todo = sorted({*todo, *more}, key=lambda c: c.index)

    async def _start_child(self, nursery: trio.Nursery, child: _Child) -> object:
        if child.state != "restarting":  # a restart reads "restarting" until it is up
            child.state = "starting"
        outcome = await nursery.start(self._child_task, child)
        if outcome is _UP:
            child.state = "running"
        return outcome

    async def _child_task(self, child: _Child, *, task_status: trio.TaskStatus[object]) -> None:
        incarnation = child.current = _Incarnation()
        status = _Status(task_status)
        outcome: Exception | None = None
        try:
            # The scope sits inside the try so that an error raised while we cancel the
            # child reaches the except below with the Cancelled already stripped off.
            try:
                with incarnation.scope:
                    await child.spec.start(task_status=status)
            except Exception as exc:
                # Logged here, before any checkpoint, so the record is written exactly
                # once and before anyone else (an asker) re-raises the same object.
                self._log_crash(child, exc)
                outcome = exc
        finally:
            incarnation.done.set()
        if not status.up:
            task_status.started(outcome)  # _start_child handles it in line
        elif not incarnation.stopping and self._events is not None:
            self._events.send_nowait((child, incarnation, outcome))

    def _log_crash(self, child: _Child, exc: Exception) -> None:
        log.error(
            "actor %s crashed under %s: %r",
            child.spec.name,
            self.name,
            exc,
            exc_info=exc,
            extra={"actor": child.spec.name, "supervisor": self.name, "event": "actor.crashed"},
        )

    async def _on_exit(self, child: _Child, outcome: Exception | None) -> list[_Child]:
        """Decide what an unrequested exit means; returns the children to start again."""
        child.current = None
        crashed = outcome is not None
        kind = child.spec.restart
        if kind is Restart.TEMPORARY or (kind is Restart.TRANSIENT and not crashed):
            child.state = "failed" if crashed else "stopped"
            return []
        self._count_restart(child, outcome)
        if self.strategy is Strategy.ONE_FOR_ONE:
            affected = [child]
        elif self.strategy is Strategy.ONE_FOR_ALL:
            affected = list(self._children)
        else:
            affected = self._children[child.index :]
        siblings = [c for c in affected if c is not child and c.current is not None]
        await self._stop(siblings)
        restarting = [child] + [c for c in siblings if c.spec.restart is not Restart.TEMPORARY]
        for c in restarting:
            c.state = "restarting"
            c.restarts += 1
            if self._on_restart is not None:
                self._on_restart(c.spec.name)
        return restarting

    def _count_restart(self, child: _Child, outcome: Exception | None) -> None:
        # One entry per restart decision, however many siblings it takes down (as in OTP).
        now = self._clock.now()
        self._restart_times.append(now)
        while self._restart_times[0] <= now - self.max_seconds:
            self._restart_times.popleft()
        if len(self._restart_times) > self.max_restarts:
            child.state = "failed"
            raise SupervisorGaveUp(
                f"supervisor {self.name!r} gave up: more than {self.max_restarts} restarts "
                f"in {self.max_seconds}s, the last for {child.spec.name!r}"
            ) from outcome

    async def _stop(self, children: Iterable[_Child]) -> None:
        for child in sorted(children, key=lambda c: c.index, reverse=True):
            await self._stop_child(child)

    async def _stop_child(self, child: _Child) -> None:
        incarnation = child.current
        if incarnation is None:
            return
        child.current = None
        incarnation.stopping = True
        if not incarnation.done.is_set():
            child.state = "stopping"
            stop = child.spec.stop or (child.nested.stop if child.nested else None)
            try:
                with trio.move_on_after(child.spec.shutdown_timeout):
                    if stop is not None:
                        await stop()
                        await incarnation.done.wait()
            finally:
                incarnation.scope.cancel()
                with trio.CancelScope(shield=True):
                    await incarnation.done.wait()
        child.state = "stopped"


def _nested(spec: ChildSpec) -> Supervisor | None:
    owner = getattr(spec.start, "__self__", None)
    return owner if isinstance(owner, Supervisor) else None


def _node(child: _Child) -> TreeNode:
    if child.nested is not None:
        node = child.nested.tree()
        node.name = child.spec.name
        node.state = child.state  # the parent's view also covers "restarting"
        node.restarts = child.restarts
        return node
    mailbox = child.spec.mailbox
    return TreeNode(
        name=child.spec.name,
        kind="actor",
        state=child.state,
        restarts=child.restarts,
        mailbox=mailbox.qsize() if mailbox is not None else None,
    )
