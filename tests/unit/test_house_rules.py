"""House rules that a grep can check: device APIs stay in lmcache/platforms/ (and
lmcache/testing/), and nothing in the package unpickles."""

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lmcache"

DEVICE_API = re.compile(r"torch\.cuda|torch\.hpu|\.cuda\(|habana_frameworks")
DEVICE_API_HOMES = ("platforms", "testing")
UNPICKLING = re.compile(r"pickle\.loads?\b|pickle\.Unpickler|torch\.load\b|import\s+dill|from\s+dill")


def find_violations(package: Path) -> list[str]:
    """`path:line: what` for every rule broken under `package`."""
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        device_api_allowed = rel.parts[0] in DEVICE_API_HOMES
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not device_api_allowed:
                for m in DEVICE_API.finditer(line):
                    found.append(f"{rel}:{lineno}: {m.group(0)!r} outside lmcache/platforms/")
            for m in UNPICKLING.finditer(line):
                found.append(f"{rel}:{lineno}: {m.group(0)!r} (nothing is ever unpickled)")
    return found


def test_package_keeps_the_house_rules():
    assert PACKAGE.is_dir() and any(PACKAGE.rglob("*.py"))
    violations = find_violations(PACKAGE)
    assert not violations, "house rules broken:\n" + "\n".join(violations)


PLANTED = {
    "v1/engine_bad.py": "import torch\nok = 1\nx = torch.cuda.is_available()\n",
    "v1/hpu_bad.py": "y = torch.hpu.synchronize()\n",
    "v1/move_bad.py": "z = t.cuda()\n",
    "integration/bridge_bad.py": "import habana_frameworks.torch.core as htcore\n",
    "v1/serde_bad.py": "import pickle\nobj = pickle.loads(blob)\n",
    "v1/disk_bad.py": "state = torch.load(path)\n",
    "platforms/pickle_bad.py": "obj = pickle.load(f)\n",
}
ALLOWED = {
    "platforms/cuda.py": "torch.cuda.synchronize()\n",
    "platforms/hpu.py": "import habana_frameworks.torch.core\ntorch.hpu.synchronize()\n",
    "testing/emu.py": "torch.hpu = None\n",
    "v1/clean.py": "import torch\nt = torch.empty(2)\nloads = 'pickled'  # harmless words\n",
}


@pytest.mark.parametrize("bad", sorted(PLANTED))
def test_checker_detects_a_planted_violation(tmp_path, bad):
    for rel, text in {**ALLOWED, bad: PLANTED[bad]}.items():
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    violations = find_violations(tmp_path)
    assert len(violations) == 1 and violations[0].startswith(bad + ":"), violations


def test_checker_accepts_the_allowed_places(tmp_path):
    for rel, text in ALLOWED.items():
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    assert find_violations(tmp_path) == []


MAX_MODULE_LINES = 400  # DESIGN.md: small modules with one concept each


def modules_over(package: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    return [f"{p.relative_to(package)}: {n} lines" for p in sorted(package.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > limit]


def test_no_module_of_the_package_is_over_400_lines():
    assert not modules_over(PACKAGE), "split these modules:\n" + "\n".join(modules_over(PACKAGE))


def test_the_size_check_sees_a_long_module(tmp_path):
    (tmp_path / "long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_MODULE_LINES)
    assert modules_over(tmp_path) == [f"long.py: {MAX_MODULE_LINES + 1} lines"]
