"""The house rules of the tree, checked: who may import whom, no import cycles, one process
per package import, modules of a readable size, the environment read only at the edges."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("greenmim_core", "workers", "service")
MAX_LINES = 400

# room -> prefixes it must never import (lazily or not)
FORBIDDEN = {
    "greenmim_core": ("workers", "service"),
    "workers": ("service",),
    "service.client": ("service.server", "service.stack"),
    "service.schemas": ("service.server", "service.stack", "service.client"),
    "service.states": ("service.server", "service.stack", "service.client"),
    "service.server": ("service.client", "service.stack", "service.cli"),
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def test_rooms_import_only_what_they_may() -> None:
    mods = modules()
    wrong = []
    for name, path in mods.items():
        for room, banned in FORBIDDEN.items():
            if name == room or name.startswith(room + "."):
                for target in imports(name, path, top_level_only=False):
                    if any(target == b or target.startswith(b + ".") for b in banned):
                        wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    """Module-level imports between our modules form no cycle (depth-first search)."""
    mods = modules()
    graph = {
        name: {t for t in imports(name, path, top_level_only=True) if t in mods and t != name}
        for name, path in mods.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize(
    "module",
    [
        "greenmim_core",
        "workers.run",
        "service.client.commands",
        "service.server.app",
        "service.cli",
    ],
)
def test_each_entry_imports_on_its_own(module: str) -> None:
    """A fresh interpreter imports it with nothing else loaded first."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_client_loads_without_the_model_stack() -> None:
    """``greenmim status`` and friends need neither torch nor the server."""
    probe = (
        "import sys, service.client.commands; "
        "print(sorted(m for m in ('torch', 'service.server', 'ray') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "[]", done.stderr[-2000:]


def test_modules_stay_readable() -> None:
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_the_environment_is_read_at_the_edges_only() -> None:
    """``os.environ[...]`` only in the settings edge and the worker entry point."""
    edges = {"service/server/config.py", "workers/run.py"}
    hits = []
    for pkg in ("service", "workers"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if "os.environ[" in line and rel not in edges:
                    hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
