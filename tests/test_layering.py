"""The layers only point down (daemon -> actors -> protocol), and no module imports
itself back.

`protocol` (the wire format and the client) must import nothing from `daemon` or `actors`,
and `actors` nothing from `daemon`. Among the modules, the import graph has no cycle.
Checked on the source with `ast`, so imports inside functions, `if TYPE_CHECKING:`
blocks and relative imports count too.

An import inside a function can hide a cycle (it runs later, so Python never trips on
it), so there are none in `protocol`, `actors` or `daemon` but those listed below:
LAZY_IMPORTS, with the reason each one must stay lazy (an optional dependency, an
import only some commands need and that is slow). The list must match the source
exactly, so a stale entry fails too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "protocol": {"daemon", "actors"},
    "actors": {"daemon"},
}
# The packages whose modules make up the import graph (examples: `jobd demo` imports them).
PACKAGES = ("protocol", "actors", "daemon", "examples")
# The packages where an import inside a function must be listed.
NO_LAZY = ("protocol", "actors", "daemon")

# (file, imported module) -> why it must stay inside a function.
_HYPERCORN = "hypercorn takes ~0.25 s to import; a daemon without control.http never loads it"
LAZY_IMPORTS: dict[tuple[str, str], str] = {
    **{("daemon/api/http_server.py", name): _HYPERCORN
       for name in ("hypercorn.config", "hypercorn.protocol.h2", "hypercorn.trio.tcp_server",
                    "hypercorn.trio.worker_context", "hypercorn.typing", "hypercorn.utils")},
    ("daemon/tracing.py", "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
        "the OTLP exporter is the optional `otlp` extra; only [tracing] enabled loads it",
    **{("daemon/serve_http.py", name): "Jinja2 and the templates: only a daemon whose HTTP "
       "server has the dashboard on loads them (idle RSS)"
       for name in ("daemon.dashboard.app", "daemon.dashboard.sessions")},
    **{("daemon/tracing.py", name): "a daemon that does not trace never loads the SDK"
       for name in ("opentelemetry.sdk.resources", "opentelemetry.sdk.trace",
                    "opentelemetry.sdk.trace.export", "opentelemetry.sdk.trace.sampling")},
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


# -- the module graph -------------------------------------------------------------------


def project_modules() -> dict[str, Path]:
    """Module name -> source file, for every module of the project's packages."""
    return {module_name(path): path
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


class Import:
    """One import statement: where it is, what it names, and whether it runs late."""

    def __init__(self, line: int, target: str, names: list[str], lazy: bool):
        self.line = line
        self.target = target  # the module named after `import` / `from`
        self.names = names  # for `from X import a, b`: a, b
        self.lazy = lazy  # inside a function (or lambda) body


def imports(source: str, module: str, is_package: bool) -> Iterator[Import]:
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, lazy: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(child.lineno, alias.name, [], inner)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)] if child.level > 1 else base
                    target = ".".join([*base, child.module] if child.module else base)
                else:
                    target = child.module or ""
                yield Import(child.lineno, target, [a.name for a in child.names], inner)
            elif isinstance(child, ast.Call):
                func = child.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in ("import_module", "__import__") and child.args and \
                        isinstance(child.args[0], ast.Constant) and \
                        isinstance(child.args[0].value, str):
                    yield Import(child.lineno, child.args[0].value, [], inner)
            yield from visit(child, inner)

    yield from visit(ast.parse(source), False)


def resolve(imp: Import, modules: dict[str, Path]) -> set[str]:
    """The project modules an import makes this module depend on.

    `from pkg import sub` where `sub` is a module depends on `pkg.sub`, not on what
    `pkg/__init__.py` defines; `from pkg import name` depends on `pkg` itself. The parent
    packages Python initialises on the way are not counted: they run first, whoever asks.
    """
    found: set[str] = set()
    if imp.names:
        for name in imp.names:
            if f"{imp.target}.{name}" in modules:
                found.add(f"{imp.target}.{name}")
            elif imp.target in modules:
                found.add(imp.target)
    else:
        parts = imp.target.split(".")
        for end in range(len(parts), 0, -1):  # `import a.b.c` where only a.b is ours
            if ".".join(parts[:end]) in modules:
                found.add(".".join(parts[:end]))
                break
    return found


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_graph() -> dict[str, dict[str, str]]:
    """module -> {module it imports: "file:line"}, lazy imports included."""
    modules = project_modules()
    graph: dict[str, dict[str, str]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for imp in imports(path.read_text(), module, path.name == "__init__.py"):
            for target in resolve(imp, modules) - {module}:
                edges.setdefault(target, f"{relative(path)}:{imp.line}")
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None; depth first, in a stable order."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, str]]) -> str:
    return "\n".join(f"  {a} -> {b}  ({graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False))


def lazy_imports() -> dict[tuple[str, str], str]:
    """(file, imported module) -> "file:line" for every import inside a function."""
    found: dict[tuple[str, str], str] = {}
    for module, path in project_modules().items():
        if module.split(".")[0] not in NO_LAZY:
            continue
        for imp in imports(path.read_text(), module, path.name == "__init__.py"):
            if imp.lazy:
                found.setdefault((relative(path), imp.target), f"{relative(path)}:{imp.line}")
    return found


def test_the_module_graph_has_no_cycle() -> None:
    graph = module_graph()
    assert len(graph) > 50, f"found only {len(graph)} modules"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n" + describe(cycle, graph)


def test_no_import_inside_a_function_but_the_listed_ones() -> None:
    found = lazy_imports()
    allowed = set(LAZY_IMPORTS)
    unlisted = sorted(f"{where}: {target}" for (_, target), where in found.items()
                      if (_, target) not in allowed)
    assert unlisted == [], "move these imports to the top of their module (or list them " \
                           "in LAZY_IMPORTS with the reason they must stay lazy)"
    stale = sorted(allowed - set(found))
    assert stale == [], "these are no longer lazy imports: delete their entries"
    assert all(reason.strip() for reason in LAZY_IMPORTS.values())


def test_the_cycle_finder_names_the_cycle_and_each_edge() -> None:
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3", "d": "c.py:4"},
             "d": {}}
    cycle = find_cycle(graph)
    assert cycle == ["a", "b", "c", "a"]
    assert describe(cycle, graph).splitlines() == [
        "  a -> b  (a.py:1)", "  b -> c  (b.py:2)", "  c -> a  (c.py:3)"]
    assert find_cycle({"a": {"b": "x"}, "b": {}, "c": {"b": "y"}}) is None


def test_the_graph_sees_lazy_and_type_checking_imports_and_resolves_submodules() -> None:
    modules = {name: Path() for name in
               ("daemon", "daemon.store", "daemon.store.queries", "daemon.app", "actors",
                "actors.ports")}
    source = """
from typing import TYPE_CHECKING
from daemon.store import queries, PgStore
import daemon.app
if TYPE_CHECKING:
    from actors.ports import Store
def late():
    from .. import app
    import importlib
    importlib.import_module("actors")
"""
    found = list(imports(source, "daemon.store.schedules", is_package=False))
    lazy = {imp.target for imp in found if imp.lazy}
    assert lazy == {"daemon", "importlib", "actors"}
    deps = set().union(*(resolve(imp, modules) for imp in found))
    # `queries` is a module: depends on it; `PgStore` is a name: depends on the package.
    assert deps == {"daemon.store.queries", "daemon.store", "daemon.app", "actors.ports",
                    "actors"}
    # A cycle through a lazy import is a cycle: nothing is skipped unless listed.
    assert "daemon.app" in resolve(next(i for i in found if i.target == "daemon"), modules)
