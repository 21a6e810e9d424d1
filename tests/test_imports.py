"""The package's import graph: no cycles (module-level or inside functions), and the command line
(`fasttd3_lora.train`) imported by no module of the package."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import fasttd3_lora


def _spec_path(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # `from fasttd3_lora.x import name` where name is not a module
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _graph() -> dict[str, set[str]]:
    """Every module of the installed package and the package modules it imports. Found from the package's
    own directory and, for the subpackages installed from elsewhere (kernels/, tasks/, configs/ map into the
    package), from the imports that reach them."""
    pending = ["fasttd3_lora", *(m.name for m in pkgutil.walk_packages(fasttd3_lora.__path__, "fasttd3_lora."))]
    graph: dict[str, set[str]] = {}
    while pending:
        name = pending.pop()
        path = _spec_path(name)
        if name in graph or path is None:
            continue
        graph[name] = _imports(name, path)
        pending += [t for t in graph[name] if t not in graph]
        if path.name == "__init__.py":
            pending += [m.name for m in pkgutil.iter_modules([str(path.parent)], f"{name}.")]
    known = set(graph)
    return {name: {t for t in targets if t in known} for name, targets in graph.items()}


def _imports(name: str, path: Path) -> set[str]:
    """The package modules `name` imports anywhere in its file (type-checking blocks aside), with the packages
    each import runs on the way (`a.b.c` runs `a.b`'s __init__ too), except `name`'s own packages."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` bodies never run
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    closed = set()
    for target in targets:
        parts = target.split(".")
        closed.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    # a module's own packages ran before it did: importing from them is no edge
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    return {t for t in closed if t.startswith("fasttd3_lora.") and t not in own}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walk_sees_the_whole_package() -> None:
    graph = _graph()
    for name in ("fasttd3_lora.train", "fasttd3_lora.loops.kit", "fasttd3_lora.kernels.ops", "fasttd3_lora.tasks.dmc",
                 "fasttd3_lora.adapters", "fasttd3_lora.experiments.chain"):
        assert name in graph
    assert "fasttd3_lora.loops.kit" in graph["fasttd3_lora.loops.sac"]
    assert "fasttd3_lora.lora_projection" in graph["fasttd3_lora.kernels.ops"]
    # the detector finds a planted cycle
    assert _cycle({**graph, "fasttd3_lora.adapters": graph["fasttd3_lora.adapters"] | {"fasttd3_lora.lora"}})


def test_the_package_has_no_import_cycle() -> None:
    assert _cycle(_graph()) is None


def test_no_module_imports_the_command_line() -> None:
    graph = _graph()
    assert [name for name, targets in graph.items() if "fasttd3_lora.train" in targets] == []
