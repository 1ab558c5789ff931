"""The ``numba`` backend: parallel CPU kernels, race-free with any amount of duplicate labels.

Parallel layout (why not the obvious ones): a ``prange`` over feature columns strides through
memory and was measured 7.6x slower than a serial loop over rows, and a ``prange`` over rows
races on duplicate labels. Instead the batch is bucketed by label with a stable sort, and the
sorted batch is cut into chunks of ``ROWS_PER_CHUNK`` rows. Each thread takes whole chunks, so
rows stay contiguous and every thread does the same amount of work even when one class holds
most of the batch. A class whose rows all fall in one chunk is finished by that chunk's thread
(its center row is read, then written, by that thread alone). A class that straddles a chunk
boundary leaves one partial sum per chunk, and a second, short parallel loop gives each such
class to one thread, which adds its partial sums in chunk order and writes the row.

Consequences: every center row is touched once (no pass over all K rows, no K x D temporary),
every sample sees the center as it was before the call, and because the chunking depends on
the data only, results are bitwise identical for any thread count. Sums are taken in float64.
(``deterministic`` is part of the signature every backend shares; here it changes nothing.)
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import numba
import numpy as np
from numba import njit, prange

from ._rules import RuleCoefficients

# Rows of the sorted batch per parallel work item: large enough that a chunk's bookkeeping is
# negligible, small enough that a batch of a few hundred rows still splits across threads.
ROWS_PER_CHUNK = 64


def _sort_by_label(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch positions sorted by label, stably (within a class, in batch order), and the
    sorted labels.

    Packing ``(label, position)`` into one int64 key makes every key unique, so NumPy's fast
    unstable sort gives the stable order: measured 5x faster than a stable argsort at B=1024
    and 12x at B=8192. The packing fits unless K * B nears 2**63; then the argsort it replaces.
    """
    position_bits = max(1, int(labels.size - 1).bit_length())
    if int(num_classes).bit_length() + position_bits > 62:
        order = np.argsort(labels, kind="stable")
        return order, labels[order]
    keys = (labels << position_bits) | np.arange(labels.size, dtype=np.int64)
    keys.sort()
    return keys & ((1 << position_bits) - 1), keys >> position_bits


@njit(cache=True, inline="always")
def _write_center_row(written, label, row_sum, count, moves_centers, step, count_weight):
    scale = step / (1.0 + count_weight * count)
    if moves_centers:
        # ``written`` is ``centers`` here. Reading it through the name it is written through
        # lets LLVM vectorize: with two names for one array its runtime overlap check fails
        # and the scalar loop runs (measured 2x slower).
        for k in range(row_sum.size):
            written[label, k] += scale * row_sum[k]
    else:
        for k in range(row_sum.size):
            written[label, k] = scale * row_sum[k]


