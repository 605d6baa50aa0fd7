"""Test support that ships with the package: the HPU emulation for CPU-only machines.

`lmcache.testing.hpu_emulation.HpuEmulation` makes `torch.device("hpu")` tensors,
`torch.hpu` and the Habana bridge modules exist on a machine without Gaudi. It is
an emulation: it proves placement and sync discipline, not Gaudi speed.

Also the store launchers the tests and benchmarks share: redis_servers.py (a server, a
Redis Cluster, a sentinel group) and s3_server.py (SeaweedFS), on 127.0.0.1.
"""
