"""Every import of this package's own modules, also the ones inside functions (which run
only when that path runs: a bench mode, an error branch), names a module that exists and
names it defines. Read with `ast`; nothing is imported. A module moved without its lazy
importers being updated fails here, not in a user's hands."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TREES = ("lmcache", "tests")
# these run in a process whose `lmcache` is an upstream release (the patch and interop probes)
UPSTREAM_SIDE = {"tests/helpers/patched_probe.py", "tests/helpers/probe_056.py", "tests/helpers/upstream_lm_driver.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for tree in TREES:
        for path in (ROOT / tree).rglob("*.py"):
            if str(path.relative_to(ROOT)) in UPSTREAM_SIDE:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _defined(tree: ast.Module) -> set[str] | None:
    """Names a module defines at its top level (None: it has a module __getattr__, any name may exist)."""
    names: set[str] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == "__getattr__":
                return None
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            todo += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                     *(s for h in getattr(node, "handlers", []) for s in h.body)]
    return names


def unresolved(modules: dict[str, Path]) -> list[str]:
    defined = {name: _defined(ast.parse(path.read_text(encoding="utf-8"))) for name, path in modules.items()}
    problems = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in TREES and alias.name not in modules:
                        problems.append(f"{where}: import {alias.name}: no such module")
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module \
                    and node.module.split(".")[0] in TREES:
                if node.module not in modules:
                    problems.append(f"{where}: from {node.module}: no such module")
                    continue
                names = defined[node.module]
                for alias in node.names:
                    if alias.name != "*" and f"{node.module}.{alias.name}" not in modules \
                            and names is not None and alias.name not in names:
                        problems.append(f"{where}: from {node.module} import {alias.name}: not defined there")
    return problems


def test_every_import_of_our_own_modules_resolves():
    assert unresolved(_modules()) == []


def test_a_moved_module_and_a_missing_name_are_caught(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from lmcache.integration.vllm.worker_stats import loaded_tokens\n"
                       "    from lmcache.v1.leases import LeaseTable, NoSuchThing\n")
    problems = [p for p in unresolved({**_modules(), "planted": planted}) if p.startswith("planted.py")]
    assert problems == ["planted.py:2: from lmcache.integration.vllm.worker_stats: no such module",
                        "planted.py:3: from lmcache.v1.leases import NoSuchThing: not defined there"]
