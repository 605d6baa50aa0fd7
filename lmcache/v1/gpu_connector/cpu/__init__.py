"""The CPU device's fast paths: vLLM's CPU backend and any paged KV held in host memory.

One entry for the generic connector: `CpuTransfers` (transfers.py), built once per
registered layout, moves whole batches (`store` / `load`) and single layers
(`store_layer` / `load_layer`). Behind it:

  transfers.py      which path each part of a batch takes
  block_copies.py   whole blocks as memcpys of runs (memcpy_kernel.py: the numba loop)
  attn_packing.py   where vLLM's CPU kernel puts each token's K and V (asked of the kernel)
  attn_detile.py    whole cpu_attn blocks <-> token rows (attn_kernels.py: numba loops)
  native_blocks.py  whole cpu_attn blocks kept in vLLM's byte order (opt-in)
  threads.py        copies spread over torch's CPU threads

numba is optional: without it every path falls back to torch / numpy indexing.
"""

from lmcache.v1.gpu_connector.cpu.transfers import CpuTransfers

__all__ = ["CpuTransfers"]
