"""Which device lmcache would run on, and why; the device runtime is started only with --probe-device."""

from __future__ import annotations

import os

import torch

from lmcache.doctor.report import FAIL, OK, SKIP, WARN, Finding
from lmcache.platforms import DEVICE_TYPES, OVERRIDE_ENV
from lmcache.v1.booleans import truthy

BRIDGE = "the Habana bridge (habana-torch-plugin)"
BRIDGE_FIX = ("install Intel Gaudi's PyTorch bridge (habana-torch-plugin, from Intel's vault.habana.ai index, the "
              "version of your SynapseAI release); check the cards with `hl-smi`")


def _bridge_installed() -> bool:
    from lmcache.platforms.hpu import _bridge_importable  # find_spec only: nothing is imported

    return _bridge_importable()


def _facts() -> dict:
    return {
        "override": os.environ.get(OVERRIDE_ENV, "").strip(),
        "bridge": _bridge_installed(),
        "habana_visible": os.environ.get("HABANA_VISIBLE_DEVICES"),
        "gpu_migration": os.environ.get("PT_HPU_GPU_MIGRATION", "").strip(),
        "lazy_env": os.environ.get("PT_HPU_LAZY_MODE"),
        "torch_gpu_build": torch.version.cuda and f"CUDA {torch.version.cuda}"
        or (getattr(torch.version, "hip", None) and f"ROCm {torch.version.hip}"),
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def _platform_without_runtime(f: dict) -> Finding:
    name = "device.platform"
    if f["override"]:
        forced = f["override"].lower()
        if forced not in DEVICE_TYPES:
            return Finding(name, FAIL, f"{OVERRIDE_ENV}={f['override']!r} is not a device type",
                           f"set {OVERRIDE_ENV} to one of {', '.join(DEVICE_TYPES)}, or unset it to detect")
        if forced == "hpu" and not f["bridge"]:
            return Finding(name, FAIL, f"{OVERRIDE_ENV}=hpu, but {BRIDGE} is not installed",
                           f"{BRIDGE_FIX}; or unset {OVERRIDE_ENV}")
        if forced == "cuda" and not f["torch_gpu_build"]:
            return Finding(name, FAIL, f"{OVERRIDE_ENV}=cuda, but torch {torch.__version__} is a CPU-only build",
                           f"install a CUDA or ROCm build of torch; or unset {OVERRIDE_ENV}")
        return Finding(name, OK, f"{forced}: forced by {OVERRIDE_ENV}={f['override']}")
    if f["bridge"]:
        return Finding(name, OK, f"hpu if a Gaudi card is visible: {BRIDGE} is installed (HPU is asked before CUDA); "
                                 "--probe-device confirms")
    if f["torch_gpu_build"]:
        return Finding(name, OK, f"cuda if a GPU is visible: torch is a {f['torch_gpu_build']} build, no Habana "
                                 f"bridge; CUDA_VISIBLE_DEVICES={f['cuda_visible']!r}; --probe-device confirms")
    return Finding(name, OK, f"cpu: no Habana bridge installed, and torch {torch.__version__} is a CPU-only build")


def _gaudi_env(f: dict) -> list[Finding]:
    out = []
    if f["habana_visible"] is not None and not f["bridge"]:
        out.append(Finding("device.gaudi_env", WARN,
                           f"HABANA_VISIBLE_DEVICES={f['habana_visible']!r} is set, but {BRIDGE} is not installed: "
                           "lmcache cannot use a Gaudi card", BRIDGE_FIX))
    migration = f["gpu_migration"]
    if truthy(migration):
        if f["bridge"]:
            out.append(Finding("device.gpu_migration", OK,
                               "PT_HPU_GPU_MIGRATION=1: CUDA calls are routed to the HPU and CUDA reports itself "
                               "available; lmcache asks for HPU first, so it still picks hpu"))
        else:
            out.append(Finding("device.gpu_migration", WARN,
                               "PT_HPU_GPU_MIGRATION=1 is set, but without the Habana bridge it does nothing",
                               "unset it, or install the bridge"))
    elif f["bridge"]:
        out.append(Finding("device.gpu_migration", OK, f"PT_HPU_GPU_MIGRATION={migration or 'unset'} (off)"))
    if f["bridge"] or f["lazy_env"] is not None:
        out.append(Finding("device.lazy_mode", OK,
                           f"PT_HPU_LAZY_MODE={f['lazy_env'] or 'unset'}; what the bridge really runs is asked of it "
                           "with --probe-device"))
    return out


def _probe_runtime() -> list[Finding]:
    from lmcache.platforms import detect_device_type, make_platform

    try:
        device_type = detect_device_type()
    except (ValueError, RuntimeError) as exc:
        return [Finding("device.runtime", FAIL, str(exc), f"install the device's runtime or unset {OVERRIDE_ENV}")]
    platform = make_platform(device_type)
    out = [Finding("device.runtime", OK, f"{device_type}: {platform.device_count()} device(s) visible, using "
                                         f"{platform.device}")]
    if device_type == "hpu":
        out.append(Finding("device.lazy_mode", OK, f"the bridge reports {'lazy' if platform.is_lazy else 'eager'} "
                                                   "mode (lazy: graphs run at each flush; eager: op by op)"))
    if device_type == "cpu":
        out.append(Finding("device.pinned_memory", OK, "not needed: the KV cache already lives in host memory"))
    elif platform.pin_available:
        out.append(Finding("device.pinned_memory", OK, "pinned host buffers: available (fast host<->device copies)"))
    else:
        status = OK if device_type == "hpu" else WARN
        out.append(Finding("device.pinned_memory", status,
                           "pinned host buffers: refused by the runtime; lmcache uses pageable buffers"
                           + (" (vllm-gaudi says HPU has no pinned memory)" if device_type == "hpu" else ""),
                           "" if status == OK else "check the driver install (pinning is a driver service)"))
    return out


def checks(probe_device: bool = False) -> list[Finding]:
    f = _facts()
    out = [_platform_without_runtime(f), *_gaudi_env(f)]
    if probe_device:
        out.extend(_probe_runtime())
    else:
        out.append(Finding("device.runtime", SKIP, "the device runtime was not started (ask with --probe-device): "
                                                   "device count, lazy/eager mode and pinned memory not probed"))
    return out
