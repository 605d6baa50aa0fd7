"""No test reaches into the vLLM integration's private state: tests drive it through its
hooks and composed parts (scheduler/, worker/, metrics/), which take what they need in
their constructors. Checked with `ast`: an attribute name with a leading underscore that
only lmcache/integration/ defines (set on self, or a method) must not be read or written
in tests/, and no test builds an integration class with `__new__`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _private_names(files) -> set[str]:
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = node.name
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                name = node.attr
            else:
                continue
            if name.startswith("_") and not name.startswith("__"):
                names.add(name)
    return names


def _class_names(files) -> set[str]:
    return {node.name for path in files for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.ClassDef)}


def reaches_into_integration(package: Path, tests: Path) -> list[str]:
    integration = list((package / "integration").rglob("*.py"))
    elsewhere = [p for p in package.rglob("*.py") if "integration" not in p.relative_to(package).parts]
    private = _private_names(integration) - _private_names(elsewhere)
    classes = _class_names(integration)
    problems = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(tests.parent)}:{getattr(node, 'lineno', 0)}"
            if (isinstance(node, ast.Attribute) and node.attr in private
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self")):
                problems.append(f"{where}: {ast.unparse(node)}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__new__"
                  and isinstance(node.func.value, ast.Name) and node.func.value.id in classes):
                problems.append(f"{where}: {ast.unparse(node)}")
    return problems


def test_no_test_reaches_into_the_integrations_private_state():
    problems = reaches_into_integration(ROOT / "lmcache", ROOT / "tests")
    assert not problems, "tests reaching into private integration state:\n" + "\n".join(problems)


def test_the_check_sees_planted_reaches(tmp_path):
    package, tests = tmp_path / "lmcache", tmp_path / "tests"
    files = {
        package / "integration" / "part.py": "class Part:\n    def __init__(self):\n        self._held = set()\n"
                                             "    def _helper(self):\n        self._clock = 0\n",
        package / "v1" / "other.py": "class Other:\n    def __init__(self):\n        self._clock = 1\n",
        tests / "test_ok.py": "def test(p, leases):\n    p.held_requests()\n    leases._clock = 5\n",
        tests / "test_bad.py": "def test(impl):\n    impl.worker._held.clear()\n    impl._helper()\n"
                               "    Part.__new__(Part)\n",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    problems = reaches_into_integration(package, tests)
    assert sorted(p.split(": ")[1] for p in problems) == ["Part.__new__(Part)", "impl._helper", "impl.worker._held"]
