"""lmcache: a KV cache layer for vLLM v1 on CUDA, Intel Gaudi (HPU) and CPU."""

__version__ = "0.1.0"
