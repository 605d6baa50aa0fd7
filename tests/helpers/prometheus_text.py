"""Reading vLLM's /metrics text: one series' value, and the lines worth showing."""

from __future__ import annotations


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of series `name` whose labels include `labels` (None if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def excerpt(text: str, prefixes=("lmcache:", "vllm:prompt_tokens_cached_by_source", "vllm:external_prefix")) -> str:
    return "\n".join(line for line in text.splitlines()
                     if line.startswith(prefixes) and "_bucket" not in line and "_created" not in line)
