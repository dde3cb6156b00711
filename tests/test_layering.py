"""Imports point one way: quantizers <- allocator <- envs <- policies, with the CLI on top, and no
module or stage imports itself back through others (lazy and type-checking imports count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("quantizers", "allocator", "envs", "policies")
LAYERS = {"quantizers": 0, "allocator": 1, "envs": 2, "policies": 3, "allocator.cli": 4}
"""Rank of each layer: a module may import modules of its own rank or below."""


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Project modules ``name`` imports, anywhere in the file (resolved to the most specific module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the package itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def _stage(module: str) -> str:
    """``allocator.measure.profile`` -> ``allocator.measure``; other packages are one stage each."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "allocator" and len(parts) > 1 and (ROOT / parts[0] / parts[1]).is_dir() else parts[0]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    upward = sorted(t for t in GRAPH[module] if _layer(t) > _layer(module))
    assert not upward, f"{module} imports {upward}, a layer above it (quantizers <- allocator <- envs <- policies <- cli)"


def test_no_module_cycle() -> None:
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH) or [])


def test_no_stage_cycle() -> None:
    stages: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        stage = _stage(module)
        stages.setdefault(stage, set()).update(s for s in map(_stage, targets) if s != stage)
    assert _cycle(stages) is None, " -> ".join(_cycle(stages) or [])


def test_the_graph_is_real() -> None:
    """The checks above see the imports that exist (a parser that found none would pass them all)."""
    assert "allocator.table.sensitivity" in GRAPH["allocator.solvers.base"]
    assert "policies.solver" in GRAPH["allocator.cli.commands.solve"]
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_every_command_runs_with_its_parsed_arguments(capsys: pytest.CaptureFixture) -> None:
    """Each command module's ``run`` takes the parsed arguments (``bitalloc models`` once did not)."""
    import inspect

    from allocator.cli import main
    from allocator.cli.commands import COMMANDS

    assert all(list(inspect.signature(command.run).parameters) == ["args"] for command in COMMANDS)
    assert main(["models"]) == 0 and "smollm2-135m" in capsys.readouterr().out
