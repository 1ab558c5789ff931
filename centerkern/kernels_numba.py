"""The ``numba`` backend: parallel CPU kernels, race-free with any amount of duplicate labels.

One call is one compiled function (``_update``); nothing of size B is allocated per call (the
scratch is kept per Python thread), and the label range check is part of the sort, before
anything is written. It runs in four steps:

1. **Sort.** A stable LSD radix sort of the batch positions by label: at most 11 bits per
   digit, one histogram pass for every digit (which is also the range check), no K-sized array.
   A digit on which all labels agree is skipped.
2. **Plan, O(B).** Each class is a *singleton* (one row in the batch), *local* (all its rows in
   one block of ``ROWS_PER_BLOCK`` consecutive rows of the batch) or *spread*.
3. **Two layouts, chosen per call from the plan's counts.**

   *Batch order* (the usual case). Pass A runs over blocks of the batch in batch order, so the
   features are read and the grad is written as sequential streams; only the center row of each
   sample is a random address, and it is prefetched a few rows ahead. It computes ``d``, the
   grad and the squares. A singleton's center row is written right there: no other row reads or
   writes it. Rows of one class within a block are summed (float64) into a slot: a local class's
   slot belongs to the thread and the class's row is written at its last row; a spread class's
   slot is kept for pass B. Pass B runs over what is left, in label order, in chunks of
   ``ITEMS_PER_CHUNK`` items: the spread classes' single rows (``d`` recomputed in float64 from
   the features, so the grad's rounding never enters the sums) and their slots.

   *Label order*, when pass B would re-read most rows (B near K and above: most classes spread).
   One pass over the sorted batch in chunks, which computes everything; the features and grad
   rows it visits are at random addresses, so the next rows are prefetched.

   In either, a class whose items fall in one chunk is finished by that chunk's thread. A class
   that straddles chunk boundaries leaves one partial sum per chunk; once the chunks are done,
   the calling thread adds them in chunk order and writes its row.

Consequences: every sample reads its center as it was before the call (a row is written only by
the thread that alone reads it, or after every read); no two threads write one center row; no
pass over all K rows, no K x D temporary; and because every chunking depends on the data only
and sums are added in a fixed order, results are bitwise identical for any thread count. Sums
are taken in float64. (``deterministic`` is part of the signature every backend shares; here it
changes nothing.)
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._rules import RuleCoefficients
from ._validation import label_out_of_range

# Pass A's work item: consecutive rows of the batch. Also what makes a class "local".
ROWS_PER_BLOCK = 64
# Pass B's (and the label-order layout's) work item: large enough that a chunk's bookkeeping is
# negligible, small enough that a batch of a few hundred rows still splits across threads.
ITEMS_PER_CHUNK = 64
# Below this many elements (B x D; for pass B, its items x D) a pass runs on the calling thread:
# waking the others costs more than they save (measured: parallel is faster from B=256, D=128
# on, and at B=64, D=32 slower).
PARALLEL_ELEMENTS = 1 << 14
# Radix digits of at most 11 bits: a 2048-bucket histogram stays in L1.
MAX_DIGIT_BITS = 11
# How far ahead center rows (batch order) and feature rows (label order) are prefetched.
PREFETCH_AHEAD = 2
PREFETCH_AHEAD_L2 = 8

# Sums may be reordered (so that LLVM vectorizes them: the order is still fixed at compile time,
# the same for any thread count) and a multiply-add fused: the arithmetic on float32 data is
# bound by the conversions to and from float64, and fusing measured 12% faster. No flag that
# assumes finite values: NaN and inf propagate as in the reference.
FAST_MATH = {"reassoc", "contract"}

LAYOUTS = ("auto", "batch order", "label order")
AUTO, BATCH_ORDER, LABEL_ORDER = range(3)

# A row's role in pass A (``row_action``): a negative code, or ``slot << SLOT_SHIFT | kind``.
SINGLETON = -1  # its class has this row only: the center row is written by pass A
DEFERRED = -2  # the only row of a spread class in its block: pass B reads it again
SLOT_SHIFT = 3
LOCAL_FIRST, LOCAL_ADD, LOCAL_LAST, SPREAD_FIRST, SPREAD_ADD = range(5)

# What ``_update`` reports in the first entries of the integer scratch.
BAD_POSITION, FLOATS_NEEDED, LAYOUT_RUN = range(3)
REPORT_SIZE = 4
# Integer scratch: the report, then eight B-sized vectors (see ``_update``), then one per block.
INT_VECTORS = 8


def _prefetcher(locality: int, for_write: int):
    """``prefetch(array, row, column)``: ask the CPU to load the cache line of
    ``array[row, column]`` (``locality`` 3: into L1, 2: into L2). Numba has no prefetch of its
    own, so this emits LLVM's."""

    @intrinsic
    def prefetch(typingctx, array, row, column):
        def codegen(context, builder, signature, args):
            array_type = signature.args[0]
            view = context.make_array(array_type)(context, builder, args[0])
            pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1], args[2]], wraparound=False)
            i32 = ir.IntType(32)
            byte_pointer = ir.IntType(8).as_pointer()
            function_type = ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32])
            function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0")
            arguments = [builder.bitcast(pointer, byte_pointer), ir.Constant(i32, for_write),
                         ir.Constant(i32, locality), ir.Constant(i32, 1)]
            builder.call(function, arguments)
            return context.get_dummy_value()

        return types.void(array, types.intp, types.intp), codegen

    return prefetch


