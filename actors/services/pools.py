"""The pools: one dispatcher per queue under the `pools` supervisor, and what the rest
of the daemon asks of them together.

`Pools` is not an actor with a mailbox of its own: it owns its children's mailboxes
(one per queue, outliving dispatcher restarts) and the state they share, and routes to
them. The messages its dispatchers accept are in `actors/services/dispatcher.py`
(Wake, CancelJob, LeaseLost, Drain, Release, Resize, Running); here they are sent to
every queue (or one) without waiting, except where a drain must be heard.

What it owns: the pause set (read by every claim, refreshed on NOTIFY and at start),
cancel routing (a cancel or a lost lease goes to every pool: a job's queue is not
known here), the drain (stop claiming, wait until idle within a grace, then release
what still runs), `jobctl drain`, and the resize on reload.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import trio

from actors.ports import Observer, Store, StoreUnavailable
from actors.runtime.clock import Clock
from actors.runtime.mailbox import Mailbox, MailboxClosed
from actors.runtime.registry import Registry
from actors.runtime.supervisor import ChildSpec, Strategy, Supervisor
from actors.services.completer import Outcomes
from actors.services.dispatcher import (
    CancelJob,
    Dispatcher,
    DispatcherMsg,
    Drain,
    LeaseLost,
    QueueSettings,
    Release,
    Resize,
    Wake,
)
from actors.services.worker import AttemptRunner
from protocol import commands as c

log = logging.getLogger("jobd.pools")

# After the drain grace and the release, how long the released attempts get to end.
_RELEASE_S = 10


class Pools:
    def __init__(
        self,
        queues: list[str],
        *,
        settings: Callable[[str], QueueSettings],
        daemon_id: str,
        store: Store,
        runner: AttemptRunner,
        outcomes: Outcomes,
        kinds: Callable[[], list[str]],
        observer: Observer,
        clock: Clock,
        status_changed: Callable[[], object] = lambda: None,
    ):
        """`settings(queue)`: the queue's dispatcher settings from the current config
        (read again by `resize` after a reload). `status_changed`: the draining state
        changed (the daemon's status line says it)."""
        self._settings = settings
        self._daemon_id = daemon_id
        self._store = store
        self._runner = runner
        self._outcomes = outcomes
        self._kinds = kinds
        self._observer = observer
        self._clock = clock
        self._status_changed = status_changed
        self.boxes: dict[str, Mailbox[DispatcherMsg]] = {
            queue: Mailbox(f"pool:{queue}", capacity=1000) for queue in queues}
        self.dispatchers: dict[str, Dispatcher] = {}
        self.pauses: set[tuple[str, str]] = set()  # (queue, key); key "" = the whole queue
        self.draining = False
        self._idle = trio.Event()  # set by a dispatcher that may have become idle

    # -- the tree ----------------------------------------------------------------------

    def supervisor(self, registry: Registry, on_restart: Callable[[str], None]) -> Supervisor:
        children = [ChildSpec.for_actor(self._factory(queue)) for queue in self.boxes]
        return Supervisor("pools", children, Strategy.ONE_FOR_ONE, registry=registry,
                          on_restart=on_restart)

    def _factory(self, queue: str) -> Callable[[], Dispatcher]:
        box = self.boxes[queue]
        settings = self._settings(queue)

        def make() -> Dispatcher:
            dispatcher = Dispatcher(
                box, settings, daemon_id=self._daemon_id, store=self._store,
                runner=self._runner, finish=self._outcomes.hand_over,
                finish_nowait=self._outcomes.hand_over_nowait, kinds=self._kinds,
                paused=self.paused, observer=self._observer, clock=self._clock,
                on_idle=self._signal_idle)
            self.dispatchers[queue] = dispatcher
            return dispatcher

        return make

    # -- what is running here ------------------------------------------------------------

    @property
    def queues(self) -> set[str]:
        return set(self.boxes)

    def running_here(self) -> dict[str, tuple[int, int]]:
        return {q: (d.running, d.settings.concurrency) for q, d in self.dispatchers.items()}

    def running(self) -> int:
        return sum(d.running for d in self.dispatchers.values())

    def lease_ids(self) -> list[tuple[int, int]]:
        """The (job, lease token) pairs whose leases the heart renews: attempts running
        here, and attempts that ended here but whose outcome is not written yet (an
        outage): nobody may rescue and re-run a job whose result we hold."""
        pairs = {a for d in self.dispatchers.values() for a in d.running_attempts()}
        pairs.update(self._outcomes.leases())
        return list(pairs)

    # -- pauses ------------------------------------------------------------------------

    def paused(self, queue: str) -> tuple[bool, list[str]]:
        keys = [k for q, k in self.pauses if q == queue]
        return "" in keys, [k for k in keys if k]

    async def refresh_pauses(self) -> None:
        try:
            self.pauses = set(await self._store.list_pauses())
        except StoreUnavailable:
            return  # the LISTEN reconnect refreshes again
        self.wake()

    # -- routing -------------------------------------------------------------------------

    def wake(self, queue: str | None = None) -> None:
        """Jobs may be claimable in `queue` (None: in any)."""
        if queue is None:
            targets = list(self.boxes.values())
        else:
            box = self.boxes.get(queue)
            targets = [box] if box is not None else []
        self._tell_nowait(targets, Wake())  # a full mailbox is busy; it claims again anyway

    def cancel_nowait(self, job_id: int) -> None:
        self._tell_nowait(self.boxes.values(), CancelJob(job_id))  # else the next beat finds it

    def lease_lost_nowait(self, job_id: int, token: int) -> None:
        self._tell_nowait(self.boxes.values(), LeaseLost(job_id, token))  # else the next beat

    async def cancel_here(self, job_id: int) -> None:
        self.cancel_nowait(job_id)

    @staticmethod
    def _tell_nowait(boxes: Iterable[Mailbox[DispatcherMsg]], msg: DispatcherMsg) -> None:
        for box in list(boxes):
            try:
                box.tell_nowait(msg)
            except (trio.WouldBlock, MailboxClosed):
                pass  # busy (it claims again anyway) or restarting (it starts by claiming)

    # -- drain and resize ----------------------------------------------------------------

    async def set_draining(self, draining: bool) -> c.DrainResult:
        """`jobctl drain`: stop claiming here (for a deploy) without stopping the daemon."""
        self.draining = draining
        for box in self.boxes.values():
            await box.tell(Drain(undo=not draining))
        self._status_changed()
        log.info("draining" if draining else "claiming again",
                 extra={"event": "daemon.draining" if draining else "daemon.undrained"})
        return c.DrainResult(daemon_id=self._daemon_id, draining=draining)

    async def drain(self, grace_s: float) -> None:
        """Stop claiming; let what runs finish within `grace_s`; then release the rest
        (their jobs go back to the queue) and give them a bounded time to end."""
        self.draining = True
        for box in self.boxes.values():
            await box.tell(Drain())
        with trio.move_on_after(grace_s):
            # Busy includes a claim in flight: its jobs are ours once it returns.
            await self._until(lambda: not any(d.busy for d in self.dispatchers.values()))
        left = self.running()
        if left:
            log.warning("drain grace over; releasing %d running jobs", left,
                        extra={"event": "daemon.released", "jobs": left})
            for box in self.boxes.values():
                await box.tell(Release())
            with trio.move_on_after(_RELEASE_S):
                await self._until(lambda: self.running() == 0)

    async def resize(self) -> None:
        """After a reload: each queue's new slots and flow limits."""
        for queue, box in self.boxes.items():
            s = self._settings(queue)
            await box.tell(Resize(s.concurrency, s.limits, s.recheck_s))

    def _signal_idle(self) -> None:
        self._idle.set()

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            self._idle = trio.Event()
            await self._idle.wait()
