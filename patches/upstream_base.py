"""The base of lmcache-0.4.2-hpu.patch: upstream LMCache 0.4.2's source release.

Fetches the sdist from PyPI with pip, checks its size and sha256, and unpacks it.
Shared by patches/make_patch.py and tests/patch/. The release itself is never
committed to this repository.

    python patches/upstream_base.py DEST_DIR [--sdist lmcache-0.4.2.tar.gz]

prints the path of the unpacked tree (DEST_DIR/lmcache-0.4.2).

pip must build the sdist's metadata to download it, and that build needs torch,
setuptools_scm, wheel and ninja already installed in the running Python
(`pip install -e ".[test]"` brings them); NO_CUDA_EXT=1 keeps it from wanting CUDA.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

VERSION = "0.4.2"
SDIST_NAME = f"lmcache-{VERSION}.tar.gz"
SDIST_SIZE = 2_166_994
SDIST_SHA256 = "9a3a216e0d0275c88e62bac0f1c8a0dace45564da4653504c36d26d8013cbafc"
TREE_NAME = f"lmcache-{VERSION}"
PATCH_PATH = Path(__file__).resolve().with_name(f"lmcache-{VERSION}-hpu.patch")


class BaseFetchError(RuntimeError):
    """The base could not be downloaded, or what was downloaded is not the base."""


def download_sdist(dest_dir: Path, python: str = sys.executable, timeout: float = 600) -> Path:
    """`pip download` the 0.4.2 sdist into dest_dir; returns its path."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        python, "-m", "pip", "download", "--disable-pip-version-check",
        "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
        f"lmcache=={VERSION}", "-d", str(dest_dir),
    ]  # fmt: skip
    env = {**os.environ, "NO_CUDA_EXT": "1"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BaseFetchError(f"pip download of lmcache=={VERSION} did not finish: {exc}") from exc
    sdist = dest_dir / SDIST_NAME
    if proc.returncode != 0 or not sdist.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BaseFetchError(
            f"pip download of lmcache=={VERSION} failed (exit {proc.returncode}); "
            f"command: {' '.join(cmd)} with NO_CUDA_EXT=1\n{tail}"
        )
    return sdist


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sdist(sdist: Path) -> None:
    """Raise BaseFetchError unless sdist is exactly upstream's 0.4.2 release."""
    sdist = Path(sdist)
    size = sdist.stat().st_size
    if size != SDIST_SIZE:
        raise BaseFetchError(f"{sdist} is {size} bytes; the {VERSION} release is {SDIST_SIZE}")
    got = sha256_of(sdist)
    if got != SDIST_SHA256:
        raise BaseFetchError(f"{sdist} has sha256 {got}; the {VERSION} release has {SDIST_SHA256}")


def unpack_sdist(sdist: Path, dest_dir: Path) -> Path:
    """Unpack into dest_dir; returns dest_dir/lmcache-0.4.2.

    --no-same-owner: run as root, tar would keep the archive's owners and git
    would then refuse the tree ("dubious ownership").
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tree = dest_dir / TREE_NAME
    if tree.exists():
        raise BaseFetchError(f"{tree} already exists; unpack into an empty directory")
    subprocess.run(
        ["tar", "--no-same-owner", "-xzf", str(sdist), "-C", str(dest_dir)],
        check=True, capture_output=True,
    )  # fmt: skip
    if not (tree / "lmcache" / "__init__.py").is_file():
        raise BaseFetchError(f"{sdist} did not unpack to {tree}/lmcache")
    return tree


def fetch_base(dest_dir: Path, sdist: Path | None = None) -> Path:
    """Download (unless sdist is given), verify and unpack the base into dest_dir."""
    dest_dir = Path(dest_dir)
    if sdist is None:
        sdist = download_sdist(dest_dir / "download")
    verify_sdist(sdist)
    return unpack_sdist(sdist, dest_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest_dir", type=Path, help="where to unpack (created if missing)")
    parser.add_argument("--sdist", type=Path, help="use this lmcache-0.4.2.tar.gz instead of downloading")
    args = parser.parse_args(argv)
    try:
        print(fetch_base(args.dest_dir, args.sdist))
    except BaseFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
