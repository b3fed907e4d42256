"""Supervision: strategies, restart types, intensity, escalation, logging, shutdown, tree."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.runtime.mailbox import Actor, Mailbox
from actors.runtime.registry import Registry
from actors.runtime.specs import ChildSpec, Restart, Strategy
from actors.runtime.supervisor import Supervisor, SupervisorGaveUp


class Boom(Exception):
    pass


class Probe:
    """Children whose life the test drives: `crash(name)` / `finish(name)` end the current run.

    `events` records ("start" | "exit", name) in order; an exit is recorded however
    the run ends (crash, normal return or cancellation).
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._commands: dict[str, trio.MemorySendChannel[str]] = {}

    def spec(self, name: str, restart: Restart = Restart.PERMANENT, **kw: Any) -> ChildSpec:
        async def start(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            send, receive = trio.open_memory_channel[str](1)
            self._commands[name] = send
            self.events.append(("start", name))
            try:
                task_status.started()
                command = await receive.receive()
            finally:
                self.events.append(("exit", name))
            if command == "crash":
                raise Boom(name)

        return ChildSpec(name, start, restart, **kw)

    async def crash(self, name: str) -> None:
        self._commands[name].send_nowait("crash")
        await trio.testing.wait_all_tasks_blocked()

    async def finish(self, name: str) -> None:
        self._commands[name].send_nowait("finish")
        await trio.testing.wait_all_tasks_blocked()

    def starts(self) -> list[str]:
        return [name for what, name in self.events if what == "start"]

    def take(self) -> list[tuple[str, str]]:
        events, self.events = self.events, []
        return events


def states(sup: Supervisor) -> dict[str, tuple[str, int]]:
    return {c.name: (c.state, c.restarts) for c in sup.tree().children}


async def test_one_for_one_restarts_only_the_crashed_child(nursery):
    probe = Probe()
    sup = Supervisor("root", [probe.spec(n) for n in "abc"], Strategy.ONE_FOR_ONE)
    await nursery.start(sup.run)
    probe.take()
    await probe.crash("b")
    assert probe.take() == [("exit", "b"), ("start", "b")]
    assert states(sup) == {"a": ("running", 0), "b": ("running", 1), "c": ("running", 0)}
    await sup.stop()


async def test_one_for_all_stops_the_rest_in_reverse_then_restarts_all_in_order(nursery):
    probe = Probe()
    sup = Supervisor("root", [probe.spec(n) for n in "abc"], Strategy.ONE_FOR_ALL)
    await nursery.start(sup.run)
    probe.take()
    await probe.crash("b")
    assert probe.take() == [
        ("exit", "b"),
        ("exit", "c"),
        ("exit", "a"),
        ("start", "a"),
        ("start", "b"),
        ("start", "c"),
    ]
    assert states(sup) == {"a": ("running", 1), "b": ("running", 1), "c": ("running", 1)}
    await sup.stop()


async def test_rest_for_one_restarts_the_crashed_child_and_those_after_it(nursery):
    probe = Probe()
    sup = Supervisor("root", [probe.spec(n) for n in "abcd"], Strategy.REST_FOR_ONE)
    await nursery.start(sup.run)
    probe.take()
    await probe.crash("b")
    assert probe.take() == [
        ("exit", "b"),
        ("exit", "d"),
        ("exit", "c"),
        ("start", "b"),
        ("start", "c"),
        ("start", "d"),
    ]
    assert states(sup)["a"] == ("running", 0)
    await sup.stop()


@pytest.mark.parametrize(
    ("restart", "how", "restarted", "final"),
    [
        (Restart.PERMANENT, "crash", True, "running"),
        (Restart.PERMANENT, "finish", True, "running"),
        (Restart.TRANSIENT, "crash", True, "running"),
        (Restart.TRANSIENT, "finish", False, "stopped"),
        (Restart.TEMPORARY, "crash", False, "failed"),
        (Restart.TEMPORARY, "finish", False, "stopped"),
    ],
)
async def test_restart_types(nursery, restart, how, restarted, final):
    probe = Probe()
    sup = Supervisor("root", [probe.spec("w", restart), probe.spec("other")])
    await nursery.start(sup.run)
    await getattr(probe, how)("w")
    assert probe.starts() == (["w", "other", "w"] if restarted else ["w", "other"])
    assert states(sup)["w"] == (final, int(restarted))
    assert sup.state == "running"
    await sup.stop()


async def test_temporary_child_is_not_restarted_by_a_siblings_crash(nursery):
    probe = Probe()
    children = [probe.spec("a"), probe.spec("t", Restart.TEMPORARY)]
    sup = Supervisor("root", children, Strategy.ONE_FOR_ALL)
    await nursery.start(sup.run)
    await probe.crash("a")
    assert probe.starts() == ["a", "t", "a"]
    assert states(sup)["t"] == ("stopped", 0)
    await sup.stop()


async def test_a_child_failing_to_start_is_a_crash_and_holds_back_later_children(nursery):
    attempts: list[str] = []

    async def flaky(*, task_status=trio.TASK_STATUS_IGNORED):
        attempts.append("flaky")
        if len(attempts) == 1:
            raise Boom("not yet")
        task_status.started()
        await trio.sleep_forever()

    probe = Probe()
    sup = Supervisor("root", [ChildSpec("flaky", flaky), probe.spec("after")])
    await nursery.start(sup.run)
    assert attempts == ["flaky", "flaky"]
    assert probe.starts() == ["after"]
    assert states(sup) == {"flaky": ("running", 1), "after": ("running", 0)}
    await sup.stop()


async def test_root_gives_up_when_intensity_is_exceeded(mock_clock):
    probe = Probe()
    sup = Supervisor("root", [probe.spec("a"), probe.spec("b")], max_restarts=2, max_seconds=5)
    with pytest.RaisesGroup(SupervisorGaveUp):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            for _ in range(3):
                mock_clock.jump(1)
                await probe.crash("a")
    assert sup.state == "failed"
    assert states(sup) == {"a": ("failed", 2), "b": ("stopped", 0)}
    assert probe.events[-1] == ("exit", "b")  # every child was stopped before raising


async def test_restarts_spread_beyond_the_window_never_give_up(nursery, mock_clock):
    probe = Probe()
    sup = Supervisor("root", [probe.spec("a")], max_restarts=1, max_seconds=5)
    await nursery.start(sup.run)
    for _ in range(10):
        mock_clock.jump(5.01)
        await probe.crash("a")
    assert states(sup) == {"a": ("running", 10)}
    await sup.stop()


async def test_gave_up_escalates_to_the_parent_which_restarts_the_child_supervisor(
    nursery, mock_clock, caplog
):
    probe = Probe()
    inner = Supervisor("inner", [probe.spec("w")], max_restarts=1)
    root = Supervisor("root", [probe.spec("sibling"), ChildSpec("inner", inner.run)])
    await nursery.start(root.run)
    await probe.crash("w")
    await probe.crash("w")  # second restart within 5s: inner gives up
    assert probe.starts() == ["sibling", "w", "w", "w"]  # the restarted inner started w afresh
    tree = root.tree()
    assert [(c.name, c.kind, c.state, c.restarts) for c in tree.children] == [
        ("sibling", "actor", "running", 0),
        ("inner", "supervisor", "running", 1),
    ]
    crashed = [r.actor for r in caplog.records if r.event == "actor.crashed"]
    assert crashed == ["w", "w", "inner"]
    await root.stop()


async def test_escalation_reaching_a_root_that_gives_up_raises_out(mock_clock):
    probe = Probe()
    inner = Supervisor("inner", [probe.spec("w")], max_restarts=0)
    root = Supervisor("root", [ChildSpec("inner", inner.run)], max_restarts=0)
    with pytest.RaisesGroup(SupervisorGaveUp):
        async with trio.open_nursery() as nursery:
            await nursery.start(root.run)
            await probe.crash("w")
    assert (root.state, inner.state) == ("failed", "failed")


async def test_a_crash_is_logged_once_with_traceback_and_actor_name(nursery, caplog):
    caplog.set_level(logging.ERROR, logger="jobd.actors")
    probe = Probe()
    sup = Supervisor("root", [probe.spec("a"), probe.spec("b")])
    await nursery.start(sup.run)
    await probe.crash("b")
    [record] = caplog.records
    assert (record.name, record.actor, record.event) == ("jobd.actors", "b", "actor.crashed")
    assert isinstance(record.exc_info[1], Boom)
    assert "Traceback" in caplog.text and "Boom: b" in caplog.text
    await sup.stop()


async def test_on_restart_hook_counts_every_restarted_child(nursery):
    restarted: list[str] = []
    probe = Probe()
    sup = Supervisor(
        "root", [probe.spec(n) for n in "abc"], Strategy.REST_FOR_ONE, on_restart=restarted.append
    )
    await nursery.start(sup.run)
    await probe.crash("b")
    assert restarted == ["b", "c"]
    await sup.stop()


async def test_stop_runs_in_reverse_start_order(nursery):
    probe = Probe()
    sup = Supervisor("root", [probe.spec(n) for n in "abc"])
    await nursery.start(sup.run)
    probe.take()
    await sup.stop()
    assert probe.take() == [("exit", "c"), ("exit", "b"), ("exit", "a")]
    assert sup.state == "stopped"
    assert {s for s, _ in states(sup).values()} == {"stopped"}


async def test_graceful_stop_hook_then_cancel_after_the_shutdown_timeout(autojump_clock):
    log: list[str] = []

    def child(name: str, obeys: bool) -> ChildSpec:
        stopping = trio.Event()

        async def start(*, task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            try:
                if obeys:
                    await stopping.wait()
                else:
                    await trio.sleep_forever()
                log.append(f"{name} returned at {trio.current_time():g}")
            except trio.Cancelled:
                log.append(f"{name} cancelled at {trio.current_time():g}")
                raise

        async def stop():
            log.append(f"{name} asked")
            stopping.set()

        return ChildSpec(name, start, shutdown_timeout=3, stop=stop)

    sup = Supervisor("root", [child("stubborn", False), child("polite", True)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.stop()
    assert log == [
        "polite asked",
        "polite returned at 0",
        "stubborn asked",
        "stubborn cancelled at 3",
    ]


async def test_cancelling_a_supervisor_cancels_its_children():
    probe = Probe()
    inner = Supervisor("inner", [probe.spec("w")])
    root = Supervisor("root", [probe.spec("a"), ChildSpec.for_supervisor(inner)])
    async with trio.open_nursery() as nursery:
        await nursery.start(root.run)
        nursery.cancel_scope.cancel()
    assert sorted(probe.take()) == sorted(
        [("start", n) for n in "aw"] + [("exit", n) for n in "aw"]
    )
    assert (root.state, inner.state) == ("stopped", "stopped")


class Echo(Actor[Any]):
    """Remembers what it handled; "crash" raises, setup takes a second (a slow restart)."""

    handled: list[Any] = []

    async def setup(self) -> None:
        await trio.sleep(1)

    async def handle(self, msg: Any) -> Any:
        if msg == "crash":
            raise Boom("asked to")
        Echo.handled.append(msg)
        return msg


async def test_mailbox_survives_a_restart(nursery, autojump_clock):
    Echo.handled = []
    box: Mailbox[Any] = Mailbox("echo")
    spec = ChildSpec.for_actor(lambda: Echo("echo", box))
    sup = Supervisor("root", [spec])
    await nursery.start(sup.run)
    with pytest.raises(Boom):
        await box.ask("crash")
    await box.tell("told during restart")
    assert states(sup)["echo"] == ("restarting", 1)
    assert await box.ask("after", timeout=5) == "after"
    assert Echo.handled == ["told during restart", "after"]
    await sup.stop()


def test_for_actor_rejects_a_factory_that_builds_new_mailboxes():
    async def main():
        spec = ChildSpec.for_actor(lambda: Echo("echo"))
        with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="new mailbox")):
            async with trio.open_nursery() as nursery:
                await nursery.start(spec.start)  # first actor: fine
                await nursery.start(spec.start)  # second one: a different mailbox

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_registry_names_mailboxes_and_shows_the_live_tree(nursery):
    registry = Registry()
    box: Mailbox[Any] = Mailbox("echo", capacity=5)
    probe = Probe()
    inner = Supervisor("pools", [probe.spec("crawl")], Strategy.ONE_FOR_ONE, registry=registry)
    root = Supervisor(
        "root",
        [ChildSpec("echo", probe.spec("echo").start, mailbox=box), ChildSpec.for_supervisor(inner)],
        Strategy.REST_FOR_ONE,
        registry=registry,
    )
    assert registry.lookup("echo") is box
    with pytest.raises(KeyError, match="no actor named 'nope'.*echo"):
        registry.lookup("nope")
    with pytest.raises(ValueError):
        registry.register("echo", Mailbox("other"))

    await nursery.start(root.run)
    box.tell_nowait("queued")
    await probe.crash("crawl")
    tree = registry.tree()
    assert (tree.name, tree.kind, tree.state, tree.strategy) == (
        "root",
        "supervisor",
        "running",
        "rest_for_one",
    )
    echo, pools = tree.children
    assert (echo.name, echo.kind, echo.state, echo.mailbox) == ("echo", "actor", "running", 1)
    assert (pools.kind, pools.state, pools.strategy) == ("supervisor", "running", "one_for_one")
    assert [(c.name, c.state, c.restarts) for c in pools.children] == [("crawl", "running", 1)]

    await root.stop()
    tree = registry.tree()
    assert tree.state == "stopped"
    assert [c.state for c in tree.children] == ["stopped", "stopped"]
    registry.unregister("echo")
    with pytest.raises(KeyError):
        registry.lookup("echo")


def run_crash_script(
    strategy: Strategy, n: int, script: list[tuple[int, float]], max_restarts: int, window: float
) -> tuple[list[list[str]], bool]:
    """Crash children per `script` of (index, seconds since the previous crash).

    Returns the children started again after each crash and whether the root gave up.
    """
    clock = trio.testing.MockClock()
    probe = Probe()
    names = [f"c{i}" for i in range(n)]
    sup = Supervisor("root", [probe.spec(x) for x in names], strategy, max_restarts, window)
    restarted: list[list[str]] = []

    gave_up = False

    async def main() -> None:
        nonlocal gave_up
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.run)
                for index, gap in script:
                    clock.jump(gap)
                    probe.take()
                    await probe.crash(names[index])
                    if sup.state != "running":
                        break
                    restarted.append(sorted(x for what, x in probe.take() if what == "start"))
                await sup.stop()
        except* SupervisorGaveUp:
            gave_up = True

    trio.run(main, clock=clock)
    return restarted, gave_up


@settings(max_examples=60, deadline=None)
@given(
    strategy=st.sampled_from(Strategy),
    n=st.integers(1, 5),
    data=st.data(),
    max_restarts=st.integers(0, 3),
)
def test_random_crash_sequences_follow_the_strategy_and_intensity(strategy, n, data, max_restarts):
    window = 5.0
    script = data.draw(
        st.lists(
            st.tuples(st.integers(0, n - 1), st.sampled_from([0.0, 1.0, 2.5, 6.0])), max_size=8
        )
    )
    restarted, gave_up = run_crash_script(strategy, n, script, max_restarts, window)

    times: list[float] = []
    now = 0.0
    expected: list[list[str]] = []
    expect_gave_up = False
    for index, gap in script:
        now += gap
        times = [t for t in times if t > now - window] + [now]
        if len(times) > max_restarts:
            expect_gave_up = True
            break
        if strategy is Strategy.ONE_FOR_ONE:
            expected.append([f"c{index}"])
        elif strategy is Strategy.ONE_FOR_ALL:
            expected.append(sorted(f"c{i}" for i in range(n)))
        else:
            expected.append(sorted(f"c{i}" for i in range(index, n)))
    assert (restarted, gave_up) == (expected, expect_gave_up)


async def test_an_error_while_being_stopped_is_logged_not_escalated(nursery, caplog):
    async def messy(*, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            raise Boom("cleanup failed")

    sup = Supervisor("root", [ChildSpec("messy", messy)])
    await nursery.start(sup.run)
    await sup.stop()
    assert sup.state == "stopped"
    assert [r.actor for r in caplog.records] == ["messy"]


async def test_a_tell_that_crashes_the_actor_restarts_it(nursery, autojump_clock):
    Echo.handled = []
    box: Mailbox[Any] = Mailbox("echo")
    sup = Supervisor("root", [ChildSpec.for_actor(lambda: Echo("echo", box))])
    await nursery.start(sup.run)
    await box.tell("crash")
    await box.tell("next")
    assert await box.ask("sync") == "sync"
    assert Echo.handled == ["next", "sync"]
    assert states(sup)["echo"] == ("running", 1)
    await sup.stop()
