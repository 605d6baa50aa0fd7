"""The two ways this package reads a yes/no value.

`parse_bool` is strict, for config keys and URL options: a bool, the ints 0 and 1, or
one of the words below in any case; anything else is an error naming what is accepted.
`truthy` is lenient, for on/off switches (LMCACHE_* test and debug variables, upstream's
boolean kv_connector_extra_config entries, which upstream reads as Python truth): unset,
"", 0, false, no and off are off, everything else is on. vllm-gaudi's own flags are read
by vllm-gaudi's rule, not these (integration/vllm/runner.py).
"""

from __future__ import annotations

from typing import Any

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
ACCEPTED = "true/false, 1/0, yes/no or on/off"


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
    raise ValueError(f"{value!r} is not a boolean; accepted: {ACCEPTED}")


def truthy(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return value.strip().lower() not in ("", *FALSE_WORDS)
    return bool(value)
