"""Regenerate lmcache-X-hpu.patch from an edited working tree of upstream release X.

    python patches/make_patch.py /path/to/edited/lmcache-0.5.6 [--base 0.5.6] [-o OUT] [--sdist SDIST]

The base version is read from the tree's PKG-INFO unless --base names it.
Fetches a pristine copy of the base (patches/upstream_base.py: pip download,
size and sha256 check, unpack) into a temporary directory, lays the edited
tree's files over it, and writes `git diff` of the two to OUT (default:
patches/lmcache-X-hpu.patch). Build and editor leftovers (.git, __pycache__,
*.egg-info, compiled extensions, the generated _version.py, .rej/.orig files)
are neither copied nor counted as deletions.

To rebase the patch onto a newer upstream: apply it to that release (fix the
rejects by hand), point upstream_base.py at the new version and sha256, and run
this script on the result.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import upstream_base  # noqa: E402

IGNORED = (
    ".git", "__pycache__", "*.pyc", "*.so", "*.egg-info", "build", "dist",
    ".venv", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.orig", "*.rej",
)  # fmt: skip
IGNORED_PATHS = ("lmcache/_version.py",)

_GIT = ["git", "-c", "user.name=make_patch", "-c", "user.email=make_patch@localhost",
        "-c", "core.abbrev=7"]  # fmt: skip
# The same patch for everyone: no user or system git configuration takes part.
_GIT_ENV = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def _ignored(rel: Path) -> bool:
    if rel.as_posix() in IGNORED_PATHS:
        return True
    return any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in IGNORED)


def _files(root: Path) -> set[Path]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not _ignored(rel_dir / d)]
        found.update(rel_dir / f for f in filenames if not _ignored(rel_dir / f))
    return found


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run([*_GIT, *args], cwd=cwd, env=_GIT_ENV, capture_output=True, encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout


def overlay(edited: Path, pristine: Path) -> None:
    """Make pristine's files (ignored ones aside) those of edited."""
    edited_files, pristine_files = _files(edited), _files(pristine)
    for rel in pristine_files - edited_files:
        (pristine / rel).unlink()
    for rel in edited_files:
        target = pristine / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(edited / rel, target)


def diff_against_base(edited: Path, workdir: Path, version: str, sdist: Path | None = None) -> str:
    """The patch that turns the pristine base `version` into `edited`."""
    pristine = upstream_base.fetch_base(workdir, version, sdist)
    _git(pristine, "init", "-q")
    _git(pristine, "add", "-Af")
    _git(pristine, "commit", "-q", "-m", f"upstream lmcache {version}")
    overlay(edited, pristine)
    _git(pristine, "add", "-Af")
    return _git(pristine, "diff", "--cached", "--binary", "--no-color", "--no-ext-diff",
                "--no-renames", "--unified=3", "--src-prefix=a/", "--dst-prefix=b/")  # fmt: skip


def tree_version(tree: Path) -> str | None:
    """The release a source tree was unpacked from (its PKG-INFO), if it says."""
    pkg_info = tree / "PKG-INFO"
    if not pkg_info.is_file():
        return None
    for line in pkg_info.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("edited_tree", type=Path, help="the edited lmcache-X tree")
    parser.add_argument("--base", choices=sorted(upstream_base.BASES),
                        help="the upstream release the tree is (default: its PKG-INFO version)")  # fmt: skip
    parser.add_argument("-o", "--output", type=Path, help="default: patches/lmcache-X-hpu.patch")
    parser.add_argument("--sdist", type=Path, help="use this lmcache-X.tar.gz instead of downloading")
    args = parser.parse_args(argv)
    edited = args.edited_tree.resolve()
    if not (edited / "lmcache" / "__init__.py").is_file():
        parser.error(f"{edited} is not an lmcache source tree (no lmcache/__init__.py)")
    version = args.base or tree_version(edited)
    if version not in upstream_base.BASES:
        parser.error(f"{edited}: base version {version!r} is not one of {', '.join(upstream_base.BASES)}; "
                     "name it with --base")  # fmt: skip
    output = args.output or upstream_base.get_base(version).patch_path
    with tempfile.TemporaryDirectory(prefix="lmcache-make-patch-") as tmp:
        try:
            patch = diff_against_base(edited, Path(tmp), version, args.sdist)
        except (upstream_base.BaseFetchError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if not patch:
        print(f"error: {edited} does not differ from upstream {version}", file=sys.stderr)
        return 1
    output.write_text(patch, encoding="utf-8")
    touched = [line[6:] for line in patch.splitlines() if line.startswith("+++ b/")]
    print(f"wrote {output}: {len(touched)} files changed")
    for path in touched:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
