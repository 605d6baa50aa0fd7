"""What changes the KV of a prompt besides the model's name: the identity digest
that becomes part of every chunk key (token_database.identity_tag).

Two deployments that name the same model may serve different weights or compute
different KV: another revision, a fine-tune mounted at the same path, a model
updated in place, `--quantization fp8` vs bf16, another KV cache dtype, other
`--hf-overrides` (e.g. rope scaling). Each of those must give other keys, or one
deployment silently loads the other's KV, across restarts for the persistent tiers.

What is read, all from vLLM's config except the weights sample:
- model path or hub id, revision, code revision, `model_weights`;
- quantization (and its config), dtype, KV cache dtype (and layers kept unquantized);
- hf_overrides, and the rope settings of the resolved HF config;
- the weights themselves, cheaply: for a local directory or file, each weight
  file's name and size and a digest of 9 blocks of 4 KiB spread over it (a
  fine-tune or an in-place update changes them; identical copies on other
  machines give the same digest); for a hub id, the snapshot commit the local
  Hugging Face cache resolves it to (no network).
Not read: max_model_len, tokenizer, served_model_name, seeds (they do not change
the KV of a given token sequence). The digest is stable across processes and
restarts (token_database.material_digest: canonical JSON, blake2b).
"""

from __future__ import annotations

import hashlib
import logging
import os

from lmcache.v1.token_database import material_digest

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_MAX_WEIGHT_FILES = 512
_SAMPLES = 9
_SAMPLE_BYTES = 4096
_ROPE_FIELDS = ("rope_scaling", "rope_theta", "rope_parameters", "max_position_embeddings")


def model_identity(vllm_config) -> str:
    """The identity digest of the model vLLM serves (hex)."""
    model_config = vllm_config.model_config
    cache_config = getattr(vllm_config, "cache_config", None)
    hf_config = getattr(model_config, "hf_config", None)
    material = {
        "model": str(model_config.model),
        "revision": _plain(getattr(model_config, "revision", None)),
        "code_revision": _plain(getattr(model_config, "code_revision", None)),
        "model_weights": _plain(getattr(model_config, "model_weights", None)),
        "quantization": _plain(getattr(model_config, "quantization", None)),
        "quantization_config": _plain(getattr(model_config, "quantization_config", None)),
        "dtype": _plain(getattr(model_config, "dtype", None)),
        "kv_cache_dtype": _plain(getattr(cache_config, "cache_dtype", None)),
        "kv_cache_dtype_skip_layers": _plain(getattr(cache_config, "kv_cache_dtype_skip_layers", None)),
        "hf_overrides": _plain(getattr(model_config, "hf_overrides", None)),
        "rope": {name: _plain(getattr(hf_config, name, None)) for name in _ROPE_FIELDS},
        "weights": weights_identity(str(getattr(model_config, "model_weights", None) or model_config.model),
                                    getattr(model_config, "revision", None)),
    }
    return material_digest(material)


def weights_identity(model: str, revision: str | None = None) -> str:
    """A digest of the weights at a local path, or the cached snapshot commit of a hub id ('' if unknown)."""
    if os.path.isdir(model):
        names = sorted(n for n in os.listdir(model) if n.endswith(_WEIGHT_SUFFIXES) or n == "config.json")
        files = [os.path.join(model, n) for n in names[:_MAX_WEIGHT_FILES]]
    elif os.path.isfile(model):
        files = [model]
    else:
        return _hub_commit(model, revision)
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        try:
            digest.update(_file_sample(path))
        except OSError as exc:
            logger.warning("LMCache: cannot read %s for the model identity (%s); keys name its size only", path, exc)
    return digest.hexdigest()


def _file_sample(path: str) -> bytes:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        parts = [os.path.basename(path).encode(), b"\0", str(size).encode(), b"\0"]
        if size <= _SAMPLES * _SAMPLE_BYTES:
            parts.append(f.read())
        else:
            for i in range(1, _SAMPLES + 1):
                offset = min(size - _SAMPLE_BYTES, size * i // _SAMPLES)
                parts.append(os.pread(f.fileno(), _SAMPLE_BYTES, offset))
    return b"".join(parts)


def _hub_commit(repo_id: str, revision: str | None) -> str:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - not a hub id, no huggingface_hub: the name and revision must do
        return ""
    if isinstance(found, str):
        return os.path.basename(os.path.dirname(found))  # .../snapshots/<commit>/config.json
    return ""


def _plain(value):
    """`value` as JSON-able data with a stable form (dicts sorted by json.dumps)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(value) and hasattr(value, "__qualname__"):  # e.g. an hf_overrides function
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        try:
            return _plain(to_dict())
        except Exception:  # noqa: BLE001
            pass
    return str(value)
