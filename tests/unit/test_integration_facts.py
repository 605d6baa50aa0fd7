"""One home per fact inside the vLLM integration: which runner is which (the KV device
type "hpu" means vllm-gaudi's runner) is decided in runner.py only, and each flag of
kv_connector_extra_config the integration reads is read in config.py only. Read with
`ast` (string constants compared or looked up); nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

INTEGRATION = Path(__file__).resolve().parents[2] / "lmcache" / "integration" / "vllm"

# literal -> the one module of the integration that may spell it
HOMES = {"hpu": "runner.py", "use_layerwise": "config.py", "async_save": "config.py", "async_load": "config.py",
         "lmcache.use_layerwise": "config.py"}


def _reads(tree):
    """String constants that are read against: compared (`== "hpu"`, `"k" in extra`),
    looked up (`extra.get("k")`, `extra["k"]`). A key written into a reply is not a read."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            yield from [node.left, *node.comparators]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            yield from node.args[:1]
        elif isinstance(node, ast.Subscript):
            yield node.slice


def spelled_elsewhere(folder: Path) -> list[str]:
    problems = []
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _reads(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in HOMES
                    and path.relative_to(folder).as_posix() != HOMES[node.value]):
                problems.append(f"{path.relative_to(folder)}:{node.lineno}: {node.value!r} (home: {HOMES[node.value]})")
    return problems


def test_each_fact_is_spelled_in_its_one_module():
    problems = spelled_elsewhere(INTEGRATION)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("planted", ['if kv.device.type == "hpu":\n    pass\n',
                                     'flag = extra.get("async_load", True)\n'])
def test_the_check_sees_a_planted_second_reader(tmp_path, planted):
    (tmp_path / "runner.py").write_text('GAUDI = "hpu"\n')
    (tmp_path / "config.py").write_text('KEY = "async_load"\n')
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "part.py").write_text('"""Says "hpu" in its docstring: fine."""\n'
                                                 'reply = {"async_load": True}\n' + planted)
    problems = spelled_elsewhere(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("worker/part.py:3"), problems
