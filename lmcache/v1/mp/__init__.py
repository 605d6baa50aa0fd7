"""The shared host cache server (`lmcache server`) and its client tier.

One server per host owns the host-memory tier (a shared-memory arena of chunk slots),
its lower tiers, the index, leases and eviction; every vLLM worker on the host maps
the arena and moves KV straight into and out of its slots. Only small control
messages cross the socket (protocol.py). See docs/server.md.
"""
