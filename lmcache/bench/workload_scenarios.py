"""The two workloads of `bench workload`, as prompts of token ids.

long-doc-qa   D documents of L tokens; a warm-up round reads each once, then the measured
              round asks each Q short questions (document + question), all D*Q in one
              shuffled order, C requests in flight.
multi-round   U users, each a chat of R rounds: a private context, then per round a new
              user turn; the history (earlier turns and the model's own answers) grows
              every round. Rounds go in waves over all users (shuffled within a wave), C in
              flight. Round 1 reads each context for the first time: it is the warm-up.

Every first sight of a context is warm-up for every configuration alike; the figures are
the measured requests, on which vLLM's prefix cache can only help for what it still holds.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

SCENARIOS = ("long-doc-qa", "multi-round")


@dataclass(frozen=True)
class Sizes:
    docs: int = 6
    doc_tokens: int = 2048
    questions: int = 3
    question_tokens: int = 32
    users: int = 4
    rounds: int = 3
    context_tokens: int = 1024
    turn_tokens: int = 256
    max_tokens: int = 16
    concurrency: int = 4

    def scaled(self, scale: float) -> "Sizes":
        return replace(self, docs=max(1, round(self.docs * scale)), users=max(1, round(self.users * scale)))

    def longest_prompt(self) -> int:
        chat = self.context_tokens + self.rounds * self.turn_tokens + (self.rounds - 1) * self.max_tokens
        return max(self.doc_tokens + self.question_tokens, chat)

    def working_set_tokens(self) -> int:
        """Tokens of distinct context the measured requests come back to (the larger scenario)."""
        return max(self.docs * self.doc_tokens, self.users * self.longest_prompt())


DEFAULT = Sizes()
SMOKE = Sizes(docs=3, doc_tokens=512, questions=2, question_tokens=16, users=2, rounds=2,
              context_tokens=256, turn_tokens=128, max_tokens=4, concurrency=2)


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
