"""@job's flow-control declarations (actors/tools.py): what they store, and every misuse
refused at declaration with a one-line error naming the kind and the option."""

from __future__ import annotations

import msgspec
import pytest

from actors import jobs
from actors.handlers import Handlers


class Item(msgspec.Struct):
    m: str
    n: int = 0


async def handler(ctx, args: Item) -> None: ...


async def batch_handler(ctx, args: list[Item]) -> None: ...


def declare(fn=handler, **options):
    h = Handlers()
    h.job("k", **options)(fn)
    return h


def test_debounce_with_a_field_key_is_stored_for_postgres():
    d = declare(debounce="5s", debounce_key="m", debounce_max="1m").lookup("k")
    assert d.tools is not None
    t = d.tools.tools
    assert (t.debounce_s, t.debounce_max_s, t.debounce_field) == (5.0, 60.0, "m")
    assert d.tools.key_fns == {}


def test_a_key_function_is_applied_by_the_builder():
    h = declare(throttle="10/m", throttle_key=lambda a: a.m.upper(), mode="drop")
    t = h.lookup("k").tools.tools
    assert (t.throttle_per_s, t.throttle_mode) == (10 / 60, "drop")
    row = jobs.build(h, "k", {"m": "ebay"})
    assert row.tool_keys == {"throttle": "EBAY"}


def test_a_plain_kind_builds_a_plain_row():
    row = jobs.build(declare(), "k", {"m": "x"})
    assert row.tool_keys is None


def test_a_batch_kind_validates_each_enqueue_as_one_item():
    h = declare(batch_handler, batch_size=100, batch_timeout="5s", batch_key="m")
    row = jobs.build(h, "k", {"m": "day", "n": 3})
    assert row.tool_keys == {} and msgspec.json.decode(row.args) == {"m": "day", "n": 3}
    with pytest.raises(Exception, match="unknown field"):
        jobs.build(h, "k", {"m": "day", "bogus": 1})
    d = h.lookup("k")
    assert d.decode_args('{"items": [{"m": "a"}, {"m": "b", "n": 2}]}') == [
        Item("a"), Item("b", 2)]


def test_singleton_modes():
    assert declare(singleton_key="m").lookup("k").tools.tools.singleton_mode == "skip"
    t = declare(singleton_key="m", mode="cancel").lookup("k").tools.tools
    assert (t.singleton_mode, t.singleton_field) == ("cancel", "m")


def test_unique_windows():
    t = declare(unique_for="1h", unique_mode="replace").lookup("k").tools.tools
    assert (t.unique_for_s, t.unique_mode) == (3600.0, "replace")


@pytest.mark.parametrize(("options", "fn", "message"), [
    ({"debounce": "soon"}, handler, "debounce"),
    ({"debounce": "0s"}, handler, "debounce must be > 0"),
    ({"debounce": -1}, handler, "debounce: duration must not be negative"),
    ({"debounce": True}, handler, "debounce must be a duration"),
    ({"debounce": "5s", "debounce_max": "1s"}, handler, "debounce_max"),
    ({"debounce_max": "1s"}, handler, "debounce_max needs debounce"),
    ({"batch_size": 0, "batch_timeout": "5s"}, batch_handler, "batch_size must be 1..10000"),
    ({"batch_size": 10_001, "batch_timeout": "5s"}, batch_handler, "batch_size must be"),
    ({"batch_size": "10", "batch_timeout": "5s"}, batch_handler, "batch_size must be an integer"),
    ({"batch_size": 10}, batch_handler, "needs batch_timeout"),
    ({"batch_size": 10, "batch_timeout": "5s"}, handler, "must be list"),
    ({"batch_size": 10, "batch_timeout": "5s", "debounce": "1s"}, batch_handler,
     "cannot be combined"),
    ({"throttle": "fast"}, handler, "throttle"),
    ({"throttle": "0/s"}, handler, "throttle"),
    ({"throttle": "1/s", "mode": "cancel"}, handler, "throttle mode"),
    ({"throttle_mode": "drop"}, handler, "need throttle"),
    ({"singleton_key": "m", "mode": "drop"}, handler, "singleton mode"),
    ({"singleton_key": "m", "throttle": "1/s", "mode": "skip"}, handler, "ambiguous"),
    ({"mode": "skip"}, handler, "mode= needs"),
    ({"unique_mode": "merge"}, handler, "unique_mode"),
    ({"unique_for": "20y"}, handler, "unique_for"),
    ({"debounce": "1s", "debounce_key": ""}, handler, "field name"),
    ({"debounce": "1s", "debounce_key": "a\x00b"}, handler, "field name"),
    ({"debounce_key": "m"}, handler, "needs debounce"),
])
def test_misuse_is_one_line_at_declaration(options, fn, message):
    with pytest.raises(ValueError, match=message) as info:
        declare(fn, **options)
    text = str(info.value)
    assert "\n" not in text and text.startswith("@job('k')")


def test_a_key_that_is_neither_a_name_nor_a_function():
    with pytest.raises(TypeError, match="singleton_key must be"):
        declare(singleton_key=42)


def test_a_failing_key_function_is_invalid_args_at_enqueue():
    h = declare(debounce="1s", debounce_key=lambda a: 1 / 0)
    with pytest.raises(Exception, match="tool-key function failed"):
        jobs.build(h, "k", {"m": "x"})
