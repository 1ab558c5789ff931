"""One call of the numba backend: sort, plan, and the passes of the layout the plan calls for.

It runs in four steps:

1. **Sort.** A stable LSD radix sort of the batch positions by label: at most 11 bits per
   digit, one histogram pass for every digit (which is also the range check), no K-sized array.
   A digit on which all labels agree is skipped.
2. **Plan, O(B).** Each class is a *singleton* (one row in the batch), *local* (all its rows in
   one tile of ``ROWS_PER_TILE`` consecutive rows of the batch) or *spanning*.
3. **Two layouts, chosen per call from the plan's counts.**

   *Batch order* (the usual case). Pass A runs over tiles of the batch in batch order, so the
   features are read and the grad is written as sequential streams; only the center row of each
   sample is a random address, and it is prefetched a few rows ahead. It computes ``d``, the
   grad and the squares. A singleton's center row is written right there: no other row reads or
   writes it. Rows of one class within a tile are summed (float64) into a slot: a local class's
   slot belongs to the thread and the class's row is written at its last row; a spanning class's
   slot is kept for pass B. Pass B runs over what is left, in label order, in chunks of
   ``ITEMS_PER_CHUNK`` items: the spanning classes' single rows (``d`` recomputed in float64 from
   the features, so the grad's rounding never enters the sums) and their slots.

   *Label order*, when pass B would re-read most rows (B near K and above: most classes spanning).
   One pass over the sorted batch in chunks, which computes everything; the features and grad
   rows it visits are at random addresses, so the next rows are prefetched.

   In either, a class whose items fall in one chunk is finished by that chunk's thread. A class
   that spans chunk boundaries leaves one partial sum per chunk; once the chunks are done,
   the calling thread adds them in chunk order and writes its row.
4. **Regime.** Python picks the entry point: ``step_serial`` for batches under
   ``PARALLEL_ELEMENTS`` elements, which runs every pass on the calling thread, or
   ``step_parallel``, which runs each pass of at least that many elements on every thread. The
   regime is a compile-time choice (the type of ``regime``: None or ``PARALLEL``, on which Numba
   prunes branches), so that an entry compiles the loops of its own regime only.

Consequences: every sample reads its center as it was before the call (a row is written only by
the thread that alone reads it, or after every read); no two threads write one center row; no
pass over all K rows, no K x D temporary; and because every chunking depends on the data only
and sums are added in a fixed order, results are bitwise identical for any thread count and in
either regime. Sums are taken in float64.
"""

from __future__ import annotations


import numba
import numpy as np
from numba import prange, types

from ..._core.rules import SCATTER_SUB
from .jit import Entry, helper, renamed
from .passes import ITEMS_PER_CHUNK, batch_tile, finish_spanning_classes, label_chunk
from .rows import Batch
from .sort import HISTOGRAM_SIZE, ROWS_PER_TILE, plan, sort_by_label

# Below this many elements (B x D; for pass B, its items x D) a pass runs on the calling thread:
# waking the others costs more than they save (measured: parallel is faster from B=256, D=128
# on, and at B=64, D=32 slower).
PARALLEL_ELEMENTS = 1 << 14

LAYOUTS = ("auto", "batch order", "label order")
AUTO, BATCH_ORDER, LABEL_ORDER = range(3)

# What a call reports in the first entries of the integer scratch.
BAD_POSITION, FLOATS_NEEDED, LAYOUT_RUN = range(3)
REPORT_SIZE = 4
# Integer scratch: the report, the sort's histogram, eight B-sized vectors, then one per tile.
INT_VECTORS = 8


@helper(inline="always")
def tiles_of(batch_size):
    return (batch_size + ROWS_PER_TILE - 1) // ROWS_PER_TILE


def int_scratch_size(batch_size: int) -> int:
    return REPORT_SIZE + HISTOGRAM_SIZE + INT_VECTORS * batch_size + tiles_of.py_func(batch_size)


