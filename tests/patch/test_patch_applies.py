"""patches/lmcache-0.4.2-hpu.patch against the real upstream 0.4.2 release."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.upstream_lmcache import PATCHES_DIR, git_apply

pytestmark = pytest.mark.network

NEW_FILE = "lmcache/v1/gpu_connector/hpu_connector.py"


def touched_paths(patch: Path) -> list[str]:
    return [line[len("+++ b/"):] for line in patch.read_text().splitlines() if line.startswith("+++ b/")]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_sdist_is_the_0_4_2_release(upstream_base, upstream_sdist):
    assert upstream_sdist.stat().st_size == 2_166_994
    assert upstream_base.sha256_of(upstream_sdist) == (
        "9a3a216e0d0275c88e62bac0f1c8a0dace45564da4653504c36d26d8013cbafc"
    )
    upstream_base.verify_sdist(upstream_sdist)


def test_verify_rejects_a_different_file(upstream_base, upstream_sdist, tmp_path):
    altered = tmp_path / upstream_sdist.name
    data = bytearray(upstream_sdist.read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    with pytest.raises(upstream_base.BaseFetchError, match="sha256"):
        upstream_base.verify_sdist(altered)


def test_readme_names_the_base(upstream_base):
    readme = (PATCHES_DIR / "README.md").read_text()
    assert upstream_base.SDIST_SHA256 in readme
    assert f"{upstream_base.SDIST_SIZE:,}" in readme
    assert upstream_base.VERSION in readme


def test_patch_applies_compiles_and_reverts_byte_for_byte(upstream_base, pristine_tree):
    patch = upstream_base.PATCH_PATH
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


def test_patch_stays_inside_the_package_and_adds_only_the_hpu_connector(upstream_base, pristine_tree):
    text = upstream_base.PATCH_PATH.read_text()
    touched = touched_paths(upstream_base.PATCH_PATH)
    assert all(rel.startswith("lmcache/") for rel in touched), touched
    assert "deleted file mode" not in text
    new_files = [rel for rel in touched if not (pristine_tree / rel).exists()]
    assert new_files == [NEW_FILE]


def test_make_patch_reproduces_the_committed_patch(upstream_sdist, patched_tree, tmp_path):
    out = tmp_path / "regenerated.patch"
    proc = subprocess.run(
        [sys.executable, str(PATCHES_DIR / "make_patch.py"), str(patched_tree),
         "-o", str(out), "--sdist", str(upstream_sdist)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (PATCHES_DIR / "lmcache-0.4.2-hpu.patch").read_bytes()
