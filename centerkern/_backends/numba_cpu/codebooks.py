"""Codebook kernels: per-code sums of a batch, and the EMA and k-means updates built on them.

Why this layout: the batch is first ordered by code with a stable counting sort (O(N + K),
serial: it is a fraction of the work), so that each code's rows are a run of ``order``. The
codes are then split between the threads, and each thread sums the rows of its own codes, in
batch order, into a float64 row of its own: no two threads ever write one row, so duplicate
codes are race-free by construction, and the sums are the same bits for any thread count. The
update of a code is written in the same loop, right after its sum, so that neither the K x D
sums nor a one-hot N x K matrix ever exist.

The assignment is NumPy's, tile by tile with BLAS (``driver.assign_codes`` says why).
"""

from __future__ import annotations

import numba
from numba import prange, types

from .jit import FAST_MATH, Entry, helper, renamed

# Codes per parallel work item: enough to pay for the item, few enough to balance skewed codes.
CODES_PER_ITEM = 64
# A call of fewer elements ((N + K) x D) runs on the calling thread. Waking the other threads
# costs more than they save there, and more still next to BLAS, whose threads spin for a while
# after each product: at N = 8192, K = 1024, D = 64 a k-means update right after an assignment
# measured 8 ms in parallel against 0.3 ms on one thread.
PARALLEL_ELEMENTS = 1 << 21


@helper
def order_by_code(codes, num_codes, starts, order):
    """Stable counting sort: ``order[starts[k]:starts[k + 1]]`` are the rows of code k, in batch order."""
    for k in range(num_codes + 1):
        starts[k] = 0
    for i in range(codes.size):
        starts[codes[i] + 1] += 1
    for k in range(num_codes):
        starts[k + 1] += starts[k]
    for i in range(codes.size):  # starts[k] is code k's cursor here, and ends as its end
        order[starts[codes[i]]] = i
        starts[codes[i]] += 1
    for k in range(num_codes, 0, -1):
        starts[k] = starts[k - 1]
    starts[0] = 0


@helper(inline="always")
def _weight(weights, row):
    return 1.0 if weights.size == 0 else weights[row]


@helper(inline="always")
def _code_count(weights, order, begin, end):
    count = 0.0
    for j in range(begin, end):
        count += _weight(weights, order[j])
    return count


@helper(inline="always", fastmath=FAST_MATH)
def _code_sum(features, weights, order, begin, end, total):
    """Write into ``total`` (float64) the weighted sum of the rows ``order[begin:end]``."""
    for d in range(total.size):
        total[d] = 0.0
    for j in range(begin, end):
        row = order[j]
        weight = _weight(weights, row)
        for d in range(total.size):
            total[d] += weight * features[row, d]


@helper(inline="always")
def _ema_code(k, total, new_sizes, size_total, embed_avg, embed, decay, eps, laplace):
    """Write code k's EMA average and code from its batch sum ``total`` and its new cluster size."""
    if laplace:
        count = embed_avg.shape[0]
        divisor = (new_sizes[k] + eps) / (size_total + count * eps) * size_total
    else:
        divisor = new_sizes[k] + eps
    for d in range(total.size):
        average = decay * embed_avg[k, d] + (1.0 - decay) * total[d]
        embed_avg[k, d] = average
        if laplace:
            embed[k, d] = average / divisor
        else:
            embed[k, d] = (average + eps * embed[k, d]) / divisor


@helper(inline="always")
def _new_sizes(counts, cluster_size, new_sizes, decay):
    """The EMA cluster sizes in float64 (kept apart until every code is written) and their total."""
    size_total = 0.0
    for k in range(cluster_size.size):
        new_sizes[k] = decay * cluster_size[k] + (1.0 - decay) * counts[k]
        size_total += new_sizes[k]
    return size_total


