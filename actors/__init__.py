"""The handler API users import, and the actor runtime jobd is built from."""

from actors.errors import Fail, InvalidArgs, RateLimited, RetryAfter, UnknownKind
from actors.handlers import Context, JobInfo, job

__all__ = ["Context", "Fail", "InvalidArgs", "JobInfo", "RateLimited", "RetryAfter", "UnknownKind",
           "job"]
