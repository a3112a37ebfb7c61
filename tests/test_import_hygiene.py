"""The house's walls: engine/ never imports the TUI; the TUI process imports from engine/ only the
protocol, the client and what they need (never the daemon, the worker or torch); and no engine module
imports another that imports it back, at the top or inside a function (harlequin's test_import_hygiene)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

ENGINE = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                for p in (ROOT / "engine").rglob("*.py") if "samples" not in p.parts and p.name != "__main__.py")
APP = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for p in (ROOT / "app").rglob("*.py"))


def loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ENGINE)
def test_engine_modules_never_load_the_tui(module):
    loaded = loaded_after_import(module)
    assert not {m for m in loaded if m == "textual" or m.startswith(("textual.", "app."))}, module


@pytest.mark.parametrize("module", APP)
def test_the_tui_loads_no_daemon_worker_or_torch(module):
    loaded = loaded_after_import(module)
    heavy = {m for m in loaded if m.startswith(("engine.daemon", "engine.worker", "engine.eval", "engine.preflight",
                                               "torch", "transformers"))}
    assert not heavy, f"{module} loads {sorted(heavy)[:5]}"


def imports_of(module: str) -> set[str]:
    """The engine modules ``module`` imports anywhere (top level or inside a function)."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n in ENGINE and n != module)
    return out


def test_no_import_cycles_in_engine():
    graph = {m: imports_of(m) for m in ENGINE}
    # a package's __init__ imported by its own modules is not a cycle of the design (it only names them)
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not m.startswith(d + ".")}
    seen, path, cycles = set(), [], []

    def visit(m):
        if m in path:
            cycles.append(path[path.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()

    for m in ENGINE:
        visit(m)
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)
