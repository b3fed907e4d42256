"""What `@job(on_event=..., cancel_on=...)` accepts, the subscriptions it yields, and the
key of an event-started kind (a path, computed the way Postgres' `#>>` does)."""

from __future__ import annotations

import msgspec
import pytest

from actors import jobs
from actors.events import subscriptions
from actors.handlers import Handlers


class Args(msgspec.Struct):
    marketplace: str
    user: dict = {}
    n: int = 0


async def handler(ctx, args: Args) -> None:
    return None


def declare(**options) -> Handlers:
    handlers = Handlers()
    handlers.job("k", **options)(handler)
    return handlers


def test_on_event_forms_become_start_subscriptions_with_the_kind_defaults():
    handlers = declare(on_event=["a/b", {"event": "c.d", "match": {"region": "uk"}}],
                       queue="crawl", priority=3, max_attempts=7, timeout="1m",
                       key="marketplace",
                       cancel_on=[{"event": "stop", "match": ["marketplace", "n"]}])
    subs = subscriptions(handlers.registered().values())
    assert [(s.event, s.action, s.match, s.fields) for s in subs] == [
        ("a/b", "start", {}, []), ("c.d", "start", {"region": "uk"}, []),
        ("stop", "cancel", {}, ["marketplace", "n"])]
    start = subs[0]
    assert (start.queue, start.priority, start.max_attempts, start.timeout_s, start.key_path) \
        == ("crawl", 3, 7, 60.0, ["marketplace"])


@pytest.mark.parametrize(("options", "error", "says"), [
    ({"on_event": "has space"}, ValueError, "event name"),
    ({"on_event": "x" * 201}, ValueError, "event name"),
    ({"on_event": 5}, TypeError, "on_event must be"),
    ({"on_event": {"event": "a", "filter": {}}}, TypeError, "on_event entries"),
    ({"on_event": {"event": "a", "match": "region"}}, TypeError, "match is a dict"),
    ({"on_event": {"event": "a", "match": {"x": "\x00"}}}, ValueError, "NUL"),
    ({"on_event": ["a", "a"]}, ValueError, "twice"),
    ({"on_event": "a", "key": lambda a: a.marketplace}, TypeError, "path"),
    ({"cancel_on": [{"event": "a"}]}, TypeError, "cancel_on entries"),
    ({"cancel_on": [{"event": "a", "match": []}]}, ValueError, "non-empty"),
    ({"cancel_on": [{"event": "a", "match": 3}]}, ValueError, "field name"),
])
def test_bad_declarations_are_refused_at_import_naming_the_kind(options, error, says):
    with pytest.raises(error) as caught:
        declare(**options)
    assert str(caught.value).startswith("k: ") and says in str(caught.value)


def test_a_path_key_is_what_postgres_would_compute():
    handlers = declare(key="user.id")
    row = jobs.build(handlers, "k", {"marketplace": "ebay", "user": {"id": 42}})
    assert row.key == "42"  # a number as JSON text, as `#>>` writes it
    assert jobs.build(handlers, "k", {"marketplace": "ebay"}).key is None  # missing: no key
    handlers = declare(key="marketplace")
    assert jobs.build(handlers, "k", {"marketplace": "ebay"}).key == "ebay"
