"""The two public surfaces, pinned: what a client program imports from `protocol`, and
what a handler module imports from `actors`. A name added to or dropped from either
`__all__` must be added to or dropped from the lists here, on purpose.

The lists live here only: when the handler API grows (e.g. `Child` for workflows), this
is the one place to say so.
"""

from __future__ import annotations

import importlib

import pytest

import protocol
from protocol import commands, errors

CLIENT_API = [
    # connecting
    "Client", "SyncClient", "connect",
    # errors: the base, a class per code a caller commonly catches, the codes
    "BadRequest", "ConnectionFailed", "ErrorCode", "JobdError", "NotFound", "Unavailable",
    # what a client sends beside plain arguments
    "JobSpec", "ScheduleSpec",
    # what a client receives
    "AttemptError", "BatchResult", "BulkResult", "CallbackResult", "CancelResult", "ChildView", "DaemonView",
    "DeliveryView", "DrainResult", "EnqueueResult", "HelloResult", "JobView", "JobsPage", "KeyStats",
    "NodesResult", "PauseResult", "Pong", "QueueCounts", "ReloadResult", "ScheduleFired",
    "ScheduleListResult", "ScheduleRemoved", "ScheduleView", "SendEventResult",
    "SendEventsResult", "StatsResult", "StepView", "SummaryResult", "TreeNode",
    "WebhookReplayResult", "WebhooksPage", "WorkflowView",
    # the dashboard's reads
    "ActivityResult", "QueueActivity", "RunDetail", "RunEvent", "RunStep",
    # events
    "EventSpec", "EventView", "EventsPage",
]

HANDLER_API = [
    "Child", "ChildResult", "Context", "Fail", "Handlers", "InvalidArgs", "JobInfo",
    "RateLimited", "RetryAfter", "UnknownKind", "job",
]

SURFACES = {"protocol": CLIENT_API, "actors": HANDLER_API}


@pytest.mark.parametrize("package", sorted(SURFACES))
def test_the_exports_are_exactly_the_pinned_list(package: str) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(SURFACES[package])
    assert len(set(module.__all__)) == len(module.__all__), "a name listed twice"


@pytest.mark.parametrize("package", sorted(SURFACES))
def test_every_exported_name_resolves(package: str) -> None:
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
    namespace: dict[str, object] = {}
    exec(f"from {package} import *", namespace)  # noqa: S102 - what a user's star import sees
    assert set(SURFACES[package]) <= set(namespace)


def test_every_result_a_client_method_returns_is_exported() -> None:
    """A new command's result type joins the surface with it."""
    exported = {getattr(protocol, name) for name in protocol.__all__}
    results = set(commands.RESULT_TYPES.values())
    assert results - exported == set()


def test_every_error_class_a_client_raises_is_exported() -> None:
    classes = {value for value in vars(errors).values()
               if isinstance(value, type) and issubclass(value, errors.JobdError)}
    assert {cls.__name__ for cls in classes} <= set(protocol.__all__)
    assert protocol.JobdError is errors.JobdError  # one class, not a copy