@njit(cache=True, inline="always", fastmath={"reassoc"})
def _add_row(row_sum, first, rows, i, centers, label, grad, rows_are_features, grad_scale):
    """Add row i's contribution to ``row_sum`` (or start it, for a segment's first row: one pass
    over D fewer than zeroing first). Returns the squared norm of ``d_i`` (fused step) or 0."""
    squares = 0.0
    width = row_sum.size
    if rows_are_features:
        for k in range(width):
            difference = np.float64(rows[i, k]) - np.float64(centers[label, k])
            grad[i, k] = grad_scale * difference
            squares += difference * difference
            row_sum[k] = difference if first else row_sum[k] + difference
    elif first:
        for k in range(width):
            row_sum[k] = rows[i, k]
    else:
        for k in range(width):
            row_sum[k] += rows[i, k]
    return squares


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def _segmented_update(
    order, sorted_labels, rows, centers, written, grad,
    rows_are_features, moves_centers, step, count_weight, grad_scale,
):
    """Add, per class j, the rows of class j into ``written[j]`` (see ``RuleCoefficients``).

    ``rows_are_features``: each row contributes ``d_i = rows[i] - centers[j]``, and the grad and
    the squared norm of ``d_i`` are produced on the way (the fused center-loss step). Otherwise
    each row contributes itself (the scatter). Returns ``sum_i ||d_i||^2`` (0 for the scatter).
    """
    batch_size = order.size
    width = centers.shape[1]
    chunks = (batch_size + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK
    # slot 0: the class a chunk continues from the previous chunk; slot 1: the class it hands on
    partial_sums = np.empty((chunks, 2, width))
    chunk_squares = np.zeros(chunks)

    for chunk in prange(chunks):
        start = chunk * ROWS_PER_CHUNK
        end = min(start + ROWS_PER_CHUNK, batch_size)
        row_sum = np.empty(width)
        squares = 0.0
        segment_start = start
        while segment_start < end:
            label = sorted_labels[segment_start]
            segment_end = segment_start + 1
            while segment_end < end and sorted_labels[segment_end] == label:
                segment_end += 1

            for position in range(segment_start, segment_end):
                squares += _add_row(row_sum, position == segment_start, rows, order[position], centers, label,
                                    grad, rows_are_features, grad_scale)

            continues_before = segment_start == start and start > 0 and sorted_labels[start - 1] == label
            continues_after = segment_end == end and end < batch_size and sorted_labels[end] == label
            if continues_before:
                partial_sums[chunk, 0, :] = row_sum
            elif continues_after:
                partial_sums[chunk, 1, :] = row_sum
            else:
                _write_center_row(
                    written, label, row_sum, segment_end - segment_start, moves_centers, step, count_weight
                )
            segment_start = segment_end
        chunk_squares[chunk] = squares

    # Classes that straddle a chunk boundary. Each is handled at the first boundary it crosses,
    # so exactly one iteration owns it; its center row was only read in the loop above.
    for boundary_chunk in prange(1, chunks):
        boundary = boundary_chunk * ROWS_PER_CHUNK
        label = sorted_labels[boundary]
        first = np.searchsorted(sorted_labels, label, side="left")
        if sorted_labels[boundary - 1] == label and first // ROWS_PER_CHUNK == boundary_chunk - 1:
            stop = np.searchsorted(sorted_labels, label, side="right")
            first_chunk = boundary_chunk - 1
            last_chunk = (stop - 1) // ROWS_PER_CHUNK
            row_sum = partial_sums[first_chunk, 1, :].copy()
            for chunk in range(first_chunk + 1, last_chunk + 1):
                row_sum += partial_sums[chunk, 0, :]
            _write_center_row(written, label, row_sum, stop - first, moves_centers, step, count_weight)

    total = 0.0
    for chunk in range(chunks):  # in chunk order: the same total for any thread count
        total += chunk_squares[chunk]
    return total


@njit(parallel=True, cache=True)
def _gather(centers, labels, out):
    for i in prange(labels.size):
        for k in range(centers.shape[1]):
            out[i, k] = centers[labels[i], k]


_workqueue_lock = threading.Lock()


def _one_launch_at_a_time():
    """Numba's ``workqueue`` threading layer (its fallback when neither TBB nor OpenMP is
    installed) aborts the whole process when two Python threads launch parallel kernels at once.
    Under it, and before the first launch has chosen a layer, launches take turns; under ``omp``
    and ``tbb`` concurrent calls run concurrently."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet, so no layer is chosen
        layer = None
    return nullcontext() if layer in ("omp", "tbb") else _workqueue_lock


def gather_centers(centers: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return ``centers[labels]``, a new (B, D) array."""
    out = np.empty((labels.size, centers.shape[1]), dtype=centers.dtype)
    with _one_launch_at_a_time():
        _gather(centers, labels, out)
    return out


def scatter_sub_update(
    centers: np.ndarray, labels: np.ndarray, updates: np.ndarray, *, deterministic: bool = False,
    copy_from: np.ndarray | None = None,
) -> None:
    """Subtract ``updates[i]`` from ``centers[labels[i]]`` for every i, duplicates accumulating
    (after copying ``copy_from`` into ``centers``, when given)."""
    if copy_from is not None:
        np.copyto(centers, copy_from)
    order, sorted_labels = _sort_by_label(labels, centers.shape[0])
    no_grad = np.empty((0, centers.shape[1]), dtype=centers.dtype)
    with _one_launch_at_a_time():
        _segmented_update(order, sorted_labels, updates, centers, centers, no_grad, False, True, -1.0, 0.0, 0.0)


def center_loss_step(
    features: np.ndarray,
    labels: np.ndarray,
    centers: np.ndarray,
    grad: np.ndarray,
    written: np.ndarray,
    rule: RuleCoefficients,
    *,
    deterministic: bool = False,
    copy_from: np.ndarray | None = None,
) -> float:
    """One step of ``rule``: write the grad and the center rows, return the loss."""
    if copy_from is not None:
        np.copyto(centers, copy_from)
    order, sorted_labels = _sort_by_label(labels, centers.shape[0])
    with _one_launch_at_a_time():
        squares = _segmented_update(
            order, sorted_labels, features, centers, written, grad,
            True, rule.moves_centers, rule.step, rule.count_weight, rule.grad_scale,
        )
    return float(rule.loss_scale * squares)
