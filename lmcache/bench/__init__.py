"""Benchmarks run as `python -m lmcache bench <name>`."""

BENCHES = {
    "storage": "lmcache.bench.storage",
    "lookup": "lmcache.bench.lookup",
    "connector": "lmcache.bench.connector",
    "e2e": "lmcache.bench.e2e",
    "patch": "lmcache.bench.patch",
    "workload": "lmcache.bench.workload.cli",
    "soak": "lmcache.bench.soak.cli",
}
