"""One home for reading yes/no values (lmcache/v1/booleans.py)."""

import ast
from pathlib import Path

import pytest

from lmcache.v1 import booleans
from lmcache.v1.config import ConfigError, load_config
from lmcache.v1.remote_urls import parse_redis_seeds

PACKAGE = Path(__file__).resolve().parents[2] / "lmcache"
# vllm-gaudi's flags are read by vllm-gaudi's own rule (t/y count as true), a fact about it
BOOLEAN_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off", "t", "f", "y", "n", ""}
OWN_RULES = {"v1/booleans.py", "integration/vllm/runner.py"}


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), (1, True), (0, False),
    ("true", True), (" YES ", True), ("On", True), ("1", True),
    ("false", False), ("no", False), ("OFF", False), ("0", False),
])
def test_strict_reads_the_accepted_words(value, expected):
    assert booleans.parse_bool(value) is expected


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, None, "t", 1.5])
def test_strict_refuses_anything_else_naming_what_is_accepted(value):
    with pytest.raises(ValueError, match="accepted: true/false, 1/0, yes/no or on/off"):
        booleans.parse_bool(value)


@pytest.mark.parametrize("value, expected", [
    (None, False), ("", False), ("0", False), ("false", False), (" No ", False), ("off", False),
    ("1", True), ("yes", True), ("anything", True), (True, True), (0, False),
])
def test_lenient_is_on_unless_unset_or_a_false_word(value, expected):
    assert booleans.truthy(value) is expected


def test_a_config_key_and_a_url_option_use_the_strict_reading():
    with pytest.raises(ConfigError, match="save_unfull_chunk"):
        load_config(environ={"LMCACHE_SAVE_UNFULL_CHUNK": "maybe"})
    assert load_config(environ={"LMCACHE_SAVE_UNFULL_CHUNK": "On"}).save_unfull_chunk is True
    with pytest.raises(ValueError, match="read_from_replicas=true|false"):
        parse_redis_seeds("redis-cluster://127.0.0.1:7000?read_from_replicas=t")
    assert parse_redis_seeds("redis-cluster://127.0.0.1:7000?read_from_replicas=YES").read_from_replicas


def _word_sets(tree: ast.AST):
    """Collections of string constants that spell boolean words ("yes"/"on"/"true")."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Set, ast.Tuple, ast.List)):
            words = [e.value.strip().lower() for e in node.elts if isinstance(e, ast.Constant)
                     and isinstance(e.value, str)]
            if len(words) >= 2 and len(words) == len(node.elts) and set(words) <= BOOLEAN_WORDS:
                yield node.lineno


def test_no_module_spells_its_own_boolean_words():
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in OWN_RULES:
            continue
        found += [f"{rel}:{line}" for line in _word_sets(ast.parse(path.read_text()))]
    assert not found, f"boolean word sets outside lmcache/v1/booleans.py: {found}"
