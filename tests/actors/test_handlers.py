"""The handler API (@job, decode_args, Context.progress) and enqueue-time validation."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from actors import jobs
from actors.context import Context, JobInfo
from actors.errors import InvalidArgs, UnknownKind
from actors.handlers import HANDLERS, Handlers, job
from actors.jobdef import JobDef
from actors.ports import NewJob
from protocol.errors import ErrorCode, JobdError
from protocol.jobs import JobSpec


class ResizeArgs(msgspec.Struct):
    url: str
    width: int = 100


class ShopArgs(msgspec.Struct):
    shop: str
    count: int


@pytest.fixture(autouse=True)
def registry(empty_handlers) -> Iterator[Handlers]:
    """Each test declares its kinds with @job into an emptied HANDLERS, put back after."""
    yield HANDLERS


def lookup(kind: str) -> JobDef:
    return HANDLERS.lookup(kind)


def new_job(spec: JobSpec) -> NewJob:
    return jobs.from_spec(HANDLERS, spec)


# --------------------------------------------------------------------------- @job


def test_job_registers_the_kind_with_its_args_type_and_options():
    @job("resize", queue="images", timeout="90s", max_attempts=7, priority=-2,
         retry_delays={"network": 1.5})
    async def resize(ctx: Context, args: ResizeArgs) -> None:
        return None

    jobdef = lookup("resize")
    assert jobdef.fn is resize
    assert jobdef.args_type is ResizeArgs
    assert (jobdef.queue, jobdef.timeout_s, jobdef.max_attempts, jobdef.priority) == (
        "images", 90.0, 7, -2)
    assert jobdef.base_delays == {"network": 1.5}
    assert set(HANDLERS.registered()) == {"resize"}


def test_unannotated_args_default_to_a_dict():
    @job("loose")
    async def loose(ctx, args):
        return None

    assert lookup("loose").decode_args('{"anything": [1, 2]}') == {"anything": [1, 2]}


def test_job_takes_plain_functions_as_sync_handlers_but_not_generators():
    @job("sync")
    def sync(ctx: Context, args: ResizeArgs) -> None:
        return None

    @job("async")
    async def asynchronous(ctx: Context, args: ResizeArgs) -> None:
        return None

    assert lookup("sync").sync and not lookup("async").sync
    with pytest.raises(TypeError, match="generator"):
        @job("gen")
        def gen(ctx: Context, args: ResizeArgs):
            yield None
    with pytest.raises(UnknownKind):
        lookup("gen")


def test_job_rejects_wrong_signatures_and_max_attempts():
    with pytest.raises(TypeError, match=r"\(ctx, args\)"):
        @job("one_param")
        async def one_param(ctx: Context) -> None:
            return None
    with pytest.raises(ValueError):
        job("zero", max_attempts=0)


def test_lookup_of_an_unknown_kind_lists_the_registered_ones():
    @job("known")
    async def known(ctx: Context, args: ResizeArgs) -> None:
        return None

    with pytest.raises(UnknownKind, match="'nope'.*known"):
        lookup("nope")


# --------------------------------------------------------------------------- decode_args


@pytest.fixture
def resize_def():
    @job("resize")
    async def resize(ctx: Context, args: ResizeArgs) -> None:
        return None

    return lookup("resize")


def test_decode_args_accepts_json_dicts_and_structs(resize_def):
    expected = ResizeArgs(url="u", width=3)
    assert resize_def.decode_args('{"url": "u", "width": 3}') == expected
    assert resize_def.decode_args(b'{"url": "u", "width": 3}') == expected
    assert resize_def.decode_args({"url": "u", "width": 3}) == expected
    assert resize_def.decode_args(expected) == expected
    assert resize_def.decode_args({"url": "u"}).width == 100


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"url": "u", "width": "wide"}, "$.width"),
        ('{"url": 5}', "$.url"),
        ({}, "url"),
    ],
)
def test_decode_args_errors_name_the_field(resize_def, raw: Any, field: str):
    with pytest.raises(InvalidArgs) as info:
        resize_def.decode_args(raw)
    assert field in str(info.value)
    assert str(info.value).startswith("resize:")


def test_decode_args_rejects_malformed_json(resize_def):
    with pytest.raises(InvalidArgs):
        resize_def.decode_args("{not json")


# --------------------------------------------------------------------------- progress


class FakeTime:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_context(now: FakeTime, every_items: int = 3, every_s: float = 10.0):
    written: list[tuple[int, int, float | None, str | None]] = []
    at = datetime(2024, 1, 1, tzinfo=UTC)
    info = JobInfo(id=7, kind="k", queue="default", key=None, attempt=1, max_attempts=3,
                   tags=[], unique_key=None, priority=0, run_at=at, created_at=at, errors=[])
    ctx = Context(info, 42, report_progress=lambda *a: written.append(a),
                  transaction=lambda: None, now=now,
                  progress_every_items=every_items, progress_every_s=every_s)
    return ctx, written


def test_progress_is_written_every_n_calls():
    now = FakeTime()
    ctx, written = make_context(now, every_items=3, every_s=10.0)
    calls = [ctx.progress(i, f"n{i}") for i in range(1, 8)]
    # The first call writes (nothing written yet); then every third call.
    assert calls == [True, False, False, True, False, False, True]
    assert written == [(7, 42, 1.0, "n1"), (7, 42, 4.0, "n4"), (7, 42, 7.0, "n7")]


def test_progress_is_written_after_t_seconds():
    now = FakeTime()
    ctx, written = make_context(now, every_items=1000, every_s=10.0)
    assert ctx.progress(1) is True
    now.t += 9.9
    assert ctx.progress(2) is False
    now.t += 0.1
    assert ctx.progress(3) is True
    assert ctx.progress(4) is False
    assert [w[2] for w in written] == [1.0, 3.0]


def test_progress_clamps_percentages_and_heartbeat_always_reports():
    ctx, written = make_context(FakeTime(), every_items=1)
    assert ctx.progress(250)
    assert ctx.progress(-3, "neg")
    assert ctx.progress(None, "just a note")
    ctx.heartbeat()
    assert written == [(7, 42, 100.0, None), (7, 42, 0.0, "neg"), (7, 42, None, "just a note"),
                       (7, 42, None, None)]


# --------------------------------------------------------------------------- new_job


@pytest.fixture
def shop_def():
    @job("sync_shop", queue="shops", timeout="5m", max_attempts=9, priority=3,
         key=lambda a: f"shop:{a.shop}")
    async def sync_shop(ctx: Context, args: ShopArgs) -> None:
        return None

    return lookup("sync_shop")


def test_new_job_unknown_kind():
    with pytest.raises(JobdError) as info:
        new_job(JobSpec(kind="nope"))
    assert info.value.code == ErrorCode.UNKNOWN_KIND
    assert info.value.details == {"kind": "nope"}


def test_new_job_invalid_args(shop_def):
    with pytest.raises(JobdError) as info:
        new_job(JobSpec(kind="sync_shop", args={"shop": "a", "count": "many"}))
    assert info.value.code == ErrorCode.INVALID_ARGS
    assert "$.count" in info.value.message


def test_new_job_takes_defaults_from_the_declaration(shop_def):
    row = new_job(JobSpec(kind="sync_shop", args={"shop": "acme", "count": 2}))
    assert row.queue == "shops"
    assert row.key == "shop:acme"
    assert (row.priority, row.max_attempts, row.timeout_s) == (3, 9, 300.0)
    assert row.delay_s is None
    assert msgspec.json.decode(row.args) == {"shop": "acme", "count": 2}


def test_new_job_spec_overrides_the_declaration(shop_def):
    row = new_job(JobSpec(kind="sync_shop", args={"shop": "acme", "count": 2}, queue="q2",
                          key="explicit", priority=0, max_attempts=1, timeout_s=1.5,
                          unique_key="u", tags=["t"], delay_s=30))
    assert (row.queue, row.key, row.priority, row.max_attempts, row.timeout_s) == (
        "q2", "explicit", 0, 1, 1.5)
    assert (row.unique_key, row.tags, row.delay_s) == ("u", ["t"], 30)


def test_new_job_normalizes_args_through_the_struct(resize_def):
    row = new_job(JobSpec(kind="resize", args={"url": "u"}))
    assert msgspec.json.decode(row.args) == {"url": "u", "width": 100}


def test_new_job_delays(resize_def):
    past = new_job(JobSpec(kind="resize", args={"url": "u"}, delay_s=-5))
    assert past.delay_s == 0.0
    run_at = datetime.now(UTC) + timedelta(hours=1)
    later = new_job(JobSpec(kind="resize", args={"url": "u"}, run_at=run_at))
    assert later.delay_s is not None and 3000 < later.delay_s <= 3600
    naive_past = new_job(JobSpec(kind="resize", args={"url": "u"}, run_at=datetime(2000, 1, 1)))
    assert naive_past.delay_s == 0.0


def test_new_job_rejects_zero_max_attempts(resize_def):
    with pytest.raises(JobdError) as info:
        new_job(JobSpec(kind="resize", args={"url": "u"}, max_attempts=-1))
    assert info.value.code == ErrorCode.BAD_REQUEST