def _class_sums(features, codes, weights, counts, sums, starts, order):
    order_by_code(codes, counts.size, starts, order)
    for item in prange((counts.size + CODES_PER_ITEM - 1) // CODES_PER_ITEM):
        for k in range(item * CODES_PER_ITEM, min(counts.size, (item + 1) * CODES_PER_ITEM)):
            counts[k] = _code_count(weights, order, starts[k], starts[k + 1])
            _code_sum(features, weights, order, starts[k], starts[k + 1], sums[k])


def _ema_step(features, codes, weights, cluster_size, embed_avg, embed, decay, eps, laplace, starts, order,
              new_sizes, rows):
    num_codes = cluster_size.size
    order_by_code(codes, num_codes, starts, order)
    for k in range(num_codes):  # the batch's counts, kept in new_sizes until the EMA replaces them
        new_sizes[k] = _code_count(weights, order, starts[k], starts[k + 1])
    size_total = _new_sizes(new_sizes, cluster_size, new_sizes, decay)
    for item in prange((num_codes + CODES_PER_ITEM - 1) // CODES_PER_ITEM):
        total = rows[item]
        for k in range(item * CODES_PER_ITEM, min(num_codes, (item + 1) * CODES_PER_ITEM)):
            _code_sum(features, weights, order, starts[k], starts[k + 1], total)
            _ema_code(k, total, new_sizes, size_total, embed_avg, embed, decay, eps, laplace)
            cluster_size[k] = new_sizes[k]


def _ema_apply(counts, sums, cluster_size, embed_avg, embed, decay, eps, laplace, new_sizes):
    num_codes = cluster_size.size
    size_total = _new_sizes(counts, cluster_size, new_sizes, decay)
    for item in prange((num_codes + CODES_PER_ITEM - 1) // CODES_PER_ITEM):
        for k in range(item * CODES_PER_ITEM, min(num_codes, (item + 1) * CODES_PER_ITEM)):
            _ema_code(k, sums[k], new_sizes, size_total, embed_avg, embed, decay, eps, laplace)
            cluster_size[k] = new_sizes[k]


def _kmeans_update(features, codes, weights, centers, weight_sums, starts, order, rows):
    num_codes = centers.shape[0]
    order_by_code(codes, num_codes, starts, order)
    for item in prange((num_codes + CODES_PER_ITEM - 1) // CODES_PER_ITEM):
        total = rows[item]
        for k in range(item * CODES_PER_ITEM, min(num_codes, (item + 1) * CODES_PER_ITEM)):
            count = _code_count(weights, order, starts[k], starts[k + 1])
            if count > 0.0:  # scikit-learn leaves a center its batch does not hold as it is
                _code_sum(features, weights, order, starts[k], starts[k + 1], total)
                old_weight = weight_sums[k] * 1.0  # in float64
                new_weight = old_weight + count
                for d in range(total.size):
                    centers[k, d] = (centers[k, d] * old_weight + total[d]) / new_weight
                weight_sums[k] = new_weight


_MATRIX_IN = lambda data: types.Array(data, 2, "C", readonly=True)  # noqa: E731
_MATRIX = lambda data: types.Array(data, 2, "C")  # noqa: E731
_VECTOR = lambda data: types.Array(data, 1, "C")  # noqa: E731
_CODES = types.Array(types.int64, 1, "C", readonly=True)
_WEIGHTS = types.Array(types.float64, 1, "C", readonly=True)
_INTS, _FLOATS = _VECTOR(types.int64), _VECTOR(types.float64)


def _class_sums_signature(dtype):
    data = numba.from_dtype(dtype)
    return types.void(_MATRIX_IN(data), _CODES, _WEIGHTS, _FLOATS, _MATRIX(types.float64), _INTS, _INTS)


def _ema_step_signature(dtype):
    data = numba.from_dtype(dtype)
    return types.void(_MATRIX_IN(data), _CODES, _WEIGHTS, _VECTOR(data), _MATRIX(data), _MATRIX(data),
                      types.float64, types.float64, types.boolean, _INTS, _INTS, _FLOATS, _MATRIX(types.float64))


def _ema_apply_signature(dtype):
    data = numba.from_dtype(dtype)
    readonly_floats = types.Array(types.float64, 1, "C", readonly=True)
    return types.void(readonly_floats, types.Array(types.float64, 2, "C", readonly=True), _VECTOR(data),
                      _MATRIX(data), _MATRIX(data), types.float64, types.float64, types.boolean, _FLOATS)


def _kmeans_signature(dtype):
    data = numba.from_dtype(dtype)
    return types.void(_MATRIX_IN(data), _CODES, _WEIGHTS, _MATRIX(data), _VECTOR(data), _INTS, _INTS,
                      _MATRIX(types.float64))


class Regimes:
    """A kernel as two entry points, compiled each on first use: ``serial`` on the calling thread
    (its ``prange`` a plain loop), ``parallel`` on every thread; ``of(elements)`` picks one."""

    def __init__(self, name: str, function, signature):
        self.serial = Entry(f"codebook_{name}_serial", renamed(function, f"codebook_{name}_serial"), signature)
        self.parallel = Entry(f"codebook_{name}_parallel", renamed(function, f"codebook_{name}_parallel"), signature,
                              parallel=True)

    def of(self, elements: int) -> Entry:
        return self.parallel if elements >= PARALLEL_ELEMENTS else self.serial


class_sums = Regimes("class_sums", _class_sums, _class_sums_signature)
ema_step = Regimes("ema_step", _ema_step, _ema_step_signature)
ema_apply = Regimes("ema_apply", _ema_apply, _ema_apply_signature)
kmeans_update = Regimes("kmeans_update", _kmeans_update, _kmeans_signature)
ENTRIES = tuple(entry for kernel in (class_sums, ema_step, ema_apply, kmeans_update)
                for entry in (kernel.serial, kernel.parallel))
