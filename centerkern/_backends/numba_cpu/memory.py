"""Kernels that only move memory: the gather, and zeros written by every thread."""

from __future__ import annotations

import numba
from numba import prange, types

from .jit import Entry

ZEROS_PER_ITEM = 1 << 16


def _gather(centers, labels, out):
    for i in prange(labels.size):
        for k in range(centers.shape[1]):
            out[i, k] = centers[labels[i], k]


def _fill_zeros(flat):
    for item in prange((flat.size + ZEROS_PER_ITEM - 1) // ZEROS_PER_ITEM):
        flat[item * ZEROS_PER_ITEM:(item + 1) * ZEROS_PER_ITEM] = 0


def _gather_signature(dtype):
    data = numba.from_dtype(dtype)
    return types.void(types.Array(data, 2, "C", readonly=True), types.Array(types.int64, 1, "C", readonly=True),
                      types.Array(data, 2, "C"))


def _zeros_signature(dtype):
    return types.void(types.Array(numba.from_dtype(dtype), 1, "C"))


gather_rows = Entry("gather_rows", _gather, _gather_signature, parallel=True)
fill_zeros = Entry("fill_zeros", _fill_zeros, _zeros_signature, parallel=True)
