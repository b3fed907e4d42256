"""What a supervisor is told to run: the strategy, each child's restart type, its spec.

Kept apart from the supervisor loop so the composition root (and tests) can build a
tree of specs without reading how restarts are carried out.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from actors.runtime.mailbox import Actor, Mailbox


class Strategy(enum.Enum):
    ONE_FOR_ONE = "one_for_one"  # restart only the child that exited
    ONE_FOR_ALL = "one_for_all"  # restart every running child
    REST_FOR_ONE = "rest_for_one"  # restart the child and those started after it


class Restart(enum.Enum):
    PERMANENT = "permanent"  # always restarted
    TRANSIENT = "transient"  # restarted only after an exception
    TEMPORARY = "temporary"  # never restarted, not even when a sibling triggers a restart


class Supervised(Protocol):
    """A nested supervisor as a child sees it: a name and a `run` to start it with."""

    name: str

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


@dataclass(eq=False)
class ChildSpec:
    """How to run one child.

    `start` is awaited as `start(task_status=...)` through `nursery.start`, so it must
    call `task_status.started()` once it is up. On shutdown the supervisor awaits
    `stop()` (if given), waits for the child to return, and cancels it once
    `shutdown_timeout` has passed; without `stop` the child is cancelled at once.
    A `Supervisor.run` passed as `start` gets `Supervisor.stop` as its default `stop`.
    """

    name: str
    start: Callable[..., Awaitable[None]]
    restart: Restart = Restart.PERMANENT
    shutdown_timeout: float = 5.0
    mailbox: Mailbox[Any] | None = None
    stop: Callable[[], Awaitable[None]] | None = None

    @classmethod
    def for_actor(
        cls,
        factory: Callable[[], Actor[Any]],
        *,
        restart: Restart = Restart.PERMANENT,
        shutdown_timeout: float = 5.0,
        stop: Callable[[], Awaitable[None]] | None = None,
    ) -> ChildSpec:
        """A child that runs a fresh `factory()` actor on every (re)start.

        The factory must hand every actor the same Mailbox (build it once and close
        over it); the first actor is built here to learn the name and mailbox, and each
        later one is checked, because a new mailbox would silently strand messages.
        """
        first = factory()
        mailbox = first.mailbox
        unused = [first]

        async def start(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            actor = unused.pop() if unused else factory()
            if actor.mailbox is not mailbox:
                raise RuntimeError(f"factory for {first.name!r} built an actor with a new mailbox")
            await actor.run(task_status=task_status)

        return cls(first.name, start, restart, shutdown_timeout, mailbox, stop)

    @classmethod
    def for_supervisor(
        cls,
        supervisor: Supervised,
        *,
        restart: Restart = Restart.PERMANENT,
        shutdown_timeout: float = math.inf,
    ) -> ChildSpec:
        """A nested supervisor; by default it gets all the time its own children need."""
        return cls(supervisor.name, supervisor.run, restart, shutdown_timeout)