def float_scratch_guess(batch_size: int, feature_size: int, threads: int) -> int:
    """A float scratch size that serves any batch of these sizes (a call told its scratch is too
    small by ``FLOATS_NEEDED`` runs again with more): the larger layout's need, with every class
    of two rows or more (a local class holds a slot of its tile, a spanning one a slot of its own)."""
    chunks = (batch_size + ITEMS_PER_CHUNK - 1) // ITEMS_PER_CHUNK
    label_order = chunks * (2 * feature_size + 1)
    batch_order = ((threads * ROWS_PER_TILE // 2 + batch_size // 2 + 2 * chunks) * feature_size + chunks
                   + tiles_of.py_func(batch_size))
    return max(label_order, batch_order)


@helper(inline="always")
def _int_vector(ints, index, batch_size):
    start = REPORT_SIZE + HISTOGRAM_SIZE + index * batch_size
    return ints[start:start + batch_size]


@helper(inline="always")
def _in_order(values):
    total = 0.0
    for value in values:  # in chunk order: the same total for any thread count
        total += value
    return total


@helper(inline="always")
def _step(batch, rule, ints, floats, layout, threads):
    """Add, per class j, the rows of class j into ``written[j]`` (see ``rows``); return
    ``sum_i ||d_i||^2`` (0 for the scatter). ``ints`` and ``floats`` are the scratch; the report
    at the start of ``ints`` says: the position of a bad label (or -1: then nothing was written),
    the float scratch this call needs (when ``floats`` is smaller, nothing was written), and the
    layout that ran (0: none). ``threads``: how many sets of local slots to keep, one for each
    thread a parallel loop may use.

    Its loops are ``prange`` loops: parallel in ``step_parallel``, compiled with
    ``parallel=True``, and plain loops in ``step_serial``, where ``prange`` is ``range``."""
    labels = batch.labels
    batch_size = labels.size
    width = batch.centers.shape[1]
    ints[BAD_POSITION] = -1
    ints[FLOATS_NEEDED] = 0
    ints[LAYOUT_RUN] = 0
    sorted_labels, positions = _int_vector(ints, 0, batch_size), _int_vector(ints, 1, batch_size)
    histogram = ints[REPORT_SIZE:REPORT_SIZE + HISTOGRAM_SIZE]
    bad = sort_by_label(labels, batch.centers.shape[0], sorted_labels, positions, _int_vector(ints, 2, batch_size),
                        _int_vector(ints, 3, batch_size), histogram)
    if bad >= 0:
        ints[BAD_POSITION] = bad
        return 0.0
    tiles = tiles_of(batch_size)
    row_action, class_size = _int_vector(ints, 4, batch_size), _int_vector(ints, 5, batch_size)
    item_codes, item_labels = _int_vector(ints, 6, batch_size), _int_vector(ints, 7, batch_size)
    local_slots_in_tile = _int_vector(ints, INT_VECTORS, batch_size)[:tiles]
    items, spanning_slots, rows_read_again, most_local = plan(sorted_labels, positions, row_action, class_size,
                                                               item_codes, item_labels, local_slots_in_tile)

    if layout == AUTO:
        # Pass B reads its rows again at random addresses, and its slots were written once and
        # are read once: when that comes near the rows the batch holds, one pass in label order
        # (which reads each row once, at a random address) costs less.
        slot_cost = spanning_slots * 2 * 8 // batch.rows.itemsize
        layout = LABEL_ORDER if 2 * (rows_read_again + slot_cost) > batch_size else BATCH_ORDER
    label_order = layout == LABEL_ORDER
    if label_order:
        items = batch_size  # every row is an item of the one pass
    chunks = (items + ITEMS_PER_CHUNK - 1) // ITEMS_PER_CHUNK
    if label_order:
        needed = chunks * (2 * width + 1)
    else:
        needed = (threads * most_local + spanning_slots + 2 * chunks) * width + chunks + tiles
    if needed > floats.size:
        ints[FLOATS_NEEDED] = needed
        return 0.0
    ints[LAYOUT_RUN] = layout

    partial_sums = floats[:chunks * 2 * width].reshape((chunks, 2, width))
    chunk_squares = floats[chunks * 2 * width:chunks * (2 * width + 1)]
    rest = floats[chunks * (2 * width + 1):]
    tile_total = 0.0
    if label_order:  # one pass in label order over every row, grad included
        item_codes, item_labels = positions, sorted_labels
        spanning_sums = rest[:0].reshape((0, width))
    else:  # pass A in batch order, then pass B over its items in label order, without the grad
        tile_squares = rest[:tiles]
        rest = rest[tiles:]
        thread_slots = rest[:threads * most_local * width].reshape((threads, most_local, width))
        rest = rest[threads * most_local * width:]
        spanning_sums = rest[:spanning_slots * width].reshape((spanning_slots, width))
        # One contiguous run of tiles per set of local slots (Numba's own static schedule),
        # rather than a slot set picked by thread id: a cached function that asks for the
        # thread id without being parallel crashes when loaded in a process whose threads have
        # not started.
        tiles_per_set = (tiles + threads - 1) // threads
        for slot_set in prange(threads):
            for tile in range(slot_set * tiles_per_set, min((slot_set + 1) * tiles_per_set, tiles)):
                tile_squares[tile] = batch_tile(np.int64(tile), batch, rule, row_action, class_size,
                                                thread_slots[slot_set], spanning_sums)
        tile_total = _in_order(tile_squares)
        item_codes, item_labels = item_codes[:items], item_labels[:items]

    if items * width < PARALLEL_ELEMENTS:  # too few to pay for waking the threads
        for chunk in range(chunks):
            chunk_squares[chunk] = label_chunk(np.int64(chunk), batch, rule, item_codes, item_labels,
                                               sorted_labels, spanning_sums, partial_sums, label_order)
    else:
        for chunk in prange(chunks):
            chunk_squares[chunk] = label_chunk(np.int64(chunk), batch, rule, item_codes, item_labels,
                                               sorted_labels, spanning_sums, partial_sums, label_order)
    finish_spanning_classes(item_labels, sorted_labels, partial_sums, batch.written, rule)
    return tile_total + _in_order(chunk_squares)  # one of the two is 0 (pass B adds no squares)


def _entry(labels, rows, centers, written, grad, rows_are_features, rule, ints, floats, layout, threads):
    return _step(Batch(labels, rows, centers, written, grad, rows_are_features), rule, ints, floats, layout, threads)


def _signature(dtype):
    """(labels, rows, centers, written, grad, rows_are_features, rule, ints, floats, layout,
    threads) -> float64. ``rule``: a ``RuleCoefficients``, taken whole. ``threads``: the most
    threads a parallel loop may use (one local-slot set each; an argument, since asking Numba
    inside would keep the cache from saving the entry)."""
    data = numba.from_dtype(dtype)
    matrix = types.Array(data, 2, "C")
    return types.float64(
        types.Array(types.int64, 1, "C", readonly=True), types.Array(data, 2, "C", readonly=True), matrix, matrix,
        matrix, types.boolean, RULE_TYPE, types.Array(types.int64, 1, "C"), types.Array(types.float64, 1, "C"),
        types.int64, types.int64,
    )


# How Numba types a RuleCoefficients of Python floats and a bool (what the driver passes).
RULE_TYPE = numba.typeof(SCATTER_SUB)

step_serial = Entry("step_serial", renamed(_entry, "step_serial"), _signature)
step_parallel = Entry("step_parallel", renamed(_entry, "step_parallel"), _signature, parallel=True)
