"""A small random Llama and a word-level tokenizer, built locally (no downloads).

Used by the demo, the vLLM end-to-end tests and `bench e2e`. The weights are random
but seeded, so two builds with the same spec are identical. The tokenizer is
trained with `tokenizers` on generated text whose words are all distinct tokens, so
`prompt_token_ids(n, seed)` can hand out prompts of exactly n tokens.

A random model with the usual 0.02 initialisation attends almost uniformly and its
outputs barely depend on the KV cache; `init_std` is raised so that wrong KV shows up
clearly in the log-probabilities.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_SYLLABLES = [
    "ba", "ce", "di", "fo", "gu", "ha", "je", "ki", "lo", "mu", "na", "pe", "qi", "ro",
    "su", "ta", "ve", "wi", "xo", "yu", "za", "bre", "cla", "dro", "fli", "gro", "ple",
    "sta", "tri", "vor", "zen", "mar",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
_SPEC_FILE = "lmcache_tiny_llama.json"


@dataclass(frozen=True)
class TinyLlamaSpec:
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    num_words: int = 2000  # tokenizer vocabulary (words) besides the special tokens
    max_position_embeddings: int = 16384
    init_std: float = 0.08
    dtype: str = "bfloat16"
    seed: int = 0

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


# The reference model of `bench e2e` (8 layers, hidden 1024, 8 heads, 4 KV heads).
BENCH_SPEC = TinyLlamaSpec(
    num_layers=8, hidden_size=1024, num_heads=8, num_kv_heads=4, intermediate_size=2816
)


def vocabulary_words(num_words: int) -> list[str]:
    """`num_words` distinct pronounceable words, the same every time."""
    words: list[str] = []
    n = len(_SYLLABLES)
    i = 0
    while len(words) < num_words:
        a, b, c = i % n, (i // n) % n, i // (n * n)
        word = _SYLLABLES[a] + _SYLLABLES[b] + ("" if c == 0 else _SYLLABLES[(c - 1) % n])
        words.append(word)
        i += 1
    return words


def _train_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(vocab_size=len(words) + len(SPECIAL_TOKENS), special_tokens=SPECIAL_TOKENS)
    # A few lines of text that use every word (each once per line, so all are kept).
    rng = random.Random(1234)
    lines = []
    for _ in range(3):
        shuffled = words[:]
        rng.shuffle(shuffled)
        lines.extend(" ".join(shuffled[i : i + 40]) for i in range(0, len(shuffled), 40))
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def _spec_matches(path: Path, spec: TinyLlamaSpec) -> bool:
    spec_file = path / _SPEC_FILE
    if not spec_file.is_file():
        return False
    try:
        return json.loads(spec_file.read_text()) == asdict(spec)
    except (OSError, ValueError):
        return False


def build_tiny_llama(path: str | Path, spec: TinyLlamaSpec = TinyLlamaSpec()) -> Path:
    """Write a random Llama (safetensors) and its tokenizer into `path`; reuse it if
    a model with the same spec is already there. Returns the directory."""
    path = Path(path)
    if _spec_matches(path, spec):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    words = vocabulary_words(spec.num_words)
    raw = _train_tokenizer(words)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.model_max_length = spec.max_position_embeddings
    tokenizer.save_pretrained(path)

    vocab_size = raw.get_vocab_size()
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.init_std,
        bos_token_id=raw.token_to_id("<s>"),
        eos_token_id=raw.token_to_id("</s>"),
        tie_word_embeddings=False,
        torch_dtype=spec.dtype,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, spec.dtype))
    model.save_pretrained(path, safe_serialization=True)
    (path / _SPEC_FILE).write_text(json.dumps(asdict(spec)))
    logger.info("built a random Llama (%d layers, hidden %d) in %s", spec.num_layers, spec.hidden_size, path)
    return path


def prompt_token_ids(model_path: str | Path, num_tokens: int, seed: int = 0) -> list[int]:
    """`num_tokens` random word token ids of the tokenizer in `model_path` (no specials)."""
    vocab = json.loads((Path(model_path) / "tokenizer.json").read_text())["model"]["vocab"]
    ids = sorted(i for w, i in vocab.items() if w not in SPECIAL_TOKENS)
    rng = random.Random(seed)
    return [rng.choice(ids) for _ in range(num_tokens)]


def prompt_text(model_path: str | Path, num_tokens: int, seed: int = 0) -> str:
    """A text that the tokenizer in `model_path` turns into exactly `num_tokens` tokens."""
    vocab = json.loads((Path(model_path) / "tokenizer.json").read_text())["model"]["vocab"]
    by_id = {i: w for w, i in vocab.items()}
    return " ".join(by_id[i] for i in prompt_token_ids(model_path, num_tokens, seed))


def model_cache_dir(name: str) -> Path:
    """Where generated demo/bench models are kept between runs (~/.cache/lmcache/NAME)."""
    from lmcache.console import cache_dir

    return cache_dir() / name


# The demo's small model keeps outputs of cached and uncached runs bit-for-bit close
# (`python -m lmcache bench e2e` times the larger reference model).
DEMO_MODEL_DIR = "random-llama-4l-256"
BENCH_MODEL_DIR = "random-llama-8l-1024"


def make_prompt(model: str, num_tokens: int, vocab_size: int | None, seed: int) -> list[int]:
    """Token ids of a prompt: our tiny model's own words, or ordinary ids of another vocabulary."""
    if vocab_size is None:
        return prompt_token_ids(model, num_tokens, seed=seed)
    rng = random.Random(seed)
    # Ordinary vocabulary ids (special tokens sit at the ends of most vocabularies).
    low, high = min(1000, vocab_size // 4), max(vocab_size - 1000, vocab_size // 2)
    return [rng.randrange(low, high) for _ in range(num_tokens)]
