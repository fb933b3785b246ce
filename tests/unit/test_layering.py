"""Import arrows over the whole tree, read with `ast` (nothing is imported): pipelines -> rigface, never back;
no import cycle among rigface's modules nor among its top-level parts; rigface.model never imports rigface.face,
rigface.face never imports rigface.model; Ray only in pipelines/.

Every import counts, also those inside functions (lazy imports are arrows too); only ``if TYPE_CHECKING:``
blocks are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rigface", "pipelines")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) for every .py under rigface/ and pipelines/."""
    mods = {}
    for top in PACKAGES:
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _import_nodes(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between our own modules, every imported top-level name per module)."""
    mods = _modules()

    def own(name: str) -> str | None:  # the module of ours that `name` lives in (a submodule or its package)
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    external: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for name in names:
                target = own(name)
                if target is None:
                    external[mod].add(name.split(".")[0])
                elif target != mod:
                    edges[mod].add(target)
    return edges, external


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, or None (iterative DFS with colours)."""
    colour = dict.fromkeys(edges, 0)  # 0 new, 1 on the stack, 2 done
    for start in edges:
        if colour[start]:
            continue
        path, iters = [start], [iter(sorted(edges[start]))]
        colour[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                iters.pop()
            elif colour.get(nxt, 2) == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt, 2) == 0:
                colour[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(edges.get(nxt, ()))))
    return None


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def _arrows(edges, src: str, dst: str) -> list[str]:
    inside = lambda m, p: m == p or m.startswith(p + ".")  # noqa: E731
    return sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs if inside(a, src) and inside(b, dst))


def test_the_graph_sees_the_imports_it_must(graph):
    edges, external = graph
    # Guards against a reader that finds nothing (and so passes everything below).
    assert "rigface.config" in edges["pipelines.train"] and "rigface.face.types" in edges["rigface.face.detect"]
    assert "rigface.face.backends" in edges["rigface.face.detect"]  # a lazy import inside a function
    assert "ray" in external["pipelines.prepare"] and "torch" in external["rigface.model.rigface_model"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_rigface_never_imports_pipelines(graph):
    assert _arrows(graph[0], "rigface", "pipelines") == []


def test_model_and_face_do_not_import_each_other(graph):
    assert _arrows(graph[0], "rigface.model", "rigface.face") == []
    assert _arrows(graph[0], "rigface.face", "rigface.model") == []


def test_no_import_cycle_among_modules(graph):
    assert find_cycle(graph[0]) is None


def test_no_import_cycle_among_rigface_parts(graph):
    """rigface.face, rigface.model, rigface.data, rigface.eval, rigface.commands, rigface.config, ... as units."""
    unit = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    parts: dict[str, set[str]] = {}
    for a, bs in graph[0].items():
        if a.startswith("rigface."):
            parts.setdefault(unit(a), set()).update(unit(b) for b in bs if b.startswith("rigface.") and unit(b) != unit(a))
    assert find_cycle(parts) is None


def test_ray_only_in_pipelines(graph):
    users = sorted(m for m, names in graph[1].items() if "ray" in names and not m.startswith("pipelines"))
    assert users == []
