"""The passes over the batch: the body of each work item (the loops are ``step``'s).

Each body is one compiled function, and the few-line helpers it calls are inlined into it: a
function of its own costs a first call a compile, and Numba's inlining of nested functions
costs more than it saves (both measured: see ``centerkern._backends.numba_cpu.jit``).
"""

from __future__ import annotations

import numpy as np

from .jit import FAST_MATH, helper
from .prefetch import prefetch_row, prefetch_row_for_write, prefetch_row_l2
from .rows import add_row, add_sums, singleton_row, write_center_row
from .sort import DEFERRED, LOCAL_FIRST, LOCAL_LAST, ROWS_PER_TILE, SINGLETON, SLOT_SHIFT, SPANNING_FIRST

# Pass B's (and the label-order layout's) work item: large enough that a chunk's bookkeeping is
# negligible, small enough that a batch of a few hundred rows still splits across threads.
ITEMS_PER_CHUNK = 64
# How far ahead center rows (batch order) and feature rows (label order) are prefetched.
PREFETCH_AHEAD = 2
PREFETCH_AHEAD_L2 = 8


@helper(fastmath=FAST_MATH)
def batch_tile(tile, batch, rule, row_action, class_size, local_sums, spanning_sums):
    """Pass A over one tile of the batch (see ``step``'s docstring). Returns its squares."""
    labels, rows, centers = batch.labels, batch.rows, batch.centers
    rows_are_features, grad_scale = batch.rows_are_features, rule.grad_scale
    batch_size = labels.size
    start = tile * ROWS_PER_TILE
    end = min(start + ROWS_PER_TILE, batch_size)
    squares = 0.0
    for i in range(start, end):
        if i + PREFETCH_AHEAD < batch_size:
            prefetch_row(centers, labels[i + PREFETCH_AHEAD])
        label = labels[i]
        action = row_action[i]
        if action == SINGLETON:
            squares += singleton_row(batch, rule, i, label)
        elif action == DEFERRED:
            if rows_are_features:
                grad = batch.grad
                for k in range(centers.shape[1]):
                    difference = np.float64(rows[i, k]) - np.float64(centers[label, k])
                    grad[i, k] = grad_scale * difference
                    squares += difference * difference
        else:
            kind = action & ((1 << SLOT_SHIFT) - 1)
            slot = action >> SLOT_SHIFT
            first = kind == LOCAL_FIRST or kind == SPANNING_FIRST
            row_sum = spanning_sums[slot] if kind >= SPANNING_FIRST else local_sums[slot]
            squares += add_row(row_sum, first, batch, i, label, True, grad_scale, rows_are_features)
            if kind == LOCAL_LAST:  # the class's last row: every row of it has read its center
                write_center_row(batch.written, label, row_sum, class_size[i], rule)
    return squares


@helper
def class_range(sorted_values, value):
    """(first, stop): where ``value`` starts and ends in ``sorted_values``, by bisection
    (``np.searchsorted`` on both sides, written out: Numba's generic one takes seconds to
    compile)."""
    low, high = 0, sorted_values.size
    while low < high:
        middle = (low + high) // 2
        if sorted_values[middle] < value:
            low = middle + 1
        else:
            high = middle
    first = low
    high = sorted_values.size
    while low < high:
        middle = (low + high) // 2
        if sorted_values[middle] <= value:
            low = middle + 1
        else:
            high = middle
    return first, low


@helper(inline="always")
def class_size_of(sorted_labels, label):
    first, stop = class_range(sorted_labels, label)
    return stop - first


@helper(fastmath=FAST_MATH)
def label_chunk(chunk, batch, rule, item_codes, item_labels, sorted_labels, spanning_sums, partial_sums, with_grad):
    """One chunk of items in label order: a row (code >= 0, its batch position) or a spanning
    slot (code ``-1 - slot``). ``with_grad``: the label-order layout, which also writes the grad
    and returns the squares; otherwise pass B. A class's size is read off ``sorted_labels``.

    A class cut by the chunk's start is summed in ``partial_sums[chunk, 0]``, one cut by its end
    in ``partial_sums[chunk, 1]``; every other class is summed in ``partial_sums[chunk, 1]`` too,
    which it leaves before the next class starts, and written here."""
    rows, grad = batch.rows, batch.grad
    rows_are_features, grad_scale = batch.rows_are_features, rule.grad_scale
    items = item_codes.size
    start = chunk * ITEMS_PER_CHUNK
    end = min(start + ITEMS_PER_CHUNK, items)
    squares = 0.0
    segment_start = start
    while segment_start < end:
        label = item_labels[segment_start]
        segment_end = segment_start + 1
        while segment_end < end and item_labels[segment_end] == label:
            segment_end += 1
        continues_before = segment_start == start and start > 0 and item_labels[start - 1] == label
        row_sum = partial_sums[chunk, 0] if continues_before else partial_sums[chunk, 1]
        for t in range(segment_start, segment_end):
            # the rows are at random addresses: fetch them ahead (slots were just written)
            if t + PREFETCH_AHEAD_L2 < items:
                ahead = item_codes[t + PREFETCH_AHEAD]
                if ahead >= 0:
                    prefetch_row(rows, ahead)
                    if with_grad and rows_are_features:  # the scatter's grad is an empty stand-in
                        prefetch_row_for_write(grad, ahead)
                further = item_codes[t + PREFETCH_AHEAD_L2]
                if further >= 0:
                    prefetch_row_l2(rows, further)
                    if with_grad and rows_are_features:
                        prefetch_row_l2(grad, further)
            code = item_codes[t]
            if code >= 0:
                squares += add_row(row_sum, t == segment_start, batch, code, label, with_grad, grad_scale,
                                   rows_are_features)
            else:
                add_sums(row_sum, t == segment_start, spanning_sums[-1 - code])
        continues_after = segment_end == end and end < items and item_labels[end] == label
        if not continues_before and not continues_after:
            write_center_row(batch.written, label, row_sum, class_size_of(sorted_labels, label), rule)
        segment_start = segment_end
    return squares


@helper
def finish_spanning_classes(item_labels, sorted_labels, partial_sums, written, rule):
    """After the chunks: the classes whose items span chunk boundaries, on the calling
    thread (a few partial rows each; a parallel loop here cost more to start than it saved).
    Each spanning class is taken at the first boundary it crosses, and its partial sums are
    added in chunk order; its center row was only read by the chunks."""
    for boundary_chunk in range(1, partial_sums.shape[0]):
        boundary = boundary_chunk * ITEMS_PER_CHUNK
        label = item_labels[boundary]
        if item_labels[boundary - 1] != label:
            continue  # no class crosses this boundary
        first, stop = class_range(item_labels, label)
        if first // ITEMS_PER_CHUNK == boundary_chunk - 1:
            row_sum = partial_sums[boundary_chunk - 1, 1]  # added to in place: read by nothing else
            for chunk in range(boundary_chunk, (stop - 1) // ITEMS_PER_CHUNK + 1):
                add_sums(row_sum, False, partial_sums[chunk, 0])
            write_center_row(written, label, row_sum, class_size_of(sorted_labels, label), rule)
