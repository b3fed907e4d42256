"""`actors.ports.Store` is the whole store: PgStore has every method with the port's
signature, the port has every public method PgStore has (one interface, as River's
driver), and every `store.X` the actors and the daemon call is on the port.

mypy checks the types (`_: type[Store] = PgStore` in daemon/store/__init__.py, run by
.ci/run); this test keeps the lists in step without it, and names what is missing.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from actors.ports import Store
from daemon.store import PgStore

ROOT = Path(__file__).resolve().parents[2]
# The names a store goes by at its call sites.
RECEIVERS = {("store",), ("self", "_store"), ("self", "store")}


def port_classes() -> list[type]:
    """Store and the ports it extends (StepStore), not Protocol itself."""
    return [k for k in Store.__mro__ if k.__module__ == Store.__module__]


def port_methods() -> dict[str, object]:
    return {name: member for k in reversed(port_classes()) for name, member in vars(k).items()
            if not name.startswith("_") and callable(member)}


def port_members() -> set[str]:
    names = {name for k in port_classes() for name in vars(k) if not name.startswith("_")}
    return names | {name for k in port_classes() for name in k.__annotations__}


def test_pgstore_has_every_port_method_with_its_signature() -> None:
    mismatched = []
    for name, declared in port_methods().items():
        implemented = getattr(PgStore, name, None)
        assert implemented is not None, f"PgStore has no {name}"
        want, got = inspect.signature(declared), inspect.signature(implemented)
        if list(want.parameters.values()) != list(got.parameters.values()):
            mismatched.append(f"{name}: port {want}, PgStore {got}")
        if inspect.iscoroutinefunction(declared):
            if not inspect.iscoroutinefunction(implemented):
                mismatched.append(f"{name}: the port's is async, PgStore's is not")
            elif want.return_annotation != got.return_annotation:
                mismatched.append(f"{name}: returns {got.return_annotation}, "
                                  f"the port says {want.return_annotation}")
    assert mismatched == []


def test_pgstore_attributes_are_on_the_port() -> None:
    store = PgStore("postgresql://unused")
    for name in Store.__annotations__:
        assert hasattr(store, name), f"PgStore instances have no {name}"
    assert isinstance(inspect.getattr_static(PgStore, "healthy"), property)


def test_every_public_pgstore_method_is_on_the_port() -> None:
    public = {name for name, _ in inspect.getmembers(PgStore, callable)
              if not name.startswith("_")}
    assert public - set(port_methods()) == set()


def called_on_a_store(source: str) -> set[str]:
    """X for every `store.X`, `self._store.X`, `self.store.X` in `source`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and (value.id, *chain) in RECEIVERS:
                found.add(node.attr)
    return found


def test_every_store_call_in_actors_and_daemon_is_on_the_port() -> None:
    members = port_members()
    missing = []
    for path in sorted([*(ROOT / "actors").rglob("*.py"), *(ROOT / "daemon").rglob("*.py")]):
        if (ROOT / "daemon" / "store") in path.parents:
            continue  # the implementation itself
        for name in sorted(called_on_a_store(path.read_text()) - members):
            missing.append(f"{path.relative_to(ROOT)}: store.{name}")
    assert missing == []


def test_the_call_finder_sees_each_receiver() -> None:
    source = """
async def f(store, self):
    await store.claim()
    await self._store.pause()
    self.store.observer = None
    other.store.nope()
    self.other.nope()
"""
    assert called_on_a_store(source) == {"claim", "pause", "observer"}
