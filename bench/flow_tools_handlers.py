"""Kinds for bench/flow_tools_bench.py: one per tool path, all on the unserved queue
`parked`, so the bench measures the enqueue alone (nothing claims them)."""

from __future__ import annotations

import msgspec

from actors import Context, job


class Keyed(msgspec.Struct):
    k: str
    n: int = 0


@job("bench.debounced", queue="parked", debounce="1h", debounce_key="k")
async def debounced(ctx: Context, args: Keyed) -> None: ...


@job("bench.batched", queue="parked", batch_size=100, batch_timeout="1h", batch_key="k")
async def batched(ctx: Context, args: list[Keyed]) -> None: ...


@job("bench.plain", queue="parked")
async def plain(ctx: Context, args: Keyed) -> None: ...
