"""LMCache's own log lines inside vLLM processes (vLLM configures only its "vllm" logger)."""

from __future__ import annotations

import logging
import os

LOG_LEVEL_ENV = "LMCACHE_LOG_LEVEL"


def ensure_log_handler() -> None:
    """Show LMCache's own log lines inside vLLM processes (vLLM configures only its
    "vllm" logger). Level from LMCACHE_LOG_LEVEL (default INFO). Leaves any handler
    the application installed alone."""
    root = logging.getLogger("lmcache")
    if root.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[lmcache %(levelname)s %(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    level = os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    root.setLevel(level if level in logging._nameToLevel else "INFO")
