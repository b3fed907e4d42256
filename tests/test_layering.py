"""The layers only point down: daemon -> actors -> protocol.

`protocol` (the wire format and the client) must import nothing from `daemon` or `actors`,
and `actors` nothing from `daemon`. Checked on the source with `ast`, so imports inside
functions, `if TYPE_CHECKING:` blocks and relative imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "protocol": {"daemon", "actors"},
    "actors": {"daemon"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in `source`, wherever it appears."""
    found: list[tuple[int, str]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from . import daemon`-style imports name modules in the alias list.
            found += [(node.lineno, f"{target}.{alias.name}".lstrip(".")) for alias in node.names]
        elif isinstance(node, ast.Call):
            # importlib.import_module("x") / __import__("x") with a literal name.
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args and \
                    isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def violations(layer: str) -> list[str]:
    out = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        module = module_name(path)
        for line, target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            if top(target) in FORBIDDEN[layer]:
                out.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {target}")
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer: str) -> None:
    files = list((ROOT / layer).rglob("*.py"))
    assert len(files) > 3, f"found no sources for {layer}"
    assert violations(layer) == []


def test_the_checker_sees_every_kind_of_import() -> None:
    source = """
import daemon.app
from daemon import config
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from actors.ports import Store
def late():
    import importlib
    importlib.import_module("daemon.store")
    from .. import daemon
from ..daemon import app
"""
    targets = {t for _, t in imported_modules(source, "protocol.client", is_package=False)}
    assert {"daemon.app", "daemon", "actors.ports", "daemon.store"} <= targets
    flagged = {t for t in targets if top(t) in FORBIDDEN["protocol"]}
    assert len(flagged) >= 5, flagged
    # Relative imports resolve against the package: `..daemon` from protocol.client.
    relative = {t for _, t in imported_modules("from ..daemon import app\n",
                                               "protocol.sub.client", is_package=False)}
    assert "protocol.daemon" in relative
    relative = {t for _, t in imported_modules("from . import jobs\n", "protocol",
                                               is_package=True)}
    assert "protocol.jobs" in relative
