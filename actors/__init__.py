"""The handler API users import: `@job` declares a kind, `Context` is what a running
handler sees, the errors steer its job. The rest of `actors` (runtime, services) is
jobd's own."""

from actors.context import Context, JobInfo
from actors.errors import Fail, InvalidArgs, RateLimited, RetryAfter, UnknownKind
from actors.handlers import Handlers, job
from actors.workflow import Child, ChildResult

__all__ = ["Child", "ChildResult", "Context", "Fail", "Handlers", "InvalidArgs", "JobInfo",
           "RateLimited", "RetryAfter", "UnknownKind", "job"]
