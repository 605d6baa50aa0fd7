"""Test hooks: corrupting loaded KV on purpose, so that end-to-end tests can see that a
layout mix-up would show. They answer only in processes started with LMCACHE_TEST_HOOKS
set (tests/e2e/); through the lookup channel's control message, or, for processes the
tests cannot reach that way (e.g. `vllm serve`), while the file LMCACHE_TEST_CORRUPT_FILE
names exists."""

from __future__ import annotations

import logging
import os

import torch

from lmcache.integration.vllm.config import truthy

logger = logging.getLogger(__name__)

TEST_HOOKS_ENV = "LMCACHE_TEST_HOOKS"
CORRUPT_FILE_ENV = "LMCACHE_TEST_CORRUPT_FILE"


class TestHooks:
    __test__ = False  # not a pytest class

    def __init__(self, environ=os.environ):
        self._environ = environ
        self.allowed = truthy(environ.get(TEST_HOOKS_ENV, ""))
        self.corrupt_loads = False

    def set_corrupt_loads(self, on: bool) -> bool:
        if not self.allowed:
            raise PermissionError(f"test hooks are off in this process (set {TEST_HOOKS_ENV}=1 to allow them)")
        self.corrupt_loads = bool(on)
        return self.corrupt_loads

    def corrupting(self) -> bool:
        if self.corrupt_loads:
            return True
        path = self._environ.get(CORRUPT_FILE_ENV) if self.allowed else None
        return bool(path) and os.path.exists(path)

    @staticmethod
    def corrupt(connector, r) -> None:
        """Swap the K and V of what was just loaded for request meta `r`, as a layout
        mix-up would (the tests must see the difference)."""
        from lmcache.v1.memory import MemoryObj

        start, end = r.load_from, r.load_to
        n = end - start
        if n < 1 or connector.memory_format.num_planes != 2:
            return
        obj = MemoryObj(torch.empty(connector.get_shape(n), dtype=connector.kv_dtype), connector.memory_format)
        slots = r.load.slot_mapping[start:end].to(torch.long)
        connector.batched_from_gpu([obj], [0], [n], slot_mapping=slots)
        obj.tensor.copy_(obj.tensor.flip(0))
        connector.batched_to_gpu([obj], [0], [n], slot_mapping=slots)
        logger.warning("LMCache TEST HOOK: corrupted %d loaded tokens of %s", n, r.req_id)
