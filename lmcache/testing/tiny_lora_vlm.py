"""Small random extras for the tiny Llama, built locally (no downloads, no peft):

* `build_tiny_lora`: a LoRA adapter in PEFT's on-disk format (adapter_config.json and
  adapter_model.safetensors) on the attention projections, k_proj and v_proj included,
  so an adapter changes the KV cache itself: KV served to the wrong adapter shows up in
  the log-probabilities.
* `build_tiny_vlm`: a vision-language model vLLM serves as Idefics3: a tiny vision tower
  and projector on a Llama of the tiny Llama's shape, with an Idefics3 processor whose
  image processor is the PIL one (torchvision is not installed). Each `IMAGE_TOKEN` of a
  token-id prompt becomes `IMAGE_PLACEHOLDER_TOKENS` placeholder tokens.

Weights are seeded: two builds with the same arguments are identical.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from lmcache.testing.tiny_llama import TinyLlamaSpec, build_tiny_llama

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 112, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 // 4  # per image: a 2x2 pixel shuffle of the patches
# vLLM replaces each IMAGE_TOKEN of a prompt by <fake_token_around_image><global-img>, the
# IMAGE_TOKENS image tokens and <fake_token_around_image>: the item's placeholder range
IMAGE_PLACEHOLDER_TOKENS = IMAGE_TOKENS + 3
_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_DONE = "lmcache_built.json"


def _is_built(path: Path, recipe: dict) -> bool:
    try:
        return json.loads((path / _DONE).read_text()) == recipe
    except (OSError, ValueError):
        return False


def build_tiny_lora(path: str | Path, base_model: str | Path, spec: TinyLlamaSpec = TinyLlamaSpec(),
                    rank: int = 8, seed: int = 1, scale: float = 0.5) -> Path:
    """A random LoRA adapter for the tiny Llama of `spec` in `path` (reused if built)."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    recipe = {"kind": "lora", "spec": asdict(spec),
              "rank": rank, "seed": seed, "scale": scale}
    if _is_built(path, recipe):
        return path
    path.mkdir(parents=True, exist_ok=True)
    hidden, heads, kv_heads = spec.hidden_size, spec.num_heads, spec.num_kv_heads
    head = hidden // heads
    out_dims = {"q_proj": hidden, "k_proj": kv_heads * head, "v_proj": kv_heads * head, "o_proj": hidden}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for module in _LORA_TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * scale / hidden**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dims[module], rank, generator=gen) * scale
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": list(_LORA_TARGETS), "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "base_model_name_or_path": str(base_model), "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    (path / _DONE).write_text(json.dumps(recipe))
    return path


def build_tiny_vlm(path: str | Path, spec: TinyLlamaSpec = TinyLlamaSpec(), seed: int = 0) -> Path:
    """A random Idefics3 (a tiny SigLIP-style vision tower, a pixel-shuffle projector and
    a Llama of `spec`) and its processor. (vLLM's LLaVA needs torchvision: its module
    imports the Pixtral image processor, which does.)"""
    path = Path(path)
    recipe = {"kind": "idefics3", "spec": asdict(spec), "seed": seed, "image": IMAGE_SIZE, "patch": PATCH_SIZE}
    if _is_built(path, recipe):
        return path
    import torch
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    text_dir = build_tiny_llama(path / "text", spec)  # its tokenizer and config
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>", "<global-img>"]})
    text_config = json.loads((text_dir / "config.json").read_text())
    text_config["vocab_size"] = len(tokenizer)
    config = Idefics3Config(
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
        text_config=text_config, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), scale_factor=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    with torch.no_grad():
        # the tiny Llama's raised init std (tiny_llama.py), so that KV differences show
        for module in model.model.text_model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, spec.init_std)
        model.lm_head.weight.normal_(0.0, spec.init_std)
        for p in model.model.connector.parameters():
            p.normal_(0.0, 0.5)  # image features large enough to move the KV clearly
    model.to(getattr(torch, spec.dtype)).save_pretrained(path, safe_serialization=True)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
    )
    Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IMAGE_TOKENS).save_pretrained(path)
    (path / _DONE).write_text(json.dumps(recipe))
    return path


def image_token_id(model_path: str | Path) -> int:
    config = json.loads((Path(model_path) / "config.json").read_text())
    return int(config["image_token_id"])


def random_image(seed: int, size: int = IMAGE_SIZE):
    """A random RGB image (PIL), the same for the same seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), mode="RGB")
