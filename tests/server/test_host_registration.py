"""The server's shared memory is registered for device copies in a worker that copies
through it (CUDA: cudaHostRegister), never in a process that only looks up (a scheduler),
and not at all on CPU or Gaudi (pageable); the outcome is recorded on the arena and said
in one line."""

from __future__ import annotations

import logging

import pytest

from lmcache.platforms import current_platform
from lmcache.v1.config import LMCacheEngineConfig
from tests.helpers.workload import make_engine, prompt_tokens, store_prompt

N = 64


def _arena(engine):
    return engine.storage.link.connection().arena


def test_a_lookup_only_process_registers_nothing_and_a_storing_one_tries_once(cache_server, caplog):
    if current_platform().device_type != "cpu":
        pytest.skip("the CPU platform's no-op path (this machine has an accelerator)")
    config = LMCacheEngineConfig.from_defaults(**cache_server.config())
    looker, _ = make_engine(config, N)
    engine, conn = make_engine(config, N)
    try:
        assert looker.lookup(prompt_tokens(1, N)) == 0
        assert _arena(looker).host_registered is None  # a scheduler's lookups: not tried
        with caplog.at_level(logging.INFO, logger="lmcache"):
            assert store_prompt(engine, conn, 1, N) == N
            assert store_prompt(engine, conn, 2, N) == N
        assert _arena(engine).host_registered is False  # tried: the CPU platform registers nothing
        lines = [r.getMessage() for r in caplog.records if "shared memory" in r.getMessage()]
        assert len(lines) == 1 and "pageable here" in lines[0], lines
    finally:
        engine.close()
        looker.close()


def test_cuda_registers_the_mapped_arena_as_pinned_memory(cache_server):
    if current_platform().device_type != "cuda":
        pytest.skip("needs an NVIDIA GPU (CUDA platform): none on this machine")
    engine, conn = make_engine(LMCacheEngineConfig.from_defaults(**cache_server.config()), N)
    try:
        assert store_prompt(engine, conn, 1, N) == N
        arena = _arena(engine)
        assert arena.host_registered is True
        assert arena.tensor.is_pinned()
    finally:
        engine.close()
