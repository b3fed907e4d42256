"""Strict args: a field the handler's args type does not declare is refused, at enqueue
(`invalid_args` naming the field) and when a stored job's args have one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from actors import jobs
from actors.context import Context
from actors.errors import InvalidArgs
from actors.handlers import HANDLERS, Handlers, job
from actors.jobdef import JobDef
from actors.ports import NewJob
from protocol.errors import ErrorCode, JobdError
from protocol.jobs import JobSpec


class SleepArgs(msgspec.Struct):
    seconds: float = 1.0


class Point(msgspec.Struct, rename="camel"):
    x_pos: int = 0


class Tagged(msgspec.Struct, tag="circle"):
    radius: int = 1


class Square(msgspec.Struct, tag="square"):
    side: int = 1


class Drawing(msgspec.Struct):
    origin: Point = msgspec.field(default_factory=Point)
    points: list[Point] = []
    named: dict[str, Point] = {}
    shape: Tagged | Square | None = None


def lookup(kind: str) -> JobDef:
    return HANDLERS.lookup(kind)


def new_job(spec: JobSpec) -> NewJob:
    return jobs.from_spec(HANDLERS, spec)


@pytest.fixture(autouse=True)
def registry(empty_handlers) -> Iterator[Handlers]:
    """The kinds below, in an emptied HANDLERS put back after each test."""

    @job("sleep")
    async def sleep(ctx: Context, args: SleepArgs) -> None:
        return None

    @job("draw")
    async def draw(ctx: Context, args: Drawing) -> None:
        return None

    @job("lenient", strict_args=False)
    async def lenient(ctx: Context, args: SleepArgs) -> None:
        return None

    @job("untyped")
    async def untyped(ctx, args):
        return None

    yield HANDLERS


def test_a_misspelled_field_is_refused_at_enqueue_naming_it():
    with pytest.raises(JobdError) as info:
        new_job(JobSpec(kind="sleep", args={"secnds": 3}))
    assert info.value.code == ErrorCode.INVALID_ARGS
    assert "secnds" in info.value.message and "strict_args=False" in info.value.message
    assert info.value.details == {"kind": "sleep", "field": "$.secnds"}


@pytest.mark.parametrize(("args", "field"), [
    ({"origin": {"xPos": 1, "y": 2}}, "$.origin.y"),
    ({"origin": {"x_pos": 1}}, "$.origin.x_pos"),  # the Python name, not the JSON one
    ({"points": [{"xPos": 1}, {"xPos": 2, "z": 0}]}, "$.points[1].z"),
    ({"named": {"a": {"w": 1}}}, "$.named.a.w"),
    ({"shape": {"type": "square", "side": 2, "radius": 3}}, "$.shape.radius"),
    ({"extra": True}, "$.extra"),
])
def test_unknown_fields_are_found_at_any_depth(args: dict[str, Any], field: str):
    with pytest.raises(InvalidArgs) as info:
        lookup("draw").decode_args(args)
    assert info.value.field == field


def test_known_fields_tags_and_nulls_pass():
    args = {"origin": {"xPos": 1}, "points": [{"xPos": 2}], "named": {"a": {}},
            "shape": {"type": "circle", "radius": 2}}
    decoded = lookup("draw").decode_args(args)
    assert decoded.shape == Tagged(radius=2)
    assert lookup("draw").decode_args({"shape": None}).shape is None


def test_stored_args_with_an_unknown_field_fail_to_decode():
    # A job enqueued through SQL (jobd.enqueue) or by an older daemon: the worker fails
    # it as invalid args instead of running it with the default.
    with pytest.raises(InvalidArgs) as info:
        lookup("sleep").decode_args('{"secnds": 3}')
    assert info.value.field == "$.secnds"
    assert lookup("sleep").decode_args(b'{"seconds": 3}') == SleepArgs(seconds=3)


def test_a_handler_may_opt_out():
    assert lookup("lenient").decode_args({"secnds": 3, "seconds": 2}) == SleepArgs(seconds=2)
    assert lookup("lenient").decode_args('{"secnds": 3}') == SleepArgs()
    row = new_job(JobSpec(kind="lenient", args={"secnds": 3}))
    assert msgspec.json.decode(row.args) == {"seconds": 1.0}  # normalised through the Struct


def test_untyped_handlers_take_anything():
    assert lookup("untyped").decode_args({"anything": 1}) == {"anything": 1}


class Node(msgspec.Struct):
    name: str = ""
    children: list[Node] = []


def test_recursive_args_types_are_checked_at_every_level(registry):
    @job("tree")
    async def tree(ctx: Context, args: Node) -> None:
        return None

    ok = {"name": "a", "children": [{"name": "b", "children": [{"name": "c"}]}]}
    assert lookup("tree").decode_args(ok).children[0].children[0].name == "c"
    with pytest.raises(InvalidArgs) as info:
        lookup("tree").decode_args({"children": [{"children": [{"nme": "c"}]}]})
    assert info.value.field == "$.children[0].children[0].nme"
