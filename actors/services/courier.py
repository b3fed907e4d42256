"""The courier: delivers the completion webhooks' outbox (README "Webhooks").

Messages: `Deliver` (rows may be due: a NOTIFY on jobd_webhooks, a replay), `Sync`
(the config changed: write this daemon's subscriptions again) and `Stop` (the drain).

A finish writes the outbox rows in its own transaction (the trigger of migration
0017); the courier only claims due rows of the webhooks this daemon declares, POSTs
each one signed, and records the outcome. Nothing here touches the job path: a
receiver that is down holds at most its webhook's `concurrency` slots (and Outbound's
per-origin limit), never another webhook's, never a job's. Delivery is at-least-once:
a row is `delivered` only after a 2xx, and a claim is a lease (its next_attempt_at
moved past the request), so a daemon killed mid-request leaves the row due again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import trio

from actors.ports import Delivery, DeliveryOutcome, Store, StoreUnavailable, WebhookObserver
from actors.runtime.clock import Clock
from actors.runtime.mailbox import Actor, Mailbox, MailboxClosed
from actors.services.outbound import Outbound, Response
from protocol.webhook_signing import secret_key, sign_headers

log = logging.getLogger("jobd.courier")


class Deliver(msgspec.Struct, tag="deliver"):
    """Rows may be due now: claim again."""


class Sync(msgspec.Struct, tag="sync"):
    """Write this daemon's subscriptions (after a reload) and prune now."""


class Stop(msgspec.Struct, tag="stop"):
    """Claim no more; let the requests in flight end and their outcomes be written,
    then return (a drain: what is not written by then is sent again after its lease)."""


CourierMsg = Deliver | Sync | Stop


@dataclass(frozen=True)
class Subscription:
    """One `[[webhooks]]` entry as the courier uses it; the keys never print."""

    name: str
    url: str = field(repr=False)  # may carry a token in its query
    keys: tuple[bytes, ...] = field(repr=False)
    events: tuple[str, ...] = ("completed", "failed", "cancelled")
    kinds: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()
    timeout_s: float = 10.0
    retry_for_s: float = 86400.0
    backoff_s: float = 5.0
    max_backoff_s: float = 3600.0
    concurrency: int = 10
    keep_delivered_s: float = 86400.0
    keep_failed_s: float = 7 * 86400.0

    @classmethod
    def signed_with(cls, secrets: list[str], **fields: object) -> Subscription:
        return cls(keys=tuple(secret_key(s) for s in secrets), **fields)  # type: ignore[arg-type]

    def declared(self) -> dict[str, object]:
        """What the database matches finishes against (no URL, no secret)."""
        return {"name": self.name, "events": list(self.events), "kinds": list(self.kinds),
                "queues": list(self.queues)}


class CourierSettings(msgspec.Struct, kw_only=True):
    lease_margin_s: float = 5.0  # a claim's lease: the request timeout plus this
    poll_s: float = 10.0  # the longest wait without a NOTIFY (a lost one costs this)
    maintain_every_s: float = 60.0  # subscriptions written again, old rows pruned
    backlog_every_s: float = 5.0  # the backlog gauges
    prune_batch: int = 1000
    others_max_age_s: float = 7 * 86400.0  # finished rows of webhooks this daemon lacks
    max_store_backoff_s: float = 5.0


def backoff(sub: Subscription, attempts: int, rng: random.Random) -> float:
    """The wait before the next attempt: doubling from `backoff_s`, capped, +-25 %."""
    delay = min(sub.backoff_s * 2.0 ** min(max(attempts - 1, 0), 64), sub.max_backoff_s)
    return delay * rng.uniform(0.75, 1.25)


def retry_after(response: Response) -> float | None:
    """A 429's or 503's Retry-After in seconds (a date is ignored: backoff applies)."""
    if response.status not in (429, 503):
        return None
    try:
        value = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return value if 0 <= value < 1e9 else None


def decide(sub: Subscription, delivery: Delivery, elapsed_s: float,
           response: Response | None, error: str | None, rng: random.Random) -> DeliveryOutcome:
    """A 2xx delivers; anything else (another status, no response) retries until the
    row has been retried for `retry_for`, then fails it. The last retry is moved up to
    the window's end, so a window is never wasted on a long backoff."""
    status = response.status if response is not None else None
    if status is not None and 200 <= status < 300:
        return DeliveryOutcome(id=delivery.id, attempts=delivery.attempts, state="delivered",
                               status=status)
    if error is None:
        error = f"HTTP {status}"
    left = sub.retry_for_s - (delivery.age_s + elapsed_s)
    if left <= 0:
        return DeliveryOutcome(id=delivery.id, attempts=delivery.attempts, state="failed",
                               status=status, error=error)
    asked = retry_after(response) if response is not None else None
    delay = min(asked, sub.max_backoff_s) if asked is not None else \
        backoff(sub, delivery.attempts, rng)
    return DeliveryOutcome(id=delivery.id, attempts=delivery.attempts, state="pending",
                           delay_s=min(delay, left), status=status, error=error)


