"""Small random extras for the tiny Llama, built locally (no downloads, no peft):

* `build_tiny_lora`: a LoRA adapter in PEFT's on-disk format (adapter_config.json and
  adapter_model.safetensors) on the attention projections, k_proj and v_proj included,
  so an adapter changes the KV cache itself: KV served to the wrong adapter shows up in
  the log-probabilities.
* `build_tiny_llava`: a vision-language model vLLM serves as LLaVA: a tiny CLIP vision
  tower and projector on the tiny Llama, with a LLaVA processor whose image processor is
  the PIL one (torchvision is not installed). An image becomes `IMAGE_TOKENS` placeholder
  tokens of `IMAGE_TOKEN` in the prompt.

Weights are seeded: two builds with the same arguments are identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lmcache.testing.tiny_llama import TinyLlamaSpec, build_tiny_llama

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 56, 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # per image ("default" strategy: no CLS)
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
    recipe = {"kind": "lora", "spec": spec.__dict__ if hasattr(spec, "__dict__") else str(spec),
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


def build_tiny_llava(path: str | Path, spec: TinyLlamaSpec = TinyLlamaSpec(), seed: int = 0) -> Path:
    """A random LLaVA (tiny CLIP tower + projector + the tiny Llama) and its processor."""
    path = Path(path)
    recipe = {"kind": "llava", "spec": spec.__dict__, "seed": seed, "image": IMAGE_SIZE, "patch": PATCH_SIZE}
    if _is_built(path, recipe):
        return path
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    text_dir = build_tiny_llama(path / "text", spec)  # its tokenizer and config
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = LlamaConfig.from_pretrained(text_dir)
    text_config.vocab_size = len(tokenizer)
    vision_config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64,
    )
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    config.torch_dtype = spec.dtype
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        # the random init of the text model's own config (a raised std, tiny_llama.py); the
        # vision features must move the KV clearly too: a larger projector
        for module in model.model.language_model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                module.weight.normal_(0.0, spec.init_std)
        model.lm_head.weight.normal_(0.0, spec.init_std)
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(8.0)
    model = model.to(getattr(torch, spec.dtype))
    model.save_pretrained(path, safe_serialization=True)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    (path / _DONE).write_text(json.dumps(recipe))
    shutil.rmtree(path / "__pycache__", ignore_errors=True)
    return path


def image_token_id(model_path: str | Path) -> int:
    config = json.loads((Path(model_path) / "config.json").read_text())
    return int(config["image_token_index"])


def test_image(seed: int, size: int = IMAGE_SIZE):
    """A random RGB image (PIL), the same for the same seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), mode="RGB")
