"""The `lm://` cache server: `python -m lmcache.v1.server HOST PORT [cpu]` (or `lmcache_server`).

Speaks upstream LMCache 0.5.6's protocol (protocol.py), so upstream's clients and
ours both use it; keeps entries in memory under a byte budget with LRU eviction.
"""