_prefetch_l1 = _prefetcher(locality=3, for_write=0)
_prefetch_l2 = _prefetcher(locality=2, for_write=0)
_prefetch_l1_for_write = _prefetcher(locality=3, for_write=1)
CACHE_LINE = 64


@njit(cache=True)
def _prefetch_row(array, row):
    """Every cache line of ``array[row]`` into L1: the hardware prefetcher would only find a
    random row after its first few lines had missed."""
    step = max(1, CACHE_LINE // array.itemsize)
    for column in range(0, array.shape[1], step):
        _prefetch_l1(array, row, column)


@njit(cache=True)
def _prefetch_row_l2(array, row):
    step = max(1, CACHE_LINE // array.itemsize)
    for column in range(0, array.shape[1], step):
        _prefetch_l2(array, row, column)


@njit(cache=True)
def _prefetch_row_for_write(array, row):
    step = max(1, CACHE_LINE // array.itemsize)
    for column in range(0, array.shape[1], step):
        _prefetch_l1_for_write(array, row, column)


# --------------------------------------------------------------------------- sort and plan


@njit(cache=True)
def _radix_pass(source_labels, source_positions, from_batch, labels, destination_labels, destination_positions,
                counts, shift, mask):
    """One stable counting pass on the digit ``(label >> shift) & mask``. ``from_batch``: the
    source is the batch itself (``labels``, positions 0..B-1)."""
    offsets = np.empty(counts.size, np.int64)
    total = 0
    for bucket in range(counts.size):
        offsets[bucket] = total
        total += counts[bucket]
    for i in range(labels.size):
        if from_batch:
            label, position = labels[i], i
        else:
            label, position = source_labels[i], source_positions[i]
        bucket = (label >> shift) & mask
        destination_labels[offsets[bucket]] = label
        destination_positions[offsets[bucket]] = position
        offsets[bucket] += 1


@njit(cache=True)
def _sort_by_label(labels, num_classes, sorted_labels, positions, spare_labels, spare_positions):
    """Sort the batch positions by label, stably (within a class, in batch order), into
    ``positions`` and ``sorted_labels``. Returns the position of the first label outside
    [0, num_classes) and sorts nothing, or -1."""
    batch_size = labels.size
    bits = 1
    while (1 << bits) < num_classes:
        bits += 1
    passes = (bits + MAX_DIGIT_BITS - 1) // MAX_DIGIT_BITS
    digit_bits = (bits + passes - 1) // passes
    mask = (1 << digit_bits) - 1
    counts = np.zeros((passes, 1 << digit_bits), np.int64)
    for i in range(batch_size):  # every digit's histogram, and the range check, in one pass
        label = labels[i]
        if label < 0 or label >= num_classes:
            return i
        for digit in range(passes):
            counts[digit, (label >> (digit * digit_bits)) & mask] += 1

    # a digit on which every label agrees leaves the order as it is
    needed = np.zeros(passes, np.bool_)
    for digit in range(passes):
        needed[digit] = counts[digit].max() < batch_size
    remaining = needed.sum()
    if remaining == 0:
        for i in range(batch_size):
            sorted_labels[i] = labels[i]
            positions[i] = i
        return -1
    from_batch = True
    for digit in range(passes):
        if not needed[digit]:
            continue
        # ping-pong between the two pairs so that the last pass lands in the result's pair
        if remaining % 2 == 1:
            _radix_pass(spare_labels, spare_positions, from_batch, labels, sorted_labels, positions,
                        counts[digit], digit * digit_bits, mask)
        else:
            _radix_pass(sorted_labels, positions, from_batch, labels, spare_labels, spare_positions,
                        counts[digit], digit * digit_bits, mask)
        from_batch = False
        remaining -= 1
    return -1


@njit(cache=True)
def _plan(sorted_labels, positions, row_action, class_size, item_codes, item_labels, local_slots_in_block):
    """Each row's role in pass A (``row_action``; at a local class's last row, ``class_size``
    too), and pass B's items in
    label order: a spread class's single row in a block (code: its position) or its slot (code:
    ``-1 - slot``). Returns (pass B's item count, spread slots, rows among pass B's items, the
    most local slots one block needs)."""
    batch_size = sorted_labels.size
    local_slots_in_block[:] = 0
    items = 0
    spread_slots = 0
    rows_read_again = 0
    start = 0
    while start < batch_size:
        label = sorted_labels[start]
        end = start + 1
        while end < batch_size and sorted_labels[end] == label:
            end += 1
        if end - start == 1:
            row_action[positions[start]] = SINGLETON
        elif positions[start] // ROWS_PER_BLOCK == positions[end - 1] // ROWS_PER_BLOCK:
            block = positions[start] // ROWS_PER_BLOCK
            slot = local_slots_in_block[block] << SLOT_SHIFT
            local_slots_in_block[block] += 1
            for t in range(start, end):
                row_action[positions[t]] = slot | LOCAL_ADD
            row_action[positions[start]] = slot | LOCAL_FIRST
            row_action[positions[end - 1]] = slot | LOCAL_LAST
            class_size[positions[end - 1]] = end - start  # read at that row only
        else:
            run_start = start
            while run_start < end:  # the class's rows block by block
                block = positions[run_start] // ROWS_PER_BLOCK
                run_end = run_start + 1
                while run_end < end and positions[run_end] // ROWS_PER_BLOCK == block:
                    run_end += 1
                if run_end == run_start + 1:
                    row_action[positions[run_start]] = DEFERRED
                    item_codes[items] = positions[run_start]
                    rows_read_again += 1
                else:
                    slot = spread_slots << SLOT_SHIFT
                    for t in range(run_start, run_end):
                        row_action[positions[t]] = slot | SPREAD_ADD
                    row_action[positions[run_start]] = slot | SPREAD_FIRST
                    item_codes[items] = -1 - spread_slots
                    spread_slots += 1
                item_labels[items] = label
                items += 1
                run_start = run_end
        start = end
    most_local = local_slots_in_block.max() if local_slots_in_block.size else 0
    return items, spread_slots, rows_read_again, most_local


# --------------------------------------------------------------------------- row arithmetic


@njit(cache=True, inline="always", fastmath=FAST_MATH)
def _add_row(row_sum, first, rows, i, centers, label, grad, rows_are_features, with_grad, grad_scale):
    """Add row i's contribution to ``row_sum`` (or start it: one pass over D fewer than zeroing
    first): ``d_i = rows[i] - centers[label]`` for the step, ``rows[i]`` for the scatter. With
    ``with_grad``, also write the grad row and return the squared norm of ``d_i`` (else 0)."""
    squares = 0.0
    width = row_sum.size
    if rows_are_features and with_grad:
        for k in range(width):
            difference = np.float64(rows[i, k]) - np.float64(centers[label, k])
            grad[i, k] = grad_scale * difference
            squares += difference * difference
            row_sum[k] = difference if first else row_sum[k] + difference
    elif rows_are_features:
        for k in range(width):
            difference = np.float64(rows[i, k]) - np.float64(centers[label, k])
            row_sum[k] = difference if first else row_sum[k] + difference
    elif first:
        for k in range(width):
            row_sum[k] = rows[i, k]
    else:
        for k in range(width):
            row_sum[k] += rows[i, k]
    return squares


@njit(cache=True, inline="always", fastmath=FAST_MATH)
def _add_sums(row_sum, first, sums):
    if first:
        for k in range(row_sum.size):
            row_sum[k] = sums[k]
    else:
        for k in range(row_sum.size):
            row_sum[k] += sums[k]


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


@njit(cache=True, inline="always", fastmath=FAST_MATH)
def _singleton_row(rows, i, centers, written, label, grad, rows_are_features, moves_centers, step, count_weight,
                   grad_scale):
    """A class with one row in the batch, in one pass over D: its grad row and its center row
    (no other row reads or writes it). Returns the squared norm of ``d_i`` (0 for the scatter)."""
    scale = step / (1.0 + count_weight)
    squares = 0.0
    width = centers.shape[1]
    if not rows_are_features:
        # The scatter (scale -1): c - u in the data's own dtype. For float32 that is the float64
        # path's result bit for bit (float64 has more than 2 x 24 + 2 bits, so rounding the
        # exact float64 difference to float32 equals rounding the difference once), and it
        # needs no conversions, which bound this loop otherwise.
        for k in range(width):
            centers[label, k] -= rows[i, k]
    elif moves_centers:
        for k in range(width):
            center = np.float64(centers[label, k])
            difference = np.float64(rows[i, k]) - center
            grad[i, k] = grad_scale * difference
            squares += difference * difference
            centers[label, k] = center + scale * difference  # see _write_center_row
    else:
        for k in range(width):
            difference = np.float64(rows[i, k]) - np.float64(centers[label, k])
            grad[i, k] = grad_scale * difference
            squares += difference * difference
            written[label, k] = scale * difference
    return squares


# --------------------------------------------------------------------------- the passes


# Each pass is a body per work item, run by a parallel loop, or by a serial one when the batch
# is too small to pay for waking the threads (see ``PARALLEL_ELEMENTS``): the same items in the
# same order, so the results are the same bits either way.


@njit(cache=True, fastmath=FAST_MATH)
def _batch_block(block, labels, rows, centers, written, grad, row_action, class_size, local_sums, spread_sums,
                 rows_are_features, moves_centers, step, count_weight, grad_scale):
    """Pass A over one block of the batch (see the module docstring). Returns its squares."""
    batch_size = labels.size
    start = block * ROWS_PER_BLOCK
    end = min(start + ROWS_PER_BLOCK, batch_size)
    squares = 0.0
    for i in range(start, end):
        if i + PREFETCH_AHEAD < batch_size:
            _prefetch_row(centers, labels[i + PREFETCH_AHEAD])
        label = labels[i]
        action = row_action[i]
        if action == SINGLETON:
            squares += _singleton_row(rows, i, centers, written, label, grad, rows_are_features, moves_centers,
                                      step, count_weight, grad_scale)
        elif action == DEFERRED:
            if rows_are_features:
                for k in range(centers.shape[1]):
                    difference = np.float64(rows[i, k]) - np.float64(centers[label, k])
                    grad[i, k] = grad_scale * difference
                    squares += difference * difference
        else:
            kind = action & ((1 << SLOT_SHIFT) - 1)
            slot = action >> SLOT_SHIFT
            first = kind == LOCAL_FIRST or kind == SPREAD_FIRST
            if kind >= SPREAD_FIRST:
                squares += _add_row(spread_sums[slot], first, rows, i, centers, label, grad, rows_are_features,
                                    True, grad_scale)
            else:
                squares += _add_row(local_sums[slot], first, rows, i, centers, label, grad, rows_are_features,
                                    True, grad_scale)
                if kind == LOCAL_LAST:  # the class's last row: every row of it has read its center
                    _write_center_row(written, label, local_sums[slot], class_size[i], moves_centers, step,
                                      count_weight)
    return squares


@njit(cache=True)
def _first_not_below(sorted_values, value, above):
    """The first index whose value is >= ``value`` (> with ``above``): ``np.searchsorted``,
    written out because Numba's generic one takes seconds to compile."""
    low, high = 0, sorted_values.size
    while low < high:
        middle = (low + high) // 2
        if sorted_values[middle] < value or (above and sorted_values[middle] == value):
            low = middle + 1
        else:
            high = middle
    return low


@njit(cache=True, inline="always")
def _class_size(sorted_labels, label):
    return _first_not_below(sorted_labels, label, True) - _first_not_below(sorted_labels, label, False)


@njit(cache=True, fastmath=FAST_MATH)
def _label_chunk(chunk, item_codes, item_labels, sorted_labels, rows, centers, written, grad, spread_sums,
                 partial_sums, rows_are_features, with_grad, moves_centers, step, count_weight, grad_scale):
    """One chunk of items in label order: a row (code >= 0, its batch position) or a spread
    slot (code ``-1 - slot``). ``with_grad``: the label-order layout, which also writes the grad
    and returns the squares; otherwise pass B. A class's size is read off ``sorted_labels``."""
    items = item_codes.size
    start = chunk * ITEMS_PER_CHUNK
    end = min(start + ITEMS_PER_CHUNK, items)
    row_sum = np.empty(centers.shape[1])
    squares = 0.0
    segment_start = start
    while segment_start < end:
        label = item_labels[segment_start]
        segment_end = segment_start + 1
        while segment_end < end and item_labels[segment_end] == label:
            segment_end += 1
        for t in range(segment_start, segment_end):
            # the rows are at random addresses: fetch them ahead (slots were just written)
            if t + PREFETCH_AHEAD_L2 < items:
                ahead = item_codes[t + PREFETCH_AHEAD]
                if ahead >= 0:
                    _prefetch_row(rows, ahead)
                    if with_grad and rows_are_features:  # the scatter's grad is an empty stand-in
                        _prefetch_row_for_write(grad, ahead)
                further = item_codes[t + PREFETCH_AHEAD_L2]
                if further >= 0:
                    _prefetch_row_l2(rows, further)
                    if with_grad and rows_are_features:
                        _prefetch_row_l2(grad, further)
            code = item_codes[t]
            if code >= 0:
                squares += _add_row(row_sum, t == segment_start, rows, code, centers, label, grad,
                                    rows_are_features, with_grad, grad_scale)
            else:
                _add_sums(row_sum, t == segment_start, spread_sums[-1 - code])

        continues_before = segment_start == start and start > 0 and item_labels[start - 1] == label
        continues_after = segment_end == end and end < items and item_labels[end] == label
        if continues_before:
            partial_sums[chunk, 0, :] = row_sum
        elif continues_after:
            partial_sums[chunk, 1, :] = row_sum
        else:
            _write_center_row(written, label, row_sum, _class_size(sorted_labels, label), moves_centers, step,
                              count_weight)
        segment_start = segment_end
    return squares


@njit(cache=True)
def _straddling_class(boundary_chunk, item_labels, sorted_labels, written, partial_sums, moves_centers, step,
                      count_weight):
    """The class at a chunk boundary, if it starts in the chunk before: each straddling class
    is handled at the first boundary it crosses, so exactly one iteration owns it; its center row
    was only read by the chunks."""
    boundary = boundary_chunk * ITEMS_PER_CHUNK
    label = item_labels[boundary]
    first = _first_not_below(item_labels, label, False)
    if item_labels[boundary - 1] == label and first // ITEMS_PER_CHUNK == boundary_chunk - 1:
        stop = _first_not_below(item_labels, label, True)
        row_sum = np.empty(partial_sums.shape[2])
        _add_sums(row_sum, True, partial_sums[boundary_chunk - 1, 1])
        for chunk in range(boundary_chunk, (stop - 1) // ITEMS_PER_CHUNK + 1):  # in chunk order
            _add_sums(row_sum, False, partial_sums[chunk, 0])
        _write_center_row(written, label, row_sum, _class_size(sorted_labels, label), moves_centers, step,
                          count_weight)


# A pass's arguments travel as one flat tuple, ``work`` (a parallel loop takes a tuple of arrays,
# not a nested one): what differs from pass to pass (label_order, sums, thread_slots,
# spread_sums, item_codes, item_labels), then what every pass of a call shares (with_grad,
# labels, rows, centers, written, grad, row_action, class_size, sorted_labels, partial_sums,
# rows_are_features, moves_centers, step, count_weight, grad_scale). The parallel and the
# serial loop below then differ in the loop alone.


@njit(cache=True, inline="always")
def _run_item(item, thread, work):
    """One work item of a pass: a chunk of ``_label_chunk`` (``label_order``) or a block of
    ``_batch_block``. Returns its squares. ``thread`` picks the local slots."""
    (label_order, sums, thread_slots, spread_sums, item_codes, item_labels, with_grad, labels, rows, centers,
     written, grad, row_action, class_size, sorted_labels, partial_sums, rows_are_features, moves_centers, step,
     count_weight, grad_scale) = work
    if label_order:
        return _label_chunk(item, item_codes, item_labels, sorted_labels, rows, centers, written, grad, spread_sums,
                            partial_sums, rows_are_features, with_grad, moves_centers, step, count_weight, grad_scale)
    return _batch_block(item, labels, rows, centers, written, grad, row_action, class_size, thread_slots[thread],
                        spread_sums, rows_are_features, moves_centers, step, count_weight, grad_scale)


@njit(parallel=True, cache=True)
def _run_items(work):
    """Every work item of a pass, in parallel. One parallel loop serves every pass because each
    one costs seconds of compilation."""
    # the squares are stored through their own name: stored through the tuple inside the
    # parallel loop, they were lost (the tests caught it); the called functions' writes are not
    sums = work[1]
    for item in prange(sums.size):
        sums[item] = _run_item(np.int64(item), numba.get_thread_id(), work)


@njit(cache=True)
def _run_items_serial(work):
    """The same items in the same order, on the calling thread (see ``PARALLEL_ELEMENTS``)."""
    sums = work[1]
    for item in range(sums.size):
        sums[item] = _run_item(np.int64(item), 0, work)


@njit(cache=True)
def _run_pass(elements, work):
    if elements >= PARALLEL_ELEMENTS:
        _run_items(work)
    else:
        _run_items_serial(work)


@njit(cache=True)
def _finish_straddling_classes(chunks, item_labels, sorted_labels, written, partial_sums, moves_centers, step,
                               count_weight):
    """After the chunks: the classes whose items straddle chunk boundaries, on the calling
    thread (a few partial rows each; a parallel loop here cost more to start than it saved)."""
    for boundary_chunk in range(1, chunks):
        _straddling_class(np.int64(boundary_chunk), item_labels, sorted_labels, written, partial_sums, moves_centers,
                          step, count_weight)


@njit(cache=True)
def _in_order(values):
    total = 0.0
    for value in values:  # in chunk order: the same total for any thread count
        total += value
    return total


def _chunks(count, size):
    return (count + size - 1) // size


@njit(cache=True)
def _update(labels, rows, centers, written, grad, ints, floats, rows_are_features, moves_centers, step, count_weight,
            grad_scale, layout, threads):
    """Add, per class j, the rows of class j into ``written[j]`` (see ``RuleCoefficients``).

    ``rows_are_features``: each row contributes ``d_i = rows[i] - centers[j]``, and the grad and
    the squared norm of ``d_i`` are produced on the way (the fused center-loss step). Otherwise
    each row contributes itself (the scatter). Returns ``sum_i ||d_i||^2`` (0 for the scatter).

    ``ints`` and ``floats`` are the scratch. The first entries of ``ints`` report: the position
    of a bad label (or -1: then nothing was written), the float scratch this call needs (when
    ``floats`` is smaller, nothing was written), and the layout that ran (0: none). ``threads``:
    the most threads a parallel loop may use (one local-slot set each; a constant argument,
    since asking Numba here would keep the cache from saving this function).
    """
    batch_size = labels.size
    width = centers.shape[1]
    ints[BAD_POSITION] = -1
    ints[FLOATS_NEEDED] = 0
    ints[LAYOUT_RUN] = 0
    vector = ints[REPORT_SIZE:REPORT_SIZE + INT_VECTORS * batch_size].reshape((INT_VECTORS, batch_size))
    sorted_labels, positions = vector[0], vector[1]
    bad = _sort_by_label(labels, centers.shape[0], sorted_labels, positions, vector[2], vector[3])
    if bad >= 0:
        ints[BAD_POSITION] = bad
        return 0.0
    blocks = (batch_size + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    row_action, class_size, item_codes, item_labels = vector[4], vector[5], vector[6], vector[7]
    local_slots_in_block = ints[REPORT_SIZE + INT_VECTORS * batch_size:][:blocks]
    items, spread_slots, rows_read_again, most_local = _plan(
        sorted_labels, positions, row_action, class_size, item_codes, item_labels, local_slots_in_block
    )

    if layout == AUTO:
        # Pass B reads its rows again at random addresses, and its slots were written once and
        # are read once: when that comes near the rows the batch holds, one pass in label order
        # (which reads each row once, at a random address) costs less.
        slot_cost = spread_slots * 2 * 8 // rows.itemsize
        layout = LABEL_ORDER if 2 * (rows_read_again + slot_cost) > batch_size else BATCH_ORDER
    if layout == LABEL_ORDER:
        chunks = (batch_size + ITEMS_PER_CHUNK - 1) // ITEMS_PER_CHUNK
        needed = chunks * (2 * width + 1)
    else:
        chunks = (items + ITEMS_PER_CHUNK - 1) // ITEMS_PER_CHUNK
        needed = (threads * most_local + spread_slots + 2 * chunks) * width + chunks + blocks
    if needed > floats.size:
        ints[FLOATS_NEEDED] = needed
        return 0.0
    ints[LAYOUT_RUN] = layout

    partial_sums = floats[:chunks * 2 * width].reshape((chunks, 2, width))
    chunk_squares = floats[chunks * 2 * width:chunks * (2 * width + 1)]
    rest = floats[chunks * (2 * width + 1):]
    # one variable each, not the literals True and False, so that Numba compiles each pass once
    label_order = layout == LABEL_ORDER
    with_grad = label_order
    shared = (with_grad, labels, rows, centers, written, grad, row_action, class_size, sorted_labels, partial_sums,
              rows_are_features, moves_centers, step, count_weight, grad_scale)
    if label_order:
        no_local_slots, no_slots = floats[:0].reshape((0, 0, width)), floats[:0].reshape((0, width))
        _run_pass(batch_size * width,
                  (label_order, chunk_squares, no_local_slots, no_slots, positions, sorted_labels) + shared)
        _finish_straddling_classes(chunks, sorted_labels, sorted_labels, written, partial_sums, moves_centers, step,
                                   count_weight)
        return _in_order(chunk_squares)

    block_squares = rest[:blocks]
    rest = rest[blocks:]
    thread_slots = rest[:threads * most_local * width].reshape((threads, most_local, width))
    rest = rest[threads * most_local * width:]
    spread_sums = rest[:spread_slots * width].reshape((spread_slots, width))
    pass_b_codes, pass_b_labels = item_codes[:items], item_labels[:items]
    _run_pass(batch_size * width,
              (label_order, block_squares, thread_slots, spread_sums, pass_b_codes, pass_b_labels) + shared)
    if items:  # pass B: its items in label order (a computed bool, for the reason above)
        pass_b = not label_order
        _run_pass(items * width,
                  (pass_b, chunk_squares, thread_slots, spread_sums, pass_b_codes, pass_b_labels) + shared)
        _finish_straddling_classes(chunks, pass_b_labels, sorted_labels, written, partial_sums, moves_centers, step,
                                   count_weight)
    return _in_order(block_squares)


@njit(parallel=True, cache=True)
def _fill_zeros(flat):
    chunk = 1 << 16
    for start in prange((flat.size + chunk - 1) // chunk):
        flat[start * chunk:(start + 1) * chunk] = 0


def zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """``np.zeros``, filled by every thread. A large ``np.zeros`` gets fresh pages from the
    kernel, which zeroes them one fault at a time on one core (measured: a 20 MB K x D array,
    rule pytorch's grad_centers at M, 440 us; this, 190 us)."""
    array = np.empty(shape, dtype)
    with _one_launch_at_a_time():
        _fill_zeros(array.reshape(-1))
    return array


@njit(parallel=True, cache=True)
def _gather(centers, labels, out):
    for i in prange(labels.size):
        for k in range(centers.shape[1]):
            out[i, k] = centers[labels[i], k]


# --------------------------------------------------------------------------- calling it


_workqueue_lock = threading.Lock()


_concurrent_launches = None  # a no-op context once the threading layer is known to allow them


def _one_launch_at_a_time():
    """Numba's ``workqueue`` threading layer (its fallback when neither TBB nor OpenMP is
    installed) aborts the whole process when two Python threads launch parallel kernels at once.
    Under it, and before the first launch has chosen a layer, launches take turns; under ``omp``
    and ``tbb`` concurrent calls run concurrently."""
    global _concurrent_launches
    if _concurrent_launches is not None:
        return _concurrent_launches
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet, so no layer is chosen
        return _workqueue_lock
    if layer in ("omp", "tbb"):  # a process keeps the layer it chose first
        _concurrent_launches = nullcontext()
        return _concurrent_launches
    return _workqueue_lock


# numba.set_num_threads may lower the thread count at any time, never raise it past this
_MOST_THREADS = numba.config.NUMBA_NUM_THREADS


class _Scratch(threading.local):
    """Each Python thread's scratch, kept from call to call: B-sized vectors allocated per call
    would pay page faults again every time (measured at B=65k)."""

    def __init__(self):
        self.ints = np.empty(0, np.int64)
        self.floats = np.empty(0, np.float64)
        self.last_layout = None

    def ints_for(self, batch_size: int) -> np.ndarray:
        needed = REPORT_SIZE + INT_VECTORS * batch_size + _chunks(batch_size, ROWS_PER_BLOCK)
        if self.ints.size < needed:
            self.ints = np.empty(needed, np.int64)
        return self.ints


_scratch = _Scratch()


def last_layout() -> str | None:
    """The layout the last call of this thread ran ("batch order" or "label order")."""
    return _scratch.last_layout


def _run(labels, rows, centers, written, grad, rows_are_features, moves_centers, step, count_weight, grad_scale,
         layout="auto"):
    ints = _scratch.ints_for(labels.size)
    while True:
        with _one_launch_at_a_time():
            squares = _update(labels, rows, centers, written, grad, ints, _scratch.floats, rows_are_features,
                              moves_centers, step, count_weight, grad_scale, LAYOUTS.index(layout),
                              _MOST_THREADS)
        if ints[BAD_POSITION] >= 0:
            position = int(ints[BAD_POSITION])
            raise label_out_of_range(position, int(labels[position]), centers.shape[0])
        if ints[LAYOUT_RUN]:
            _scratch.last_layout = LAYOUTS[ints[LAYOUT_RUN]]
            return squares
        # the float scratch was too small, and nothing was written: grow it and run again
        _scratch.floats = np.empty(int(ints[FLOATS_NEEDED]) * 5 // 4, np.float64)


def gather_centers(centers: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return ``centers[labels]``, a new (B, D) array."""
    out = np.empty((labels.size, centers.shape[1]), dtype=centers.dtype)
    with _one_launch_at_a_time():
        _gather(centers, labels, out)
    return out


def scatter_sub_update(
    centers: np.ndarray, labels: np.ndarray, updates: np.ndarray, *, deterministic: bool = False,
    copy_from: np.ndarray | None = None, layout: str = "auto",
) -> None:
    """Subtract ``updates[i]`` from ``centers[labels[i]]`` for every i, duplicates accumulating
    (after copying ``copy_from`` into ``centers``, when given). A label out of range raises
    SPEC's ``IndexError`` before anything is written."""
    if copy_from is not None:
        np.copyto(centers, copy_from)
    # the scatter writes no grad: an empty stand-in (not ``updates``, which may be read-only)
    no_grad = np.empty((0, centers.shape[1]), dtype=centers.dtype)
    _run(labels, updates, centers, centers, no_grad, False, True, -1.0, 0.0, 0.0, layout)


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
    layout: str = "auto",
) -> float:
    """One step of ``rule``: write the grad and the center rows, return the loss. A label out of
    range raises SPEC's ``IndexError`` before anything is written. ``layout`` (this backend
    only): ``"auto"``, or one of the two layouts forced (for tests and measurements)."""
    if copy_from is not None:
        np.copyto(centers, copy_from)
    squares = _run(labels, features, centers, written, grad, True, rule.moves_centers, rule.step, rule.count_weight,
                   rule.grad_scale, layout)
    return float(rule.loss_scale * squares)
