"""What this package relies on in vLLM, checked on a vLLM source tree with `ast`.

A tree is a directory holding `vllm/` (a released wheel's sources, vllm_wheels.py, or the
installed package). Nothing is imported from it. `check(tree)` returns the problems:

1. every `from vllm... import name` / `import vllm...` anywhere in `lmcache/` (lazy and
   guarded ones included: every supported vLLM must have them; what may be missing is
   looked up by vllm_compat's probes, never imported) names a module, and a name that
   module binds;
2. vllm_compat's feature probes, evaluated on the tree (`static_features`): the caller
   compares them with what it knows of that release, or with vllm_compat's own answer
   by import on the installed vLLM;
3. every hook our connector class (`LMCacheConnectorV1Dynamic`) defines is a hook of
   that vLLM's `KVConnectorBase_V1` with a compatible signature, or the hook of a
   feature vllm_compat reports missing there; every abstract hook is implemented;
4. every call vLLM's `LMCacheConnectorV1` wrapper makes on our `LMCacheConnectorV1Impl`
   (`self._lmcache_engine.<hook>(...)`) finds that method with a compatible signature,
   and every name vLLM's wrapper and its LMCacheMPConnector module import from
   `lmcache` unguarded exists in this package;
5. the scheduler objects' fields we read, the signatures we call, and, for each feature
   present, the vLLM code that calls its hook (sleep, may_load_async, ...).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from pathlib import Path

from lmcache.integration.vllm import vllm_compat

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "lmcache"

BASE = ("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1")
WRAPPER = ("vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector", "LMCacheConnectorV1")
MP_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"
OUR_CONNECTOR = ("lmcache.integration.vllm.lmcache_connector_v1", "LMCacheConnectorV1Dynamic")
OUR_MP = ("lmcache.integration.vllm.lmcache_mp_connector", "LMCacheMPConnector")
OUR_IMPL = ("lmcache.integration.vllm.vllm_v1_adapter", "LMCacheConnectorV1Impl")

# Methods of our connector class that are ours, not vLLM hooks.
OWN_METHODS = {"impl"}

# Fields and attributes we read on vLLM's objects (module, class) -> names; "?" marks
# those read with getattr (optional).
READS = {
    ("vllm.v1.core.sched.output", "SchedulerOutput"): [
        "scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens", "finished_req_ids",
        "scheduled_spec_decode_tokens?", "preempted_req_ids?"],
    ("vllm.v1.core.sched.output", "NewRequestData"): ["req_id", "prompt_token_ids", "block_ids",
                                                      "num_computed_tokens"],
    ("vllm.v1.core.sched.output", "CachedRequestData"): ["req_ids", "new_block_ids", "num_computed_tokens",
                                                         "resumed_req_ids?"],
    ("vllm.v1.request", "Request"): ["request_id", "num_tokens", "all_token_ids", "prompt_token_ids",
                                     "mm_features", "lora_request", "cache_salt", "kv_transfer_params",
                                     "block_hashes"],
    ("vllm.distributed.kv_events", "BlockStored"): ["block_hashes", "parent_block_hash", "token_ids", "block_size",
                                                    "lora_id", "medium", "lora_name", "group_idx", "locality"],
    ("vllm.distributed.kv_events", "BlockRemoved"): ["block_hashes", "medium", "group_idx", "locality"],
    ("vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorStats"): ["data"],
    ("vllm.distributed.kv_transfer.kv_connector.factory", "KVConnectorFactory"): [
        "_registry", "register_connector", "get_connector_class_by_name"],
    ("vllm.v1.outputs", "KVConnectorOutput"): ["finished_sending"],
}

# Functions we call: (module, qualname) -> the parameter names we pass, in order.
CALLS = {
    ("vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorPromMetrics.__init__"):
        ["vllm_config", "metric_types", "labelnames", "per_engine_labelvalues"],
    ("vllm.v1.attention.backends.cpu_attn", "_get_attn_isa"):
        ["dtype", "block_size", "head_size", "kv_cache_dtype"],
    ("vllm.distributed.kv_transfer.kv_connector.factory", "KVConnectorFactory.register_connector"):
        ["name", "module_path", "class_name"],
}

# feature -> (file, hook) where vLLM calls the hook when it has the feature
CALL_SITES = {
    "sleep_hooks": [("vllm/v1/worker/gpu_worker.py", "unregister_kv_caches"),
                    ("vllm/v1/worker/gpu_worker.py", "restore_kv_caches")],
    "may_load_async": [("vllm/v1/core/sched/scheduler.py", "may_load_async")],
    "kv_cache_access": [("vllm/distributed/kv_transfer/kv_connector/factory.py", "kv_cache_access")],
    "pending_block_frees": [("vllm/v1/core/sched/scheduler.py", "has_pending_block_frees")],
}


# -- reading a tree ----------------------------------------------------------------------

@dataclass
class Tree:
    """Python sources under `root` (which holds `vllm/` or `lmcache/`), parsed on demand;
    `patched` replaces files' text (the tests rename hooks with it)."""

    root: Path
    patched: dict[str, str] = field(default_factory=dict)

    def with_text(self, rel: str, text: str) -> "Tree":
        return Tree(self.root, {**self.patched, rel: text})

    def path_of(self, module: str) -> str | None:
        rel = module.replace(".", "/")
        for candidate in (rel + ".py", rel + "/__init__.py"):
            if candidate in self.patched or (self.root / candidate).is_file():
                return candidate
        return None

    def text(self, rel: str) -> str:
        return self.patched[rel] if rel in self.patched else (self.root / rel).read_text(encoding="utf-8")

    def module(self, module: str) -> ast.Module | None:
        rel = self.path_of(module)
        return None if rel is None else _parse(self.text(rel), rel)

    def is_package(self, module: str) -> bool:
        rel = self.path_of(module)
        return rel is not None and rel.endswith("__init__.py")

    def binds(self, module: str, name: str) -> bool:
        """`module` binds `name` at module level (a def, class, assignment, import, a lazy
        `__getattr__` export), or has a submodule of that name."""
        if self.is_package(module) and self.path_of(f"{module}.{name}") is not None:
            return True
        tree = self.module(module)
        if tree is None:
            return False
        names, lazy = _module_names(tree)
        return name in names or (lazy and name in _string_constants(tree))

    def cls(self, module: str, name: str) -> ast.ClassDef | None:
        tree = self.module(module)
        if tree is None:
            return None
        for node in _top_level(tree):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node
        return None

    def class_members(self, module: str, name: str, inherited: bool = True) -> dict[str, ast.AST]:
        """Members of a class: methods, assignments, annotated fields, and (for `inherited`)
        those of its bases that resolve in the same tree."""
        node = self.cls(module, name)
        if node is None:
            return {}
        members: dict[str, ast.AST] = {}
        if inherited:
            for base in reversed(node.bases):
                where = self._resolve(module, base)
                if where is not None:
                    members.update(self.class_members(*where))
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                members[item.name] = item
                if item.name == "__init__":  # self.x = ... in __init__ are attributes too
                    for sub in ast.walk(item):
                        for target in _assign_targets(sub):
                            if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                                    and target.value.id == "self"):
                                members.setdefault(target.attr, sub)
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                members[item.target.id] = item
            elif isinstance(item, ast.Assign):
                for target in item.targets:
                    if isinstance(target, ast.Name):
                        members[target.id] = item
        return members

    def _resolve(self, module: str, base: ast.expr) -> tuple[str, str] | None:
        """(module, class) of a base class expression, if it is in this tree."""
        if isinstance(base, ast.Name):
            if self.cls(module, base.id) is not None:
                return module, base.id
            tree = self.module(module)
            for node in _top_level(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    for alias in node.names:
                        if (alias.asname or alias.name) == base.id and self.cls(node.module, alias.name):
                            return node.module, alias.name
        return None

    def calls_attribute(self, rel: str, attr: str) -> bool:
        if not (rel in self.patched or (self.root / rel).is_file()):
            return False
        for node in ast.walk(_parse(self.text(rel), rel)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
                return True
        return False


@functools.lru_cache(maxsize=512)
def _parse(text: str, rel: str) -> ast.Module:
    return ast.parse(text, filename=rel)


def _top_level(tree: ast.Module):
    """Module-level statements, looking into if/try blocks (guarded definitions)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        yield node
        if isinstance(node, ast.If):
            stack[:0] = node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack[:0] = node.body + [n for h in node.handlers for n in h.body] + node.orelse + node.finalbody


def _assign_targets(node):
    if isinstance(node, ast.Assign):
        for target in node.targets:
            yield from (target.elts if isinstance(target, ast.Tuple) else [target])
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        yield node.target


def _module_names(tree: ast.Module) -> tuple[set[str], bool]:
    names, lazy = set(), False
    for node in _top_level(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            lazy |= node.name == "__getattr__"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.add(alias.asname or alias.name.split(".")[0])
        else:
            for target in _assign_targets(node):
                if isinstance(target, ast.Name):
                    names.add(target.id)
    return names, lazy


def _string_constants(tree: ast.Module) -> set[str]:
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


# -- signatures ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Sig:
    positional: tuple[str, ...]  # after self/cls
    required: int  # how many of them have no default
    kwonly: tuple[str, ...]
    varargs: bool
    varkw: bool
    kind: str  # "method", "classmethod", "staticmethod", "property"

    def __str__(self) -> str:
        parts = list(self.positional) + (["*args"] if self.varargs else []) + list(self.kwonly)
        return f"{self.kind}({', '.join(parts + (['**kwargs'] if self.varkw else []))})"


def sig_of(fn: ast.FunctionDef, bound: bool = True) -> Sig:
    decorators = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in fn.decorator_list}
    kind = next((k for k in ("classmethod", "staticmethod", "property") if k in decorators), "method")
    args = fn.args
    positional = [a.arg for a in args.posonlyargs + args.args]
    if bound and kind != "staticmethod" and positional:
        positional = positional[1:]
    return Sig(tuple(positional), len(positional) - len(args.defaults), tuple(a.arg for a in args.kwonlyargs),
               args.vararg is not None, args.kwarg is not None, kind)


def override_problem(ours: Sig, base: Sig) -> str | None:
    """Why vLLM calling `base`'s hook could fail on our override, if it could."""
    if ours.kind != base.kind:
        return f"is a {ours.kind}, vLLM's is a {base.kind}"
    if ours.positional[:len(base.positional)] != base.positional and not ours.varargs:
        return f"takes {ours}, vLLM's hook takes {base}"
    if ours.required > len(base.positional):
        return f"requires {ours.required} arguments, vLLM's hook passes {len(base.positional)}: {base}"
    if base.varkw and not ours.varkw:
        return f"has no **kwargs, vLLM's hook {base} may be passed extra keywords"
    missing = [k for k in base.kwonly if k not in ours.kwonly and k not in ours.positional and not ours.varkw]
    if missing:
        return f"does not take keyword(s) {missing} of vLLM's hook {base}"
    return None


def call_problem(ours: Sig, n_positional: int, keywords: list[str], star_kw: bool) -> str | None:
    if n_positional > len(ours.positional) and not ours.varargs:
        return f"is called with {n_positional} positional arguments, takes {ours}"
    bound = set(ours.positional[:n_positional])
    if ours.required > n_positional + sum(1 for k in keywords if k in ours.positional and k not in bound):
        return f"needs {ours.required} arguments, is called with {n_positional} + {keywords}"
    bad = [k for k in keywords if k not in ours.positional and k not in ours.kwonly and not ours.varkw]
    if bad:
        return f"is called with keyword(s) {bad}, takes {ours}"
    if star_kw and not ours.varkw:
        return f"is called with **kwargs, takes {ours}"
    return None


# -- the checks --------------------------------------------------------------------------

def our_tree() -> Tree:
    return Tree(REPO)


def package_vllm_imports() -> list[tuple[str, str | None, bool, str]]:
    """(module, name or None, optional, where) for every vLLM import in our package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(REPO))
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        guarded = _guarded_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                    node.module == "vllm" or node.module.startswith("vllm.")):
                for alias in node.names:
                    found.append((node.module, alias.name, id(node) in guarded, f"{rel}:{node.lineno}"))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "vllm" or alias.name.startswith("vllm."):
                        found.append((alias.name, None, id(node) in guarded, f"{rel}:{node.lineno}"))
    return found


def _guarded_nodes(tree: ast.Module) -> set[int]:
    """Ids of nodes inside a `try` whose handlers catch ImportError (or broader)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for part in node.body + [n for h in node.handlers for n in h.body]:
                out.update(id(n) for n in ast.walk(part))
    return out


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError", "Exception",
                                                    "BaseException") for t in types)


