"""The one job builder (actors/jobs.py): an enqueue, a workflow child and a schedule's
occurrence of one kind take the same defaults from its declaration, key and cost
included, from a registry of the test's own."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from actors import jobs
from actors.context import Context, JobInfo
from actors.errors import InvalidArgs, UnknownKind
from actors.handlers import HANDLERS, Handlers
from actors.ports import ScheduleDef
from actors.schedule_jobs import definition, occurrence
from actors.workflow import Child
from protocol.errors import ErrorCode, JobdError
from protocol.jobs import JobSpec
from protocol.schedules import ScheduleSpec

T0 = datetime(2025, 1, 1, 6, tzinfo=UTC)


class Charge(msgspec.Struct):
    shop: str
    tokens: int = 1


@pytest.fixture
def registry() -> Handlers:
    own = Handlers()

    @own.job("charge", queue="billing", priority=3, max_attempts=7, timeout="90s",
             key=lambda a: f"shop:{a.shop}", cost=lambda a: a.tokens)
    async def charge(ctx: Context, args: Charge) -> None:
        return None

    @own.job("badcost", cost=lambda a: 1 // 0)
    async def badcost(ctx: Context, args: Charge) -> None:
        return None

    return own


def parent() -> JobInfo:
    return JobInfo(id=1, kind="parent", queue="parents", key=None, attempt=1, max_attempts=3,
                   tags=[], unique_key=None, priority=-1, run_at=T0, created_at=T0, errors=[])


def schedule_row(registry: Handlers, **options) -> ScheduleDef:
    return definition(registry, ScheduleSpec(name="nightly", kind="charge", every="1h",
                                             args={"shop": "acme", "tokens": 5}, **options))


DECLARED = {"kind": "charge", "args": '{"shop":"acme","tokens":5}', "queue": "billing",
            "key": "shop:acme", "priority": 3, "max_attempts": 7, "timeout_s": 90.0, "cost": 5}


def declared(row) -> dict:
    return {f: getattr(row, f) for f in DECLARED}


def test_every_surface_takes_the_declaration_key_and_cost_included(registry):
    args = {"shop": "acme", "tokens": 5}
    rows = {
        "enqueue": jobs.from_spec(registry, JobSpec(kind="charge", args=args)),
        "spawn": jobs.child(registry, Child(kind="charge", args=args), parent()),
        "schedule": occurrence(registry, schedule_row(registry), T0).job,
    }
    for surface, row in rows.items():
        assert declared(row) == DECLARED, surface
    fired = rows["schedule"]
    assert fired.unique_key == "schedule:nightly:2025-01-01T06:00:00+00:00"
    assert fired.tags == ["schedule:nightly", "fire:2025-01-01T06:00:00+00:00"]


def test_what_a_surface_sets_wins_over_the_declaration(registry):
    row = jobs.child(registry, Child(kind="charge", args={"shop": "a"}, queue="q", key="k",
                                     priority=9, max_attempts=2, timeout_s=5.0), parent())
    assert (row.queue, row.key, row.priority, row.max_attempts, row.timeout_s, row.cost) == (
        "q", "k", 9, 2, 5.0, 1)
    fired = occurrence(registry, schedule_row(registry, queue="q", priority=1), T0).job
    assert (fired.queue, fired.priority, fired.cost) == ("q", 1, 5)


def test_a_child_of_a_kind_declared_elsewhere_takes_the_parents_queue_and_priority(registry):
    row = jobs.child(registry, Child(kind="elsewhere", args={"x": 1}), parent())
    assert (row.queue, row.priority, row.max_attempts, row.cost, row.args) == (
        "parents", -1, 3, 1, '{"x":1}')
    with pytest.raises(UnknownKind):
        jobs.build(registry, "elsewhere", {})


def test_a_failing_cost_function_is_invalid_args_on_every_surface(registry):
    with pytest.raises(JobdError) as info:
        jobs.from_spec(registry, JobSpec(kind="badcost", args={"shop": "a"}))
    assert info.value.code == ErrorCode.INVALID_ARGS and "key/cost" in info.value.message
    with pytest.raises(InvalidArgs, match="key/cost"):
        jobs.child(registry, Child(kind="badcost", args={"shop": "a"}), parent())


def test_registries_are_independent_and_restore_a_snapshot(registry):
    assert registry.kinds() == ["badcost", "charge"]
    assert "charge" not in HANDLERS.kinds()  # the test's own, not the default one
    with pytest.raises(UnknownKind, match="registered: badcost, charge"):
        registry.lookup("nope")
    saved = registry.registered()

    @registry.job("late")
    async def late(ctx: Context, args: Charge) -> None:
        return None

    assert registry.get("late") is not None
    registry.restore(saved)
    assert registry.kinds() == ["badcost", "charge"] and registry.get("late") is None
