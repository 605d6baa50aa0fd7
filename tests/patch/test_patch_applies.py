"""patches/lmcache-X-hpu.patch against the real upstream release X, for each base."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.upstream_lmcache import PATCHES_DIR, git_apply

pytestmark = pytest.mark.network

# What each published release is (PyPI), and the files its patch adds.
RELEASES = {
    "0.4.2": (2_166_994, "9a3a216e0d0275c88e62bac0f1c8a0dace45564da4653504c36d26d8013cbafc"),
    "0.5.6": (9_437_980, "d6951e60ce8818a76aa42d0866a4ba85f1c95cd919355fff30ff24dcc3243f1e"),
}
NEW_FILES = {"0.4.2": ["lmcache/v1/gpu_connector/hpu_connector.py"], "0.5.6": []}


def touched_paths(patch: Path) -> list[str]:
    return [line[len("+++ b/"):] for line in patch.read_text().splitlines() if line.startswith("+++ b/")]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_sdist_is_the_release(upstream_base, upstream_sdist, base_version):
    size, sha256 = RELEASES[base_version]
    assert upstream_sdist.stat().st_size == size
    assert upstream_base.sha256_of(upstream_sdist) == sha256
    upstream_base.verify_sdist(upstream_sdist, base_version)


def test_verify_rejects_a_different_file(upstream_base, upstream_sdist, base_version, tmp_path):
    altered = tmp_path / upstream_sdist.name
    data = bytearray(upstream_sdist.read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    with pytest.raises(upstream_base.BaseFetchError, match="sha256"):
        upstream_base.verify_sdist(altered, base_version)


def test_readme_names_the_base(upstream_base, base_version):
    readme = (PATCHES_DIR / "README.md").read_text()
    base = upstream_base.get_base(base_version)
    assert base.sdist_sha256 in readme
    assert f"{base.sdist_size:,}" in readme
    assert base.patch_path.name in readme


def test_patch_applies_compiles_and_reverts_byte_for_byte(upstream_base, pristine_tree, base_version):
    patch = upstream_base.get_base(base_version).patch_path
    original = tree_digest(pristine_tree)

    check = git_apply(pristine_tree, patch, "--check")
    assert check.returncode == 0, check.stderr
    applied = git_apply(pristine_tree, patch)
    assert applied.returncode == 0, applied.stderr

    touched = touched_paths(patch)
    assert touched, "the patch touches no file"
    for rel in touched:
        path = pristine_tree / rel
        if path.suffix == ".py":
            compile(path.read_text(), str(path), "exec")  # SyntaxError fails the test
    patched = tree_digest(pristine_tree)
    assert {rel for rel in touched if patched.get(rel) != original.get(rel)} == set(touched)
    assert git_apply(pristine_tree, patch, "--check").returncode != 0, "the patch applies twice"

    reverse_check = git_apply(pristine_tree, patch, "-R", "--check")
    assert reverse_check.returncode == 0, reverse_check.stderr
    reverted = git_apply(pristine_tree, patch, "-R")
    assert reverted.returncode == 0, reverted.stderr
    assert tree_digest(pristine_tree) == original


def test_patch_stays_inside_the_package_and_adds_only_what_it_must(upstream_base, pristine_tree, base_version):
    patch = upstream_base.get_base(base_version).patch_path
    touched = touched_paths(patch)
    assert all(rel.startswith("lmcache/") for rel in touched), touched
    assert "deleted file mode" not in patch.read_text()
    new_files = [rel for rel in touched if not (pristine_tree / rel).exists()]
    assert new_files == NEW_FILES[base_version]


def test_make_patch_reproduces_the_committed_patch(upstream_sdist, patched_tree, base_version, tmp_path):
    # The base version comes from the tree's PKG-INFO (no --base given).
    out = tmp_path / "regenerated.patch"
    proc = subprocess.run(
        [sys.executable, str(PATCHES_DIR / "make_patch.py"), str(patched_tree),
         "-o", str(out), "--sdist", str(upstream_sdist)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (PATCHES_DIR / f"lmcache-{base_version}-hpu.patch").read_bytes()


def test_0_5_6_patch_only_adds_lines_outside_the_hpu_connector(upstream_base):
    # What CUDA runs stays byte for byte: utils.py only gains the helpers, and
    # mem_alloc.py only gains a probe taken when the device type is "hpu".
    removed: dict[str, int] = {}
    current = None
    for line in upstream_base.get_base("0.5.6").patch_path.read_text().splitlines():
        if line.startswith("+++ b/"):
            current = line[len("+++ b/"):]
            removed[current] = 0
        elif line.startswith("-") and not line.startswith("---"):
            removed[current] += 1
    assert set(removed) == {"lmcache/utils.py", "lmcache/v1/gpu_connector/hpu_connector.py",
                            "lmcache/v1/platform/torch_ops/mem_alloc.py"}  # fmt: skip
    assert removed["lmcache/utils.py"] == removed["lmcache/v1/platform/torch_ops/mem_alloc.py"] == 0
