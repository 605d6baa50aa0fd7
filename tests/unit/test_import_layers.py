"""The package's floors: an import goes to the same area or one on a lower floor, never up.

    floor 0  platforms, console, logging     (nothing of ours below them)
    floor 1  v1 (engine, tiers, connectors), testing (emulation, tiny models), utils
    floor 2  integration (vLLM)
    floor 3  doctor
    floor 4  demo, bench
    floor 5  __main__

Imports inside functions count too: a lazy import up is still an arrow up. The imports
are read with `ast` from the files, nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lmcache"

FLOORS = {
    "platforms": 0, "console": 0, "logging": 0,
    "v1": 1, "testing": 1, "utils": 1,
    "integration": 2,
    "doctor": 3,
    "demo": 4, "bench": 4,
    "__main__": 5,
}


def module_name(package: Path, path: Path) -> str:
    parts = ("lmcache",) + path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def area(module: str) -> str | None:
    """`lmcache.v1.cache_engine` -> `v1`; the package's own __init__ has no area."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every `lmcache...` import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lmcache"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "lmcache":
                found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def upward_imports(package: Path) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        source = area(module_name(package, path))
        if source is None:
            continue
        if source not in FLOORS:
            problems.append(f"{path.relative_to(package)}: area {source!r} has no floor in FLOORS (add it)")
            continue
        for line, target_module in imports_of(path):
            target = area(target_module)
            if target is None or target == source:
                continue
            if target not in FLOORS:
                # `from lmcache import x`: x is the area
                problems.append(f"{path.relative_to(package)}:{line}: imports {target_module} (no floor)")
            elif FLOORS[target] >= FLOORS[source]:
                problems.append(
                    f"{path.relative_to(package)}:{line}: {source} (floor {FLOORS[source]}) imports "
                    f"{target_module} ({target}, floor {FLOORS[target]})"
                )
    return problems


def test_no_import_runs_up_a_floor():
    assert PACKAGE.is_dir()
    problems = upward_imports(PACKAGE)
    assert not problems, "imports that run up (or sideways between areas of one floor):\n" + "\n".join(problems)


@pytest.mark.parametrize("planted", [
    ("v1/engine_bad.py", "from lmcache.integration.vllm.utils import ENGINE_NAME\n"),
    ("platforms/bad.py", "def f():\n    import lmcache.v1.config\n"),
    ("demo.py", "from lmcache.bench.common import gbps\n"),
    ("testing/new_area_bad.py", "from lmcache.somewhere import x\n"),
])
def test_checker_sees_a_planted_upward_import(tmp_path, planted):
    for rel, text in {"v1/ok.py": "from lmcache.platforms import current_platform\n",
                      "bench/ok.py": "from lmcache.console import print_table\n",
                      planted[0]: planted[1]}.items():
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    problems = upward_imports(tmp_path)
    assert len(problems) == 1 and planted[0] in problems[0]
