"""The architecture's rules, checked on the source: who may import whom, and no import circles.

- The core (every module of ``fedsim/`` outside ``fedsim/algorithms/``) knows no algorithm: it never imports an
  algorithm package. An algorithm is ``fedsim/algorithms/<name>/`` plus its server part (``strategies/``) and its
  client part (``clients/``).
- ``strategies/`` and ``clients/`` never import each other; they meet through the algorithm's protocol.
- The algorithm packages import neither part (the math and the protocol do not depend on who runs them).
- ``fedsim``'s modules form no import circle (function-level imports included: a lazy import is still a
  dependency).

Imports are read with ``ast`` (static ``import`` / ``from ... import`` statements, wherever they stand).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# installed names of the three source trees (see pyproject's package-dir)
TREES = {"fedsim": ROOT / "fedsim", "fedsim.strategies": ROOT / "strategies", "fedsim.clients": ROOT / "clients"}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for prefix, base in TREES.items():
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str, path: Path) -> set[str]:
    """The fedsim modules ``name`` imports (a ``from pkg import mod`` counts as ``pkg.mod`` when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import fedsim.x.y` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_rules_see_the_tree() -> None:
    """Guards the checker itself: it finds the algorithm packages and the imports of known modules."""
    assert "fedsim.algorithms.afl.protocol" in MODULES and "fedsim.strategies.afl" in MODULES
    assert "fedsim.algorithms.afl.protocol" in GRAPH["fedsim.strategies.afl"]
    assert "fedsim.registry" in GRAPH["fedsim.algorithms.afl.protocol"]


def test_the_core_imports_no_algorithm() -> None:
    offenders = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if _in(name, "fedsim") and not _in(name, "fedsim.algorithms")
        and not _in(name, "fedsim.strategies") and not _in(name, "fedsim.clients")
        for target in targets if _in(target, "fedsim.algorithms") and target != "fedsim.algorithms"
    )
    assert not offenders, "the core must not know an algorithm:\n" + "\n".join(offenders)


@pytest.mark.parametrize("side, other", [("fedsim.strategies", "fedsim.clients"),
                                         ("fedsim.clients", "fedsim.strategies"),
                                         ("fedsim.algorithms", "fedsim.strategies"),
                                         ("fedsim.algorithms", "fedsim.clients")])
def test_parts_meet_only_through_the_protocol(side: str, other: str) -> None:
    offenders = sorted(f"{name} imports {target}" for name, targets in GRAPH.items() if _in(name, side)
                       for target in targets if _in(target, other))
    assert not offenders, "\n".join(offenders)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    # a package's __init__ that re-exports its own modules is not a circle with them
    graph = {name: {t for t in targets if not (_is_package(t) and _in(name, t))} for name, targets in GRAPH.items()}
    circles = _cycles(graph)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)
