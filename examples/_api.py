"""What the example handlers share: where the stand-in (or real) APIs are, and async calls."""

from __future__ import annotations

import os
from typing import Any

import trio

from examples.standin_servers import call


def base_url() -> str:
    return os.environ.get("JOBD_STANDIN_URL", "http://127.0.0.1:8765")


async def post(path: str, body: dict[str, Any]) -> Any:
    return await trio.to_thread.run_sync(call, base_url() + path, body)


async def get(path: str) -> Any:
    return await trio.to_thread.run_sync(call, base_url() + path, None)
