"""No import cycle among the package's modules.

The graph has one edge per module-level `import lmcache...` / `from lmcache... import`
(imports inside functions or classes, and under `if TYPE_CHECKING:`, are left out: they
run after every module has loaded; inside integration/ they count too). `from lmcache.a import b` points at module `a.b`
where that is a module, else at `a`. Read with `ast` from the files; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lmcache"

def module_name(package: Path, path: Path) -> str:
    parts = (package.name,) + path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module):
    """Import nodes run when the module loads: not in a def/class, not under TYPE_CHECKING."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, ast.With):
            todo += node.body


def _every_import(tree: ast.Module):
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def import_graph(package: Path, lazy_too: bool = False) -> dict[str, set[str]]:
    """`lazy_too`: imports inside functions make edges as well."""
    read = _every_import if lazy_too else _top_level_imports
    modules = {module_name(package, p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in read(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import lmcache.a.b.C`: the module part
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_no_import_cycle_in_the_package():
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles (module-level imports):\n" + "\n".join(" <-> ".join(sorted(c)) for c in found)


def test_no_cycle_in_the_vllm_integration_even_through_lazy_imports():
    # the integration once closed a cycle with an import inside a function (prom_metrics ->
    # lmcache_connector_v1 for an isinstance check); its parts now get what they need instead
    found = [c for c in cycles(import_graph(PACKAGE, lazy_too=True))
             if any(m.startswith("lmcache.integration.") for m in c)]
    assert not found, "\n".join(" <-> ".join(sorted(c)) for c in found)


@pytest.mark.parametrize("planted", [
    {"lmcache/a.py": "from lmcache.b import x\n", "lmcache/b.py": "import lmcache.c\nx = 1\n",
     "lmcache/c.py": "from lmcache import a\n"},
    {"lmcache/pkg/__init__.py": "from lmcache.pkg.mod import thing\n",
     "lmcache/pkg/mod.py": "from lmcache.pkg import other\nthing = 1\n",
     "lmcache/pkg/other.py": "try:\n    import lmcache.pkg.mod\nexcept ImportError:\n    pass\n"},
])
def test_checker_sees_a_planted_cycle(tmp_path, planted):
    files = {"lmcache/__init__.py": "", "lmcache/ok.py": "def f():\n    from lmcache import a\n", **planted}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = cycles(import_graph(tmp_path / "lmcache"))
    assert len(found) == 1 and "lmcache.ok" not in found[0], found


def test_imports_inside_functions_and_type_checking_make_no_edge(tmp_path):
    files = {"lmcache/__init__.py": "", "lmcache/a.py": "from lmcache.b import x\n",
             "lmcache/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lmcache import a\n"
                             "x = 1\ndef f():\n    import lmcache.a\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert cycles(import_graph(tmp_path / "lmcache")) == []
