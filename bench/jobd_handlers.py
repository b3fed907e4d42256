"""The bench's jobd handlers (loaded next to examples.basic, which has `noop` and `sleep`).

`bench.lat` returns how long after its enqueuer's clock reading it started, so the
latency is measured the same way as for the peers: client clock -> handler start.
"""

from __future__ import annotations

import time

import msgspec

from actors import Context, job


class LatArgs(msgspec.Struct):
    t: float


@job("bench.lat", queue="default")
async def lat(ctx: Context, args: LatArgs) -> dict:
    return {"lat_ms": (time.time() - args.t) * 1000}
