"""Helpers for the storage tests."""

import pytest

from tests.helpers.children import child_result, spawn_child


@pytest.fixture
def run_children():
    procs = []

    def run(*arg_dicts, env=None):
        started = [spawn_child(a, env) for a in arg_dicts]
        procs.extend(started)
        return [child_result(p) for p in started]

    yield run
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
