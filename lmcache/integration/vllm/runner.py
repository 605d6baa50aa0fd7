"""What each model runner calls on a KV connector and reads back, in one place.

vLLM's GPU and CPU model runners call every KV connector hook. vllm-gaudi's HPU runner
does not: it never calls the per-layer hooks (start_load_kv/wait_for_layer_load/
save_kv_layer per layer), never reads load errors (get_block_ids_with_load_errors),
never calls handle_preemptions, and never calls the worker-side stats or events hooks
in a forward step (so the workers report over the lookup channel on every device:
metrics/worker.py). Every caller asks `runner_for_device` or `runner_of_config`.

Start-up checks for settings of vllm-gaudi under which LMCache would serve wrong KV:
vllm-gaudi's online defragmenter moves KV blocks to other physical blocks when block
ids spread out, and remaps the ids for its own runner only: no connector is told. Slots
that LMCache builds from the scheduler's block ids would then read and write other
requests' KV. vllm-gaudi decides it in vllm_gaudi/extension/features.py:

    use_contiguous_pa = VLLM_CONTIGUOUS_PA if set, else (prefix caching is off)
    defrag            = VLLM_DEFRAG        if set, else use_contiguous_pa

with its boolean parser (true/t/1/yes/y/on, case-insensitive; anything else is false).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

_TRUE = {"true", "t", "1", "yes", "y", "on"}


@dataclass(frozen=True)
class RunnerTraits:
    name: str
    calls_layer_hooks: bool
    reads_load_errors: bool
    calls_handle_preemptions: bool


VLLM_RUNNER = RunnerTraits("vLLM's GPU/CPU model runner", calls_layer_hooks=True, reads_load_errors=True,
                           calls_handle_preemptions=True)
GAUDI_RUNNER = RunnerTraits("Gaudi (HPU)", calls_layer_hooks=False, reads_load_errors=False,
                            calls_handle_preemptions=False)


def runner_for_device(device_type: str | None) -> RunnerTraits:
    """The runner that drives KV caches of this device type (the tensors' `.device.type`)."""
    return GAUDI_RUNNER if device_type == "hpu" else VLLM_RUNNER


def runner_of_config(vllm_config) -> RunnerTraits:
    """The runner vLLM's device config names (before any KV cache exists)."""
    return runner_for_device(getattr(getattr(vllm_config, "device_config", None), "device_type", None))


def _env_flag(environ: Mapping[str, str], name: str) -> bool | None:
    value = environ.get(name)
    return None if value is None else value.strip().lower() in _TRUE


def online_defragmenter(vllm_config, environ: Mapping[str, str]) -> tuple[bool, str]:
    """Whether vllm-gaudi runs its online defragmenter here, and why."""
    prefix_caching = bool(getattr(getattr(vllm_config, "cache_config", None), "enable_prefix_caching", False))
    defrag = _env_flag(environ, "VLLM_DEFRAG")
    if defrag is not None:
        return defrag, f"VLLM_DEFRAG={environ['VLLM_DEFRAG']}"
    contiguous = _env_flag(environ, "VLLM_CONTIGUOUS_PA")
    if contiguous is not None:
        return contiguous, f"VLLM_CONTIGUOUS_PA={environ['VLLM_CONTIGUOUS_PA']}"
    if prefix_caching:
        return False, "prefix caching is on"
    return True, "prefix caching is off and VLLM_CONTIGUOUS_PA is not set (vllm-gaudi then turns it on)"


def refuse_unsafe_settings(runner: RunnerTraits, vllm_config, environ: Mapping[str, str]) -> None:
    """Raise ValueError at registration where this runner's settings would serve wrong KV."""
    if runner is GAUDI_RUNNER:
        refuse_online_defragmenter(vllm_config, environ)


def refuse_online_defragmenter(vllm_config, environ: Mapping[str, str]) -> None:
    """Raise ValueError on Gaudi when the online defragmenter would be on."""
    on, why = online_defragmenter(vllm_config, environ)
    if not on:
        return
    if _env_flag(environ, "VLLM_DEFRAG"):
        fix = "set VLLM_DEFRAG=false (or unset it and set VLLM_CONTIGUOUS_PA=false)"
    elif _env_flag(environ, "VLLM_CONTIGUOUS_PA"):
        fix = "set VLLM_CONTIGUOUS_PA=false (or VLLM_DEFRAG=false)"
    else:
        fix = "set VLLM_CONTIGUOUS_PA=false, or keep vLLM's prefix caching on (drop --no-enable-prefix-caching)"
    raise ValueError(
        f"LMCache cannot run with vllm-gaudi's online defragmenter ({why}): it moves KV blocks "
        "without telling KV connectors, so LMCache would save and load other requests' KV. "
        f"Fix: {fix}. See docs/gaudi.md."
    )
