"""The house's walls: engine/ never imports the TUI; the TUI process imports from engine/ only the
protocol, the client and what they need (never the daemon, the worker or torch); and no engine module
imports another that imports it back, at the top or inside a function (harlequin's test_import_hygiene)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

ENGINE = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                for p in (ROOT / "engine").rglob("*.py") if "samples" not in p.parts and p.name != "__main__.py")
APP = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for p in (ROOT / "app").rglob("*.py"))


def first_to_load(modules: list[str], prefixes: tuple[str, ...]) -> dict[str, list[str]]:
    """Import ``modules`` one after another in one fresh process; each one that brings in a module named by
    ``prefixes`` (a name equal to one, or under it) → those modules. The first to load a forbidden module is
    the one named: a module imported again later costs nothing and shows nothing, so a clean module after a
    guilty one is still checked for what it alone would add (one process for all: ninety once took ~50 s)."""
    code = f"""
import importlib, json, sys
def bad():
    return {{m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in {prefixes!r})}}
found, seen = {{}}, set()
for module in {modules!r}:
    importlib.import_module(module)
    new = bad() - seen
    if new:
        found[module] = sorted(new)[:5]
        seen |= new
print(json.dumps(found))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_engine_modules_never_load_the_tui():
    assert len(ENGINE) > 40
    assert first_to_load(ENGINE, ("textual", "app")) == {}


def test_the_tui_loads_no_daemon_worker_or_torch():
    assert len(APP) > 10
    assert first_to_load(APP, ("engine.daemon", "engine.worker", "engine.eval", "engine.preflight", "torch",
                               "transformers")) == {}


def test_the_check_names_the_module_that_loads_what_it_must_not():
    """The check above can fail: engine.worker.step imports torch (engine.protocol does not, nor the trainer at its
    top); the module named is the one that loaded it."""
    found = first_to_load(["engine.protocol", "engine.worker.trainer", "engine.worker.step"], ("torch",))
    assert list(found) == ["engine.worker.step"] and found["engine.worker.step"][0] == "torch", found


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
