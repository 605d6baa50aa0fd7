"""The bases of the patches here: upstream LMCache source releases (0.4.2, 0.5.6).

Fetches a release's sdist from PyPI with pip, checks its size and sha256, and
unpacks it. Shared by patches/make_patch.py, tests/patch/ and `python -m lmcache
bench patch`. The releases themselves are never committed to this repository.

    python patches/upstream_base.py DEST_DIR [--base 0.5.6] [--sdist lmcache-X.tar.gz] [--native]

prints the path of the unpacked tree (DEST_DIR/lmcache-X); --native also builds
0.5.6's small device-independent C++ extension (`lmcache.lmcache_native`) into it.

pip must build the sdist's metadata to download it, and that build needs torch,
setuptools_scm, wheel and ninja already installed in the running Python
(`pip install -e ".[test]"` brings them); NO_CUDA_EXT=1 and NO_NATIVE_EXT=1 keep
it from wanting CUDA or compiling anything.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PATCHES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Base:
    """One upstream release a patch applies to."""

    version: str
    sdist_size: int
    sdist_sha256: str
    # 0.5.6 imports a C++ extension (lmcache.lmcache_native) almost everywhere.
    needs_native: bool = False

    @property
    def sdist_name(self) -> str:
        return f"lmcache-{self.version}.tar.gz"

    @property
    def tree_name(self) -> str:
        return f"lmcache-{self.version}"

    @property
    def patch_path(self) -> Path:
        return PATCHES_DIR / f"lmcache-{self.version}-hpu.patch"


BASES = {
    "0.4.2": Base("0.4.2", 2_166_994, "9a3a216e0d0275c88e62bac0f1c8a0dace45564da4653504c36d26d8013cbafc"),
    "0.5.6": Base("0.5.6", 9_437_980, "d6951e60ce8818a76aa42d0866a4ba85f1c95cd919355fff30ff24dcc3243f1e",
                  needs_native=True),
}  # fmt: skip
DEFAULT_VERSION = "0.5.6"


class BaseFetchError(RuntimeError):
    """The base could not be downloaded, or what was downloaded is not the base."""


def get_base(version: str) -> Base:
    try:
        return BASES[version]
    except KeyError:
        raise BaseFetchError(f"no patch base {version!r}; known bases: {', '.join(BASES)}") from None


def download_sdist(dest_dir: Path, version: str, python: str = sys.executable, timeout: float = 600) -> Path:
    """`pip download` the release's sdist into dest_dir; returns its path."""
    base = get_base(version)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        python, "-m", "pip", "download", "--disable-pip-version-check",
        "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
        f"lmcache=={version}", "-d", str(dest_dir),
    ]  # fmt: skip
    env = {**os.environ, "NO_CUDA_EXT": "1", "NO_NATIVE_EXT": "1"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BaseFetchError(f"pip download of lmcache=={version} did not finish: {exc}") from exc
    sdist = dest_dir / base.sdist_name
    if proc.returncode != 0 or not sdist.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BaseFetchError(
            f"pip download of lmcache=={version} failed (exit {proc.returncode}); "
            f"command: {' '.join(cmd)} with NO_CUDA_EXT=1 NO_NATIVE_EXT=1\n{tail}"
        )
    return sdist


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sdist(sdist: Path, version: str) -> None:
    """Raise BaseFetchError unless sdist is exactly upstream's release `version`."""
    base = get_base(version)
    sdist = Path(sdist)
    size = sdist.stat().st_size
    if size != base.sdist_size:
        raise BaseFetchError(f"{sdist} is {size} bytes; the {version} release is {base.sdist_size}")
    got = sha256_of(sdist)
    if got != base.sdist_sha256:
        raise BaseFetchError(f"{sdist} has sha256 {got}; the {version} release has {base.sdist_sha256}")


def unpack_sdist(sdist: Path, dest_dir: Path, version: str) -> Path:
    """Unpack into dest_dir; returns dest_dir/lmcache-X.

    --no-same-owner: run as root, tar would keep the archive's owners and git
    would then refuse the tree ("dubious ownership").
    """
    base = get_base(version)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tree = dest_dir / base.tree_name
    if tree.exists():
        raise BaseFetchError(f"{tree} already exists; unpack into an empty directory")
    subprocess.run(
        ["tar", "--no-same-owner", "-xzf", str(sdist), "-C", str(dest_dir)],
        check=True, capture_output=True,
    )  # fmt: skip
    if not (tree / "lmcache" / "__init__.py").is_file():
        raise BaseFetchError(f"{sdist} did not unpack to {tree}/lmcache")
    return tree


def fetch_base(dest_dir: Path, version: str, sdist: Path | None = None) -> Path:
    """Download (unless sdist is given), verify and unpack the base into dest_dir."""
    dest_dir = Path(dest_dir)
    if sdist is None:
        sdist = download_sdist(dest_dir / "download", version)
    verify_sdist(sdist, version)
    return unpack_sdist(sdist, dest_dir, version)


def _native_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def build_native(tree: Path, cache_dir: Path | None = None, timeout: float = 600) -> Path:
    """Compile the tree's csrc/lmcache_native (pybind11 and the C++ standard
    library only) into tree/lmcache, with g++ and the pybind11 headers torch ships.

    Upstream's own build (`pip install -e .`) compiles it too, with CUDA and storage
    extensions around it; this builds just the one module the Python code imports.
    With cache_dir, the result is kept there by the sources' sha256 and reused.
    """
    tree = Path(tree)
    sources = sorted((tree / "csrc" / "lmcache_native").glob("*.cpp"))
    if not sources:
        raise BaseFetchError(f"{tree} has no csrc/lmcache_native sources")
    target = tree / "lmcache" / f"lmcache_native{_native_suffix()}"
    digest = hashlib.sha256()
    for src in sorted((tree / "csrc").glob("lmcache_native/*")) + [tree / "csrc" / "engine_kv_format.h"]:
        if src.is_file():
            digest.update(src.name.encode() + src.read_bytes())
    digest.update(sys.version.encode())
    cached = Path(cache_dir) / f"lmcache_native-{digest.hexdigest()[:16]}{_native_suffix()}" if cache_dir else None
    if cached is not None and cached.is_file():
        shutil.copy2(cached, target)
        return target

    import torch.utils.cpp_extension as cpp_extension  # the pybind11 headers torch ships

    includes = [sysconfig.get_paths()["include"], *cpp_extension.include_paths()[:1],
                str(tree / "csrc" / "lmcache_native"), str(tree / "csrc")]  # fmt: skip
    flags = ["-O1", "-fPIC", "-std=c++17", *(f"-I{i}" for i in includes)]
    with tempfile.TemporaryDirectory(prefix="lmcache-native-") as tmp:
        objects = [Path(tmp) / f"{src.stem}.o" for src in sources]

        def compile_one(pair):
            src, obj = pair
            return subprocess.run(["g++", *flags, "-c", str(src), "-o", str(obj)],
                                  capture_output=True, text=True, timeout=timeout)  # fmt: skip

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            results = list(pool.map(compile_one, zip(sources, objects)))
        failed = [r for r in results if r.returncode != 0]
        if not failed:
            link = subprocess.run(["g++", "-shared", *map(str, objects), "-o", str(target), "-lpthread"],
                                  capture_output=True, text=True, timeout=timeout)  # fmt: skip
            failed = [link] if link.returncode != 0 else []
    if failed:
        raise BaseFetchError(f"building lmcache_native in {tree} failed:\n{failed[0].stderr[-3000:]}")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(target, cached)
    return target


def prepare_trees(version: str, cache: Path) -> dict[str, Path]:
    """The published and the patched tree of `version` under cache (made once;
    the patched one again whenever the patch changes)."""
    base = get_base(version)
    cache = cache / version
    sdist = cache / base.sdist_name
    if not sdist.is_file():
        download_sdist(cache, version)
    verify_sdist(sdist, version)
    patch_sha = sha256_of(base.patch_path)
    trees = {}
    for kind in ("unpatched", "patched"):
        root = cache / kind
        marker = root / ".ready"
        want = patch_sha if kind == "patched" else base.sdist_sha256
        if not (marker.is_file() and marker.read_text() == want):
            if root.exists():
                shutil.rmtree(root)
            tree = unpack_sdist(sdist, root, version)
            if kind == "patched":
                env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(root)}
                subprocess.run(["git", "apply", str(base.patch_path)], cwd=tree, env=env, check=True)
            if base.needs_native:
                build_native(tree, cache / "native")
            marker.write_text(want)
        trees[kind] = root / base.tree_name
    return trees


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest_dir", type=Path, help="where to unpack (created if missing)")
    parser.add_argument("--base", default=DEFAULT_VERSION, choices=sorted(BASES), help="upstream release")
    parser.add_argument("--sdist", type=Path, help="use this lmcache-X.tar.gz instead of downloading")
    parser.add_argument("--native", action="store_true", help="also build lmcache_native into the tree")
    args = parser.parse_args(argv)
    try:
        tree = fetch_base(args.dest_dir, args.base, args.sdist)
        if args.native and get_base(args.base).needs_native:
            build_native(tree)
        print(tree)
    except BaseFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