def static_probe(tree: Tree, p: vllm_compat.Probe) -> bool:
    if p.member is None:
        return tree.binds(p.module, p.name)
    if tree.cls(p.module, p.name) is None:
        return False
    return p.member in tree.class_members(p.module, p.name, inherited=p.how == "has")


def static_features(tree: Tree, version: str = "?") -> vllm_compat.VllmFeatures:
    return vllm_compat.features_from(
        {key: all(static_probe(tree, p) for p in probes) for key, probes in vllm_compat.PROBES.items()}, version)


def _feature_hooks() -> dict[str, str]:
    """Hook name on KVConnectorBase_V1 -> the feature it belongs to."""
    return {p.member: key for key, probes in vllm_compat.PROBES.items() for p in probes
            if (p.module, p.name) == BASE and p.member}


def check(tree: Tree) -> list[str]:
    problems: list[str] = []
    features = static_features(tree)
    ours = our_tree()

    # 1. our imports
    for module, name, _guarded, where in package_vllm_imports():
        if tree.path_of(module) is None:
            problems.append(f"{where}: imports {module}, which this vLLM does not have")
        elif name is not None and name != "*" and not tree.binds(module, name):
            problems.append(f"{where}: imports {name} from {module}, which does not define it")

    # 3. our connector's hooks
    base_members = tree.class_members(*BASE)
    if not base_members:
        return problems + [f"{BASE[0]}.{BASE[1]} not found"]
    feature_of = _feature_hooks()
    for our_class in (OUR_CONNECTOR, OUR_MP):
        for name, node in ours.class_members(*our_class, inherited=False).items():
            if not isinstance(node, ast.FunctionDef) or name in OWN_METHODS or (
                    name.startswith("_") and name != "__init__"):
                continue
            base = base_members.get(name)
            if isinstance(base, ast.FunctionDef):
                why = override_problem(sig_of(node), sig_of(base))
                if why:
                    problems.append(f"{our_class[1]}.{name} {why}")
            elif name in feature_of and not getattr(features, feature_of[name]):
                continue  # the hook of a feature vllm_compat reports missing on this vLLM: never called
            else:
                problems.append(f"{our_class[1]}.{name} overrides no hook of this vLLM's {BASE[1]}"
                                + (f" (vllm_compat says {feature_of[name]} is present)" if name in feature_of else ""))
    our_members = ours.class_members(*OUR_CONNECTOR)
    for name, node in base_members.items():
        if isinstance(node, ast.FunctionDef) and any(
                getattr(d, "id", getattr(d, "attr", "")) == "abstractmethod" for d in node.decorator_list):
            if name not in our_members:
                problems.append(f"{OUR_CONNECTOR[1]} does not implement vLLM's abstract hook {name}")

    # 4. vLLM's wrapper and MP module against our Impl and package
    impl_members = ours.class_members(*OUR_IMPL)
    wrapper_rel = tree.path_of(WRAPPER[0])
    if wrapper_rel is None:
        problems.append(f"{WRAPPER[0]} (vLLM's LMCacheConnectorV1) not found")
    else:
        for node in ast.walk(tree.module(WRAPPER[0])):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "_lmcache_engine"):
                hook = node.func.attr
                method = impl_members.get(hook)
                if not isinstance(method, ast.FunctionDef):
                    problems.append(f"vLLM's {WRAPPER[1]} calls {hook}() on {OUR_IMPL[1]}, which has no such method")
                    continue
                why = call_problem(sig_of(method), sum(not isinstance(a, ast.Starred) for a in node.args),
                                   [k.arg for k in node.keywords if k.arg], any(k.arg is None for k in node.keywords))
                if why:
                    problems.append(f"{OUR_IMPL[1]}.{hook} {why} (vLLM's {WRAPPER[1]}, line {node.lineno})")
    for module in (WRAPPER[0], MP_MODULE):
        vtree = tree.module(module)
        if vtree is None:
            continue
        guarded = _guarded_nodes(vtree)
        for node in ast.walk(vtree):
            if (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    and node.module.startswith("lmcache.") and id(node) not in guarded):
                for alias in node.names:
                    if not ours.binds(node.module, alias.name):
                        problems.append(f"{module} (line {node.lineno}) imports {alias.name} from {node.module}, "
                                        "which this package does not define")
    if tree.path_of(MP_MODULE) is not None and "lmcache.integration.vllm.lmcache_mp_connector" not in tree.text(
            tree.path_of(MP_MODULE)):
        problems.append(f"{MP_MODULE} no longer looks for lmcache.integration.vllm.lmcache_mp_connector")

    # 5. fields, signatures, call sites
    for (module, cls), names in READS.items():
        members = tree.class_members(module, cls)
        if not members:
            problems.append(f"{module}.{cls} not found")
            continue
        for name in names:
            if not name.endswith("?") and name not in members:
                problems.append(f"{module}.{cls} has no {name}")
    for (module, qualname), params in CALLS.items():
        cls, _, fn = qualname.rpartition(".")
        node = tree.class_members(module, cls).get(fn) if cls else next(
            (n for n in _top_level(tree.module(module) or ast.Module(body=[], type_ignores=[]))
             if isinstance(n, ast.FunctionDef) and n.name == fn), None)
        if not isinstance(node, ast.FunctionDef):
            problems.append(f"{module}.{qualname} not found")
            continue
        got = list(sig_of(node, bound=bool(cls)).positional)
        if got[:len(params)] != params:
            problems.append(f"{module}.{qualname} takes {got}, we pass {params}")
    for key, sites in CALL_SITES.items():
        if getattr(features, key):
            for rel, hook in sites:
                if not tree.calls_attribute(rel, hook):
                    problems.append(f"{key}: vLLM has the hook {hook} but {rel} no longer calls it")
    return problems
