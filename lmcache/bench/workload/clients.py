"""HTTP clients of vLLM's OpenAI-compatible `/v1/completions` (stdlib only).

Prompts go as token ids, decoding is greedy with `ignore_eos` (every request generates
exactly `max_tokens`), and each answer carries its token ids and top log-probabilities
(`return_tokens_as_token_ids`), so outputs of two servers can be compared token by token.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence
from urllib.parse import urlsplit


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)  # top tokens per position
    ttft: float = 0.0  # seconds to the first generated token
    latency: float = 0.0  # seconds to the last
    sent_at: float = 0.0  # time.perf_counter() when the request went out
    token_times: list[float] = field(default_factory=list)  # perf_counter() of each token's arrival
    error: str | None = None


def _token_id(text: str) -> int:
    # "token_id:123" with return_tokens_as_token_ids
    return int(text.rsplit(":", 1)[1])


def _absorb(out: Completion, choice: dict) -> None:
    lp = choice.get("logprobs") or {}
    tokens = lp.get("tokens") or []
    out.token_ids.extend(_token_id(t) for t in tokens)
    for top in lp.get("top_logprobs") or []:
        out.logprobs.append({_token_id(t): float(v) for t, v in (top or {}).items()})


def complete(base_url: str, model: str, prompt: Sequence[int], max_tokens: int, *, logprobs: int = 5,
             stream: bool = True, timeout: float = 600.0, out: Completion | None = None) -> Completion:
    """One request; faults come back in `.error` (the caller counts them), never raised.
    `out`: a Completion to fill as tokens arrive (another thread may watch it)."""
    parts = urlsplit(base_url)
    body = json.dumps({
        "model": model, "prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "logprobs": logprobs, "return_tokens_as_token_ids": True, "stream": stream,
    }).encode()
    out = Completion() if out is None else out
    start = out.sent_at = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            out.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return out
        if not stream:
            for choice in json.loads(resp.read()).get("choices", []):
                _absorb(out, choice)
            out.ttft = out.latency = time.perf_counter() - start
        else:
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                before = len(out.token_ids)
                for choice in json.loads(data).get("choices", []):
                    _absorb(out, choice)
                now = time.perf_counter()
                out.token_times.extend([now] * (len(out.token_ids) - before))
                if before == 0 and out.token_ids:
                    out.ttft = now - start
            out.latency = time.perf_counter() - start
        if len(out.token_ids) != max_tokens:
            out.error = f"{len(out.token_ids)} tokens generated, {max_tokens} asked"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return out


def run_in_flight(jobs: Iterable[Callable[[], object]], concurrency: int) -> list:
    """Run the jobs with at most `concurrency` in flight; results in the jobs' order."""
    jobs = list(jobs)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(lambda job: job(), jobs))


class Gate:
    """Lets the soak's client threads pause (a server restart) and stop."""

    def __init__(self):
        self._open = threading.Event()
        self._open.set()
        self.stopped = threading.Event()
        self._busy = 0
        self._idle = threading.Condition()

    def pause(self) -> None:
        """Close the gate and wait until no request is in flight."""
        self._open.clear()
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0)

    def resume(self) -> None:
        self._open.set()

    def enter(self) -> bool:
        while not self.stopped.is_set():
            if self._open.wait(0.2):
                with self._idle:
                    if self._open.is_set():
                        self._busy += 1
                        return True
        return False

    def leave(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()
