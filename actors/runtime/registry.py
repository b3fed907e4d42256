"""Actor names → mailboxes, and the live supervisor tree for `jobctl tree`.

Names map to mailboxes, not to actor objects: a mailbox outlives every restart of the
actor behind it, so a name looked up once stays valid for the life of the tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from protocol.tree import TreeNode

if TYPE_CHECKING:
    from actors.runtime.mailbox import Mailbox


class TreeSource(Protocol):
    """Anything that can snapshot itself as a tree; in practice the root Supervisor."""

    def tree(self) -> TreeNode: ...


class Registry:
    def __init__(self) -> None:
        self._mailboxes: dict[str, Mailbox[Any]] = {}
        self._root: TreeSource | None = None

    def register(self, name: str, mailbox: Mailbox[Any]) -> None:
        """Bind `name`; rebinding it to the same mailbox is a no-op, to another is an error."""
        bound = self._mailboxes.get(name)
        if bound is not None and bound is not mailbox:
            raise ValueError(f"actor name {name!r} is already bound to {bound!r}")
        self._mailboxes[name] = mailbox

    def lookup(self, name: str) -> Mailbox[Any]:
        try:
            return self._mailboxes[name]
        except KeyError:
            known = ", ".join(sorted(self._mailboxes)) or "none"
            raise KeyError(f"no actor named {name!r} is registered (registered: {known})") from None

    def unregister(self, name: str) -> None:
        self._mailboxes.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._mailboxes)

    @property
    def root(self) -> TreeSource | None:
        return self._root

    def set_root(self, root: TreeSource) -> None:
        """Name the supervisor whose tree `tree()` shows (the first one run claims it)."""
        self._root = root

    def tree(self) -> TreeNode:
        """A fresh snapshot: states, restart counts and mailbox sizes as of now."""
        if self._root is None:
            raise LookupError("no supervisor tree is registered")
        return self._root.tree()