def reason(outcome: DeliveryOutcome) -> str:
    """The retry's label: status_4xx, status_5xx, ... or the error's kind."""
    if outcome.status is not None:
        return f"status_{outcome.status // 100}xx"
    text = outcome.error or ""
    return "timeout" if text.startswith(("timeout", "ReadTimeout", "ConnectTimeout",
                                         "WriteTimeout", "PoolTimeout")) else "network"


class Courier(Actor[CourierMsg]):
    def __init__(self, mailbox: Mailbox[CourierMsg], store: Store, outbound: Outbound, *,
                 daemon_id: str, subscriptions: Callable[[], dict[str, Subscription]],
                 observer: WebhookObserver, clock: Clock,
                 settings: CourierSettings | None = None, rng: random.Random | None = None):
        """`subscriptions()` is read on every pass, so a reload applies at the next one."""
        super().__init__(mailbox.name, mailbox)
        self._store = store
        self._outbound = outbound
        self._daemon_id = daemon_id
        self._subscriptions = subscriptions
        self._observer = observer
        self._clock = clock
        self.settings = settings or CourierSettings()
        self._rng = rng or random.Random()
        self._in_flight: dict[str, int] = {}
        self._kicked = trio.Event()
        self._sync_now = trio.Event()
        self._records: list[DeliveryOutcome] = []
        self._records_ready = trio.Event()
        self._writing = False
        self._stopping = False
        self._settled = trio.Event()  # set whenever an attempt or a record ends

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive)
            nursery.start_soon(self._maintain)
            nursery.start_soon(self._record)
            task_status.started()
            await self._deliver(nursery)
            nursery.cancel_scope.cancel()

    async def handle(self, msg: CourierMsg) -> None:
        if isinstance(msg, Sync):
            self._sync_now.set()
        elif isinstance(msg, Stop):
            self._stopping = True
        self._kicked.set()

    @staticmethod
    def stopper(mailbox: Mailbox[CourierMsg]) -> Callable[[], Awaitable[None]]:
        """A ChildSpec `stop` hook: the courier returns once drained (see Stop)."""

        async def stop() -> None:
            try:
                await mailbox.tell(Stop())
            except MailboxClosed:
                pass

        return stop

    async def _receive(self) -> None:
        async for envelope in self.mailbox:
            await self.dispatch(envelope)

    # -- delivering ------------------------------------------------------------------

    async def _deliver(self, nursery: trio.Nursery) -> None:
        pause = 0.0
        while not self._stopping:
            self._kicked = trio.Event()  # a kick from here on ends the wait below
            subs = self._subscriptions()
            wanted = {name: free for name, s in subs.items() if (free := self.free(s))}
            wait = self.settings.poll_s
            try:
                claimed = await self.claim(wanted, subs)
                for delivery in claimed:
                    self._in_flight[delivery.webhook] = self._in_flight.get(delivery.webhook, 0) + 1
                    nursery.start_soon(self._attempt, subs[delivery.webhook], delivery)
                if claimed and len(claimed) == sum(wanted.values()):
                    continue  # there may be more due
                if wanted:
                    due = await self._store.next_delivery_due(sorted(wanted))
                    if due is not None:
                        # Due now yet not claimed: another daemon's claim holds those
                        # rows this instant; look again shortly, not in a spin.
                        wait = min(wait, max(due, 0.05))
                pause = 0.0
            except StoreUnavailable as exc:
                pause = min(max(pause * 2, 0.25), self.settings.max_store_backoff_s)
                log.debug("webhook claim skipped: %s", exc, extra={"event": "courier.unavailable"})
                wait = pause
            with trio.move_on_after(wait):
                await self._kicked.wait()
        while any(self._in_flight.values()) or self._records or self._writing:
            self._settled = trio.Event()
            await self._settled.wait()

    def free(self, sub: Subscription) -> int:
        """Slots to claim for now: none until half of them are free (or all are), so a
        busy webhook costs a claim per half-window of deliveries, not one each."""
        busy = self._in_flight.get(sub.name, 0)
        free = sub.concurrency - busy
        return free if busy == 0 or free >= max(1, sub.concurrency // 2) else 0

    async def claim(self, wanted: dict[str, int],
                    subs: dict[str, Subscription]) -> list[Delivery]:
        """One claim of due rows for the free slots in `wanted`; the lease covers the
        longest timeout among them."""
        if not wanted:
            return []
        lease_s = max(subs[n].timeout_s for n in wanted) + self.settings.lease_margin_s
        claimed = await self._store.claim_deliveries(self._daemon_id, wanted, lease_s)
        return [d for d in claimed if d.webhook in subs]

    async def _attempt(self, sub: Subscription, delivery: Delivery) -> None:
        try:
            outcome = await self.attempt(sub, delivery)
            self._records.append(outcome)
            self._records_ready.set()
        finally:
            self._in_flight[delivery.webhook] -= 1
            self._kicked.set()
            self._settled.set()

    async def attempt(self, sub: Subscription, delivery: Delivery) -> DeliveryOutcome:
        """POST one row, signed; the outcome to record (never raises for the receiver's
        sake: a refusal, a reset, a timeout are outcomes)."""
        body = delivery.payload.encode()
        # Stable per row, so a receiver dedupes the retries of one finish.
        headers = sign_headers(list(sub.keys), f"msg_{delivery.id}", body, now=time.time())
        started = self._clock.now()
        response: Response | None = None
        error: str | None = None
        with trio.move_on_after(sub.timeout_s) as deadline:
            try:
                response = await self._outbound.post(sub.url, body, headers, sub.timeout_s)
            except Exception as exc:  # noqa: BLE001 - whatever the request raised is this row's outcome
                error = _describe(exc, sub)
        if deadline.cancelled_caught:
            error = f"timeout: no answer within {sub.timeout_s:g} s"
        elapsed = self._clock.now() - started
        outcome = decide(sub, delivery, elapsed, response, error, self._rng)
        self._observer.webhook_attempt(sub.name, outcome.state,
                                       reason(outcome) if outcome.state != "delivered" else "",
                                       elapsed)
        if outcome.state == "failed":
            log.warning("webhook %s gave up on outbox row %d (job %d) after %d attempts: %s",
                        sub.name, delivery.id, delivery.job_id, delivery.attempts, outcome.error,
                        extra={"event": "webhook.failed", "webhook": sub.name,
                               "outbox_id": delivery.id, "job_id": delivery.job_id})
        return outcome

    async def _record(self) -> None:
        """Outcomes in batches (all that finished since the last write). While the
        store is down they wait here; if the daemon dies first, their rows come due
        again when their lease passes and are sent again (at-least-once)."""
        pause = 0.0
        while True:
            await self._records_ready.wait()
            self._records_ready = trio.Event()
            batch, self._records = self._records, []
            self._writing = True
            try:
                await self._store.record_deliveries(batch)
                pause = 0.0
            except StoreUnavailable as exc:
                self._records = batch + self._records
                self._records_ready.set()
                pause = min(max(pause * 2, 0.25), self.settings.max_store_backoff_s)
                log.debug("webhook record deferred: %s", exc, extra={"event": "courier.unavailable"})
                await self._clock.sleep(pause)
            finally:
                self._writing = False
                self._settled.set()

    # -- upkeep ------------------------------------------------------------------------

    async def _maintain(self) -> None:
        next_upkeep = self._clock.now() + self.settings.maintain_every_s
        while True:
            subs = self._subscriptions()
            try:
                await self.backlog(subs)
                if self._sync_now.is_set() or self._clock.now() >= next_upkeep:
                    self._sync_now = trio.Event()
                    await self.upkeep(subs)
                    next_upkeep = self._clock.now() + self.settings.maintain_every_s
            except StoreUnavailable as exc:
                log.debug("webhook upkeep skipped: %s", exc, extra={"event": "courier.unavailable"})
            with trio.move_on_after(self.settings.backlog_every_s):
                await self._sync_now.wait()

    async def upkeep(self, subs: dict[str, Subscription]) -> int:
        """Write the subscriptions again (a reload, a daemon forgotten meanwhile) and
        prune finished rows past their retention; how many rows were pruned."""
        await self._store.sync_webhooks(self._daemon_id, [s.declared() for s in subs.values()])
        ages = {n: (s.keep_delivered_s, s.keep_failed_s) for n, s in subs.items()}
        pruned = 0
        while n := await self._store.prune_deliveries(
                ages, self.settings.prune_batch, self.settings.others_max_age_s):
            pruned += n
            if n < self.settings.prune_batch:
                break
        return pruned

    async def backlog(self, subs: dict[str, Subscription]) -> None:
        rows = await self._store.delivery_backlog(sorted(subs)) if subs else {}
        self._observer.webhook_backlog({n: rows.get(n, (0, 0.0)) for n in subs})


def _describe(exc: BaseException, sub: Subscription) -> str:
    """One line for the row's last_error and the log; the URL (which may carry a token)
    is replaced by the webhook's name."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text.replace(sub.url, f"<{sub.name}>")[:500]
