"""The live supervisor tree, as `jobctl tree` and the HTTP API show it."""

from __future__ import annotations

import msgspec


class TreeNode(msgspec.Struct, kw_only=True):
    name: str
    kind: str  # "supervisor" | "actor"
    state: str  # "starting" | "running" | "restarting" | "stopping" | "stopped" | "failed"
    restarts: int = 0
    strategy: str | None = None  # supervisors only
    mailbox: int | None = None  # queued messages, actors with a mailbox only
    children: list[TreeNode] = []
