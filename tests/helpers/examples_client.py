"""The test's client for docs/examples/disagg_prefill_lmcache_v1/disagg_example.sh,
run by that script once its servers are up (ports from its environment):

    python tests/helpers/examples_client.py SPEC.json OUT.json

For each prompt of the spec: one request through the proxy (the prefiller computes
and stores the prompt, the decoder loads it), then the same request straight to the
prefiller (vLLM's own prefix-cache hit there, at the same split), and the decoder's
external prefix-cache hits (Prometheus) before and after. A prompt marked "corrupt"
goes through while the file LMCACHE_TEST_CORRUPT_FILE names exists.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import httpx

HITS = re.compile(r"^vllm:external_prefix_cache_hits_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def complete(port: int, model: str, prompt: list[int]) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 5,
            "return_tokens_as_token_ids": True}
    response = httpx.post(f"http://localhost:{port}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    logprobs = response.json()["choices"][0]["logprobs"]
    return {"token_ids": logprobs["tokens"],
            "logprobs": [sorted(([t, lp] for t, lp in top.items()), key=lambda x: -x[1])
                         for top in logprobs["top_logprobs"]]}


def external_hits(port: int) -> float:
    text = httpx.get(f"http://localhost:{port}/metrics", timeout=30).text
    return sum(float(v) for v in HITS.findall(text))


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    proxy, prefiller, decoder = (int(os.environ[k]) for k in ("PROXY_PORT", "PREFILLER_PORT", "DECODER_PORT"))
    model = os.environ["MODEL"]
    corrupt_file = Path(os.environ["LMCACHE_TEST_CORRUPT_FILE"])
    results = {}
    for name, item in spec["prompts"].items():
        before = external_hits(decoder)
        if item.get("corrupt"):
            corrupt_file.touch()
        try:
            decoded = complete(proxy, model, item["ids"])
        finally:
            corrupt_file.unlink(missing_ok=True)
        results[name] = {"decoder": decoded, "decoder_hit": external_hits(decoder) - before,
                         "prefiller_own_hit": complete(prefiller, model, item["ids"])}
    Path(out_path).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
