"""Stores of large whole blocks on CPU: one memcpy per block, layers spread over threads.

torch's index_select over a few large rows (two 256 KB blocks per object and plane at
block 128) runs on one thread, so with two threads it reached 0.55 of the memcpy of the
same bytes here. A numpy assignment of one contiguous row is a memcpy that releases the
GIL: a Python loop of those, split over the layers, reached 0.8-0.9 of memcpy with two
threads and ~1.0 with one. The Python loop costs about a microsecond per block, so it is
used only where a block's piece is large (MIN_PIECE_BYTES); smaller pieces stay with
index_select.
"""

from __future__ import annotations

import numpy as np

from lmcache.v1.gpu_connector.cpu_threads import run_threaded

MIN_PIECE_BYTES = 64 << 10


def rows_view(blocks: np.ndarray, piece: int) -> np.ndarray:
    """[num_blocks, piece] view of a per-block view whose blocks are each contiguous."""
    return np.lib.stride_tricks.as_strided(blocks, shape=(blocks.shape[0], piece),
                                           strides=(blocks.strides[0], blocks.itemsize), writeable=False)


def gather_blocks(per_layer: list[list[tuple[np.ndarray, np.ndarray, list[int]]]]) -> None:
    """For each layer's (source rows [num_blocks, piece], destination [k, piece], k block ids):
    destination[i] = source[ids[i]], layers over torch's threads."""

    def layer(copies) -> None:
        for source, destination, ids in copies:
            for i, block in enumerate(ids):
                destination[i] = source[block]

    run_threaded([(layer, copies) for copies in per_layer if copies])
