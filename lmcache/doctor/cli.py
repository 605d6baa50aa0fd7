"""`python -m lmcache doctor`: what is wrong with this setup, and the fix.

Checks the device lmcache would use, vLLM and the connector names it resolves, the
merged config (and where every value came from), each configured tier (reached for real,
with probes of its own), and that keys are stable across processes. Exit code 0: all
OK; 1: warnings; 2: failures. Never starts vLLM or a device runtime (--probe-device
asks the device runtime too).

    python -m lmcache doctor [--json] [--quick] [--probe-device] [--config FILE] [--kv-transfer-config JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from lmcache.doctor import config_check, device, keys, tiers, vllm_setup
from lmcache.doctor.report import FAIL, SKIP, Finding, exit_code, render_json, render_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1]
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    parser.add_argument("--probe-device", action="store_true",
                        help="also start the device runtime: device count, lazy/eager mode, pinned memory")
    parser.add_argument("--config", help="an LMCache YAML file (default: $LMCACHE_CONFIG_FILE)")
    parser.add_argument("--kv-transfer-config", metavar="JSON",
                        help="the kv-transfer config given to vLLM (default: $VLLM_KV_TRANSFER_CONFIG): its "
                             "kv_connector_extra_config joins the config, its policy is checked")
    parser.add_argument("--quick", action="store_true",
                        help="skip the two checks that start Python child processes (connector names, which "
                             "import vLLM, and key stability): a second or two instead of vLLM's import time")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each remote tier (default 2)")


def _kv_transfer_config(args) -> tuple[dict | None, str, list[Finding]]:
    text, where = args.kv_transfer_config, "--kv-transfer-config"
    if text is None and os.environ.get("VLLM_KV_TRANSFER_CONFIG"):
        text, where = os.environ["VLLM_KV_TRANSFER_CONFIG"], "env VLLM_KV_TRANSFER_CONFIG"
    if text is None:
        return None, "", []
    try:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(f"a JSON {type(value).__name__}")
    except ValueError as exc:
        return None, where, [Finding("vllm.kv_transfer_config", FAIL, f"{where} is not a JSON object: {exc}",
                                     "pass the same JSON object vLLM gets, e.g. '{\"kv_connector\":\"lmcache\"}'")]
    return value, where, []


def _skipped(check: str):
    return lambda *_: [Finding(check, SKIP, "not checked (--quick)")]


def collect(args) -> list[Finding]:
    if args.config:
        os.environ["LMCACHE_CONFIG_FILE"] = os.path.abspath(args.config)
    kv_config, where, findings = _kv_transfer_config(args)
    extra = (kv_config or {}).get("kv_connector_extra_config") or {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        # the two checks that wait on child processes run while the others work
        connectors = pool.submit(_skipped("vllm.connectors") if args.quick else vllm_setup.connectors)
        config_findings, config = config_check.checks(extra)
        stable = pool.submit(_skipped("keys.stable") if args.quick else keys.checks, config)
        findings = [*device.checks(args.probe_device), *vllm_setup.versions(), *findings]
        findings += connectors.result()
        findings += vllm_setup.settings(kv_config, where)
        findings += config_findings
        findings += tiers.checks(config, args.timeout)
        findings += stable.result()
    return findings


def _seconds_since_start(fallback_start: float) -> float:
    """Wall time since this process started (imports included), where Linux tells it."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - fallback_start


def run(args) -> int:
    if args.timeout <= 0:
        print(f"--timeout {args.timeout}: accepted: a number of seconds > 0", file=sys.stderr)
        return 2  # as argparse does for bad arguments (1 means warnings here)
    start = time.perf_counter()
    findings = collect(args)
    seconds = _seconds_since_start(start)
    print(render_json(findings, seconds) if args.json else render_text(findings, seconds), flush=True)
    return exit_code(findings)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m lmcache.doctor.cli")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
