"""The two workloads of `bench workload`, as prompts of token ids.

long-doc-qa   D documents of L tokens; a warm-up round reads each once, then the measured
              round asks each Q short questions (document + question), all D*Q in one
              shuffled order, C requests in flight.
multi-round   U users, each a chat of R rounds: a private context, then per round a new
              user turn; the history (earlier turns and the model's own answers) grows
              every round. Rounds go in waves over all users (shuffled within a wave), C in
              flight. Round 1 reads each context for the first time: it is the warm-up.
stall         S streams decode while one more request's long prefix (P tokens, stored
              before, now only on LMCache's disk tier) is loaded: see stall.py.
multi-instance  two vLLM instances behind a round-robin router, private host tiers vs one
              shared `lmcache server`; D documents, Q' questions each: multi_instance.py.

Every first sight of a context is warm-up for every configuration alike; the figures are
the measured requests, on which vLLM's prefix cache can only help for what it still holds.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

SCENARIOS = ("long-doc-qa", "multi-round", "stall", "multi-instance")
DEFAULT_SCENARIOS = SCENARIOS[:3]  # multi-instance (four more vLLM servers) runs when asked for


@dataclass(frozen=True)
class Sizes:
    docs: int = 8
    doc_tokens: int = 2048
    questions: int = 2
    question_tokens: int = 32
    users: int = 8
    rounds: int = 2
    # a chat's history is long next to a turn: what LMCache cannot hold of a measured
    # prompt is the last partial chunk of the round before, the answer and the new turn
    context_tokens: int = 2048
    turn_tokens: int = 32
    max_tokens: int = 2
    concurrency: int = 2
    stall_prefix_tokens: int = 3072
    stall_streams: int = 2
    stall_stream_prompt_tokens: int = 64
    stall_stream_tokens: int = 32
    stall_reps: int = 2
    instance_rounds: int = 3  # multi-instance: questions per document (one per round)

    def scaled(self, scale: float) -> "Sizes":
        return replace(self, docs=max(1, round(self.docs * scale)), users=max(1, round(self.users * scale)))

    def chat_tokens(self) -> int:
        """A user's last prompt: the context, every turn, every answer but the last."""
        return self.context_tokens + self.rounds * self.turn_tokens + (self.rounds - 1) * self.max_tokens

    def longest_prompt(self) -> int:
        return max(self.doc_tokens + self.question_tokens, self.chat_tokens())

    def stall_tokens(self) -> int:
        """Device tokens the stall scenario has in use at once (the loader and the streams)."""
        streams = self.stall_streams * (self.stall_stream_prompt_tokens + self.stall_stream_tokens)
        return self.stall_prefix_tokens + STALL_SUFFIX_TOKENS + STALL_LOADER_TOKENS + streams

    def working_set_tokens(self) -> int:
        """Tokens of distinct context the measured requests come back to (the larger scenario)."""
        return max(self.docs * self.doc_tokens, self.users * self.chat_tokens())


STALL_SUFFIX_TOKENS = 16  # the loading request's own tokens after its long prefix
STALL_LOADER_TOKENS = 2  # tokens it generates

DEFAULT = Sizes()
SMOKE = Sizes(docs=4, doc_tokens=512, questions=2, question_tokens=16, users=5, rounds=2,
              context_tokens=384, turn_tokens=64, max_tokens=2, concurrency=2, stall_prefix_tokens=1024,
              stall_streams=1, stall_stream_prompt_tokens=32, stall_stream_tokens=64, stall_reps=1,
              instance_rounds=3)
# (the smoke's stream outlasts the load window even on a busy machine: 58 tokens after the send)


class TokenSource:
    """Random ordinary token ids of the model's tokenizer, reproducible per (kind, index)."""

    def __init__(self, model_dir: str):
        tok = json.loads((Path(model_dir) / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        specials = {t["content"] for t in tok.get("added_tokens", [])}
        self._ids = sorted(i for w, i in vocab.items() if w not in specials and not w.startswith("<"))

    def tokens(self, n: int, *key) -> list[int]:
        rng = random.Random(repr(key))
        return [rng.choice(self._ids) for _ in range(n)]


@dataclass
class Request:
    prompt: list[int]
    label: str


def long_doc_qa(sizes: Sizes, source: TokenSource, seed: int = 0) -> tuple[list[Request], list[Request]]:
    """(warm-up requests, measured requests in their shuffled order)."""
    docs = [source.tokens(sizes.doc_tokens, "doc", seed, d) for d in range(sizes.docs)]
    warmup = [Request(doc, f"doc{d}") for d, doc in enumerate(docs)]
    queries = [Request(docs[d] + source.tokens(sizes.question_tokens, "question", seed, d, q), f"doc{d}.q{q}")
               for d in range(sizes.docs) for q in range(sizes.questions)]
    random.Random(seed).shuffle(queries)
    return warmup, queries


class Chats:
    """The users' histories; each round's prompt is the history plus a new user turn, and
    the answer the server gives is appended before the next round."""

    def __init__(self, sizes: Sizes, source: TokenSource, seed: int = 0):
        self.sizes, self.source, self.seed = sizes, source, seed
        self.history = [source.tokens(sizes.context_tokens, "context", seed, u) for u in range(sizes.users)]
        self._order = random.Random(seed + 1)

    def wave(self, round_index: int) -> list[tuple[int, Request]]:
        users = list(range(self.sizes.users))
        self._order.shuffle(users)
        return [(u, Request(self.history[u] + self.source.tokens(self.sizes.turn_tokens, "turn", self.seed, u, round_index),
                            f"user{u}.r{round_index}")) for u in users]

    def answered(self, user: int, request: Request, answer: list[int]) -> None:
        self.history[user] = request.prompt + list(answer)
