"""The package's structure, checked: no import circles (lazy imports inside functions
included), and the reference network (charnn/nn) imports nothing of the engine, the command
line or the jobs."""

from __future__ import annotations

import ast
from pathlib import Path

import charnn

ROOT = Path(charnn.__file__).parent


def module_graph() -> dict:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package
                    for _ in range(node.level - 1):
                        base = base.rsplit(".", 1)[0]
                    base = base + "." + node.module if node.module else base
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" for a in node.names]
                deps.update(t if t in mods else base for t in targets)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict) -> list:
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert cycles(module_graph()) == []


def test_the_reference_imports_nothing_of_the_engine_or_the_application():
    graph = module_graph()
    for name, deps in graph.items():
        if name.startswith("charnn.nn"):
            bad = sorted(d for d in deps if d.startswith(("charnn.engine", "charnn.cli", "charnn.io")) or
                         d in ("charnn.train", "charnn.sample", "charnn.score", "charnn.gradcheck"))
            assert not bad, (name, bad)


def test_the_checker_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
