"""The ``@cuda.jit`` kernels of the ``cuda`` backend, and the constants and argument structure
they share with the driver.

The algorithm is the numba backend's, laid out for a GPU. The batch is cut into tiles of
``TILE_ROWS`` consecutive rows; a block takes one tile and ``COLUMNS_PER_BLOCK`` columns, one
thread per column, so every global load and store is coalesced along a row. Inside the block
the tile's rows are ordered by label (a rank sort of at most ``TILE_ROWS`` labels in shared
memory), and each thread walks that order adding a run of equal labels in a float64 register.
Aggregating per class before touching global memory is what keeps a hot label (one class
holding most of a batch) from serialising the GPU on atomics.

What a run's sum does next depends on the class:

* a class whose samples all lie in one tile is finished there: the thread read its center once,
  before the run, and writes the new value after it. Nobody else reads or writes that element.
  With many classes (the usual case) this is nearly every class, and the step moves no more
  bytes than it must.
* a class that spans tiles is finished by ``finish_spanning_classes``, once every tile has read
  the center as it was. The tile kernel gives it a slot of the call's ``spanning`` table, an
  open-addressed hash table of ``min(K, B // 2)`` slots (a spanning class has two samples or
  more), claimed with one compare-and-swap per run: every run of the class, in any block, gets
  the same slot, and no kernel of its own has to number the classes first. In the default mode
  each run adds its sum into its slot's row of float64 sums with one atomic per column (the
  run that claims the slot clears its row first: only rows in use are cleared). With
  ``deterministic=True`` each run stores its sum in a row of its own, the row of its first
  sample, and the finishing kernel adds them in tile order (it finds them by binary search in
  each tile's sorted labels): no float atomics, the same bits on every run.

Every call works in one temporary of its own (see ``driver``), carved into parts. Its first part
is a vector of int32 that starts at zero (one memset clears it): ``COUNTER_FIELDS`` entries of
call status, ``BOOK_ROWS`` rows of K entries of per-class bookkeeping, then the ``spanning``
table's keys (label + 1; 0: a free slot; ``CLAIMING`` while its row is cleared):

* ``FIRST``: B - the class's first row (0: no sample), by ``atomic.max``;
* ``LAST``: the class's last row + 1 (0: no sample), by ``atomic.max``;
* ``COUNT``: its number of samples.

The status holds ``BAD``, B - the first bad position (0: none). Zero meaning "nothing" is what
lets a memset prepare it all.

One step is three kernels, in stream order: ``classify`` (the label range check fused with the
bookkeeping, reading the caller's labels in their own integer dtype), ``tile_step`` and
``finish_spanning_classes`` (which also reduces the loss on the device, in a fixed order, and
reports the label check); and ``copy_rows`` before the tile kernel when the update goes into a
copy (``out=None``).

The label check never needs the host. ``classify`` records the first bad position; every later
kernel that writes reads it first and writes nothing of the caller's when it is set (the
backend's own fresh results become NaN). The last kernel writes the call's ``verdict`` (its own
temporary, read by the host after a ``sync=True`` call) and, for a ``sync=False`` call, posts a
bad label to the device's error record (see ``record``), host-mapped memory the host reads
whenever it chooses to.

The step's kernels take the call's choices as two named tuples, each built once per call and
passed whole: the rule's ``RuleCoefficients`` (``SCATTER_SUB`` for the scatter) and the call's
``StepSettings``. Numba flattens a tuple argument into its members, in order: a launch passes
them as scalar kernel parameters (see ``launcher.kernel_parameters``), nothing is copied to the
device.

The launch shape is a compile-time fact: the shared arrays are sized by ``TILE_ROWS`` and
``COLUMNS_PER_BLOCK``, and the driver launches with the same two numbers. The CUDA simulator's
tests shrink them through ``CENTERKERN_CUDA_TILE`` ("rows,columns") so that small inputs span
many tiles and column blocks; kernels built with a shrunk shape are never written to the disk
cache, where a later process with the default shape would find them.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from numba import cuda, float64, int32, int64


def _launch_shape() -> tuple[int, int, bool]:
    shrunk = os.environ.get("CENTERKERN_CUDA_TILE")
    if not shrunk:
        return 64, 128, False  # the fastest of the launch shapes swept on an H200 (benchmarks/results/gpu-*.json)
    rows, columns = (int(n) for n in shrunk.split(","))
    return rows, columns, True


TILE_ROWS, COLUMNS_PER_BLOCK, _SHRUNK = _launch_shape()
_CACHE = not _SHRUNK

NO_ROW = np.int64(2**62)  # "no bad label" in a verdict; any row index is smaller

# the call's status, at the start of its counters
BAD = 0
COUNTER_FIELDS = 1
# the rows of per-class bookkeeping after it, K entries each (the spanning table's keys follow)
FIRST, LAST, COUNT = 0, 1, 2
BOOK_ROWS = 3

VERDICT_SIZE = 4  # a call's verdict: first bad position (NO_ROW if none), its label (int64 bits), K, negative

# The device's error record (host-mapped, see ``record``): a ticket counter, then a ring of slots.
# Only the device writes it; the host only reads it.
WRITTEN = 0  # tickets taken by posting kernels
RECORD_HEADER = 1
RECORD_SLOTS = 16
SLOT_FIELDS = 5  # mark (ticket + 1 once complete, -(ticket + 1) while written), position, label, K, negative
RECORD_SIZE = RECORD_HEADER + RECORD_SLOTS * SLOT_FIELDS


class StepSettings(NamedTuple):
    """What a call chooses beside its rule, for ``tile_step`` and ``finish_spanning_classes``:
    built once per call by the driver, passed whole."""

    rows_are_features: bool  # a center-loss step (grad and loss from rows - centers); else the scatter of updates
    deterministic: bool  # the same bits on every run: no float atomics, spanning sums added in tile order
    grad_is_fresh: bool  # a step's grad is the backend's own array, filled with NaN on a bad label
    written_is_fresh: bool  # the rows go to a fresh array of the backend's other than the centers (grad_centers)
    posts_bad_label: bool  # the last kernel posts a bad label to the device's record: no one waits for the verdict


@cuda.jit(device=True, inline=True)
def _book(num_classes, row, label):
    return COUNTER_FIELDS + row * num_classes + label


@cuda.jit(device=True, inline=True)
def _bad(counters) -> bool:
    return counters[BAD] != 0


@cuda.jit(device=True)
def _post(record, position, value, num_classes, negative):
    """Post one bad call's verdict to the record, which the device writes and never reads back
    from the host: one atomic add on ``WRITTEN`` (the device's own counter) gives the verdict a
    ticket and its slot, ``ticket % RECORD_SLOTS``. The slot is written seqlock-style: its mark
    says "being written" first, then come the fields, then the mark says "complete", each step
    behind a system fence, so that the host, which re-reads the mark after the fields, never
    takes a half-written or overwritten verdict. A verdict whose slot is reused before the host
    looks (``RECORD_SLOTS`` newer bad calls) is counted as dropped by the host."""
    ticket = cuda.atomic.add(record, WRITTEN, 1)
    base = RECORD_HEADER + (ticket % RECORD_SLOTS) * SLOT_FIELDS
    record[base] = -(ticket + 1)
    cuda.threadfence_system()
    record[base + 1] = position
    record[base + 2] = value
    record[base + 3] = num_classes
    record[base + 4] = negative
    cuda.threadfence_system()  # the slot's fields reach the host before its mark
    record[base] = ticket + 1


@cuda.jit(device=True)
def _report(labels, num_classes, counters, verdict, record, post):
    """One thread, in the call's last kernel: write the call's verdict, and post a bad one to the
    device's record when the host will not read the verdict itself (``sync=False``)."""
    bad = counters[BAD]
    if bad == 0:
        verdict[0] = NO_ROW
        return
    position = labels.size - int64(bad)
    value = int64(labels[position])  # an unsigned label past 2**63 reads negative: told apart below
    negative = 1 if labels[position] < 0 else 0
    verdict[0], verdict[1], verdict[2], verdict[3] = position, value, num_classes, negative
    if post:
        _post(record, position, value, num_classes, negative)


@cuda.jit(device=True)
def _load_tile(labels, tile_start, tile_size, tile_labels):
    """Every thread of the block: the tile's labels into shared memory, as int64 (an unsigned
    label past 2**63 turns negative, which the range check calls bad), between two barriers:
    the previous tile's labels are no longer read, and this tile's are all there."""
    cuda.syncthreads()
    for p in range(cuda.threadIdx.x, tile_size, cuda.blockDim.x):
        tile_labels[p] = int64(labels[tile_start + p])
    cuda.syncthreads()


@cuda.jit(cache=_CACHE)
def classify(labels, num_classes, counters):
    """First kernel of a step: check every label (recording the first bad position) and note,
    per class, its first and last row and its count. Writes only the call's own counters.

    A block takes a tile of ``TILE_ROWS`` rows (one thread per row, as the tile kernel cuts them)
    and compares each row with the tile's others in shared memory, so that only the first row of
    a class in the tile updates its first row and count, and only the last its last row: with
    one class holding most of the batch, three atomics per tile instead of three per sample."""
    tile_labels = cuda.shared.array(TILE_ROWS, int64)
    p = cuda.threadIdx.x
    batch_size = labels.size
    tiles = (batch_size + TILE_ROWS - 1) // TILE_ROWS
    for tile in range(cuda.blockIdx.x, tiles, cuda.gridDim.x):
        tile_start = tile * TILE_ROWS
        tile_size = min(TILE_ROWS, batch_size - tile_start)
        _load_tile(labels, tile_start, tile_size, tile_labels)
        if p < tile_size:
            label = tile_labels[p]
            row = tile_start + p
            if label < 0 or label >= num_classes:
                cuda.atomic.max(counters, BAD, int32(batch_size - row))  # the first bad row wins
            else:
                first_of_class, last_of_class, count = True, True, 0
                for q in range(tile_size):
                    if tile_labels[q] == label:
                        count += 1
                        first_of_class = first_of_class and q >= p
                        last_of_class = last_of_class and q <= p
                if first_of_class:
                    cuda.atomic.max(counters, _book(num_classes, FIRST, label), int32(batch_size - row))
                    cuda.atomic.add(counters, _book(num_classes, COUNT, label), int32(count))
                if last_of_class:
                    cuda.atomic.max(counters, _book(num_classes, LAST, label), int32(row + 1))


@cuda.jit(device=True, inline=True)
def _first_row(counters, num_classes, batch_size, label):
    return batch_size - int64(counters[_book(num_classes, FIRST, label)])


@cuda.jit(device=True, inline=True)
def _last_row(counters, num_classes, label):
    return int64(counters[_book(num_classes, LAST, label)]) - 1


CLAIMING = -1  # a slot of the spanning table whose row its claimant is still clearing


@cuda.jit(device=True)
def _claim(keys, label, num_classes, sums, clear_row):
    """The slot of ``label`` in the spanning table ``keys``, claimed by whichever run of the class
    comes first: a compare-and-swap from 0 (free) to ``CLAIMING``; the claimant clears the slot's
    row of ``sums`` (``clear_row``: the default mode, whose runs add into it) and then publishes
    label + 1. A run that finds the slot being claimed waits for the key (its claimant is
    running, and waits for nothing), then takes the slot if the key is its class's, else probes
    on, past slots of other classes. The table has a slot for every class that can span
    (``keys.size`` is at least their number), so a probe always ends. With K slots or more the
    label is its own slot."""
    capacity = keys.size
    if num_classes <= capacity:
        slot = label
    else:
        slot = (label * 2654435761) % capacity  # Knuth's multiplicative hash: spreads runs of labels
    key = int32(label + 1)
    while True:
        seen = cuda.atomic.cas(keys, slot, int32(0), int32(CLAIMING))
        if seen == 0:  # ours: its row cleared before any run can add into it
            if clear_row:
                for k in range(sums.shape[1]):
                    sums[slot, k] = 0.0
            cuda.threadfence()
            cuda.atomic.exch(keys, slot, key)
            return slot
        while seen == CLAIMING:
            seen = cuda.atomic.add(keys, slot, int32(0))  # an atomic read: the claimant's key, once published
        if seen == key:
            cuda.threadfence()  # the claimant's cleared row is seen before this run adds into it
            return slot
        slot += 1
        if slot == capacity:
            slot = 0


@cuda.jit(cache=_CACHE)
def check_labels(labels, num_classes, counters):
    """The range check alone, for the gather (which keeps no bookkeeping)."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, labels.size, stride):
        label = int64(labels[i])
        if label < 0 or label >= num_classes:
            cuda.atomic.max(counters, BAD, int32(labels.size - i))


@cuda.jit(cache=_CACHE)
def copy_rows(source, destination, counters, destination_is_fresh):
    """``destination[...] = source``, unless a label of the call was bad: then a destination of the
    caller's is left alone, and a fresh one of the backend's is filled with NaN, so that no
    result of a failed call can be mistaken for a value."""
    bad = _bad(counters)
    if bad and not destination_is_fresh:
        return
    for row in range(cuda.blockIdx.x, source.shape[0], cuda.gridDim.x):
        for k in range(cuda.threadIdx.x, source.shape[1], cuda.blockDim.x):
            destination[row, k] = np.nan if bad else source[row, k]


@cuda.jit(cache=_CACHE)
def copy_matrix(source, destination):
    """A copy into a fresh matrix of the backend's own, made before the call's label check."""
    for row in range(cuda.blockIdx.x, source.shape[0], cuda.gridDim.x):
        for k in range(cuda.threadIdx.x, source.shape[1], cuda.blockDim.x):
            destination[row, k] = source[row, k]


@cuda.jit(cache=_CACHE)
def copy_vector(source, destination):
    """A copy into a fresh vector of the backend's own, made before the call's label check."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, source.size, stride):
        destination[i] = source[i]


@cuda.jit(cache=_CACHE)
def fill_rows(destination, value):
    """Fill a matrix of the backend's own (no caller data is written by this kernel)."""
    for row in range(cuda.blockIdx.x, destination.shape[0], cuda.gridDim.x):
        for k in range(cuda.threadIdx.x, destination.shape[1], cuda.blockDim.x):
            destination[row, k] = value


@cuda.jit(cache=_CACHE)
def fill_vector(destination, value):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, destination.size, stride):
        destination[i] = value


@cuda.jit(cache=_CACHE)
def gather(centers, labels, out, counters, verdict, record, post):
    """``out[i] = centers[labels[i]]``; ``out`` is the backend's own, filled with NaN on a bad label.
    Thread 0 of block 0 reports the label check."""
    bad = _bad(counters)
    if cuda.blockIdx.x == 0 and cuda.threadIdx.x == 0:
        _report(labels, centers.shape[0], counters, verdict, record, post)
    for row in range(cuda.blockIdx.x, labels.size, cuda.gridDim.x):
        label = int64(labels[row])
        for k in range(cuda.threadIdx.x, centers.shape[1], cuda.blockDim.x):
            out[row, k] = np.nan if bad else centers[label, k]


@cuda.jit(cache=_CACHE)
def tile_step(
    rows, labels, centers, written, grad, counters, keys, spanning_sums, tile_sorted_labels, tile_sorted_rows,
    block_squares, rule, settings,
):
    """Each block: tiles of the batch (grid-stride), one slice of columns (see the module docstring).
    ``rule`` is the call's ``RuleCoefficients``, ``settings`` its ``StepSettings``."""
    if _bad(counters):
        # nothing of the caller's is written on a bad batch; the backend's own fresh outputs
        # (the grad, grad_centers) become NaN, so that a caller that does not wait for the
        # verdict (sync=False) cannot train on uninitialised memory
        _fill_nan_if(settings.grad_is_fresh, grad)
        _fill_nan_if(settings.written_is_fresh, written)
        return
    tile_labels = cuda.shared.array(TILE_ROWS, int64)
    order = cuda.shared.array(TILE_ROWS, int64)
    run_slot = cuda.shared.array(TILE_ROWS, int64)  # by sorted position of a run's start: its spanning slot
    squares_by_thread = cuda.shared.array(COLUMNS_PER_BLOCK, float64)

    num_classes = centers.shape[0]
    batch_size = labels.size
    thread, threads = cuda.threadIdx.x, cuda.blockDim.x
    k = cuda.blockIdx.y * threads + thread
    squares = 0.0
    tiles = (batch_size + TILE_ROWS - 1) // TILE_ROWS
    for tile in range(cuda.blockIdx.x, tiles, cuda.gridDim.x):
        tile_start = tile * TILE_ROWS
        tile_size = min(TILE_ROWS, batch_size - tile_start)
        _load_tile(labels, tile_start, tile_size, tile_labels)  # (order, too, is no longer read by then)
        # rank sort by (label, row): stable, so a run adds its rows in batch order
        for p in range(thread, tile_size, threads):
            rank = 0
            for q in range(tile_size):
                if tile_labels[q] < tile_labels[p] or (tile_labels[q] == tile_labels[p] and q < p):
                    rank += 1
            order[rank] = p
        cuda.syncthreads()
        for position in range(thread, tile_size, threads):
            label = tile_labels[order[position]]
            if position == 0 or tile_labels[order[position - 1]] != label:  # a run starts here
                first = _first_row(counters, num_classes, batch_size, label)
                if first // TILE_ROWS != _last_row(counters, num_classes, label) // TILE_ROWS:  # its class spans
                    run_slot[position] = _claim(keys, label, num_classes, spanning_sums, not settings.deterministic)
            if settings.deterministic and cuda.blockIdx.y == 0:  # the deterministic finish searches these
                tile_sorted_labels[tile_start + position] = label
                tile_sorted_rows[tile_start + position] = tile_start + order[position]
        cuda.syncthreads()
        if k >= rows.shape[1]:
            continue
        total = 0.0
        center = 0.0
        run_first = 0
        slot = 0
        for position in range(tile_size):
            p = order[position]
            label = tile_labels[p]
            if position == 0 or tile_labels[order[position - 1]] != label:  # a run starts
                total = 0.0
                run_first = tile_start + p
                slot = run_slot[position]  # read only where the class spans, which is where it was set
                center = float64(centers[label, k])  # read before any write: the pre-update center
            i = tile_start + p
            if settings.rows_are_features:
                difference = float64(rows[i, k]) - center
                grad[i, k] = rule.grad_scale * difference
                squares += difference * difference
            else:
                difference = float64(rows[i, k])
            total += difference
            if position == tile_size - 1 or tile_labels[order[position + 1]] != label:  # the run ends
                first = _first_row(counters, num_classes, batch_size, label)
                if first // TILE_ROWS == _last_row(counters, num_classes, label) // TILE_ROWS:  # in this tile
                    base = center if rule.moves_centers else 0.0
                    written[label, k] = _written_value(rule, base, counters, num_classes, label, total)
                elif settings.deterministic:
                    spanning_sums[run_first, k] = total  # this run's own row, the row of its first sample
                else:
                    cuda.atomic.add(spanning_sums, (slot, k), total)

    squares_by_thread[thread] = squares
    cuda.syncthreads()
    total = _block_sum(squares_by_thread, thread, threads)
    if thread == 0:
        block_squares[cuda.blockIdx.x * cuda.gridDim.y + cuda.blockIdx.y] = total


@cuda.jit(device=True, inline=True)
def _written_value(rule, base, counters, num_classes, label, total):
    """A class's new row entry from its sum ``total`` (see ``RuleCoefficients``). ``base`` is its
    center where the rule moves the centers, else 0: the center term is chosen, not multiplied
    by 0, so that an infinite center does not turn grad_centers to NaN."""
    count = counters[_book(num_classes, COUNT, label)]
    return base + rule.step / (1.0 + rule.count_weight * count) * total


@cuda.jit(device=True)
def _fill_nan_if(condition, matrix):
    if condition:
        for row in range(cuda.blockIdx.x, matrix.shape[0], cuda.gridDim.x):
            for k in range(cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x, matrix.shape[1],
                           cuda.gridDim.y * cuda.blockDim.x):
                matrix[row, k] = np.nan


@cuda.jit(device=True)
def _block_sum(values, thread, threads):
    """The sum of ``values[:threads]`` in a fixed tree: the same bits on every run. Every thread
    of the block must call it; thread 0's return value is the sum."""
    width = 1
    while width < threads:
        if thread % (2 * width) == 0 and thread + width < threads:
            values[thread] += values[thread + width]
        cuda.syncthreads()
        width *= 2
    return values[0]


@cuda.jit(cache=_CACHE)
def finish_spanning_classes(
    labels, centers, written, counters, keys, spanning_sums, tile_sorted_labels, tile_sorted_rows, block_squares,
    loss, verdict, record, rule, settings,
):
    """Each block: classes that span tiles (grid-stride over the slots of the spanning table the
    tile kernel filled), one slice of columns. Block (0, 0) first reduces the tile kernel's block sums into the loss,
    in a fixed order, and reports the label check. ``rule`` is the call's ``RuleCoefficients``,
    ``settings`` its ``StepSettings``."""
    partials = cuda.shared.array(COLUMNS_PER_BLOCK, float64)
    run_rows = cuda.shared.array(COLUMNS_PER_BLOCK, int64)
    thread, threads = cuda.threadIdx.x, cuda.blockDim.x
    num_classes = centers.shape[0]
    bad = _bad(counters)
    if cuda.blockIdx.x == 0 and cuda.blockIdx.y == 0:
        if thread == 0:
            _report(labels, num_classes, counters, verdict, record, settings.posts_bad_label)
        if settings.rows_are_features:
            partial = 0.0
            if not bad:
                for b in range(thread, block_squares.size, threads):  # each thread its own fixed stride
                    partial += block_squares[b]
            partials[thread] = partial
            cuda.syncthreads()
            total = _block_sum(partials, thread, threads)
            if thread == 0:
                loss[0] = np.nan if bad else rule.loss_scale * total
    if bad:
        return

    k = cuda.blockIdx.y * threads + thread
    batch_size = labels.size
    for slot in range(cuda.blockIdx.x, keys.size, cuda.gridDim.x):
        if keys[slot] == 0:
            continue  # a free slot (the same for every thread of the block)
        label = int64(keys[slot]) - 1
        first_tile = _first_row(counters, num_classes, batch_size, label) // TILE_ROWS
        last_tile = _last_row(counters, num_classes, label) // TILE_ROWS
        total = 0.0
        if settings.deterministic:
            tile = first_tile
            while tile <= last_tile:
                # the block's threads look up as many tiles at once, then add them in tile order
                mine = tile + thread
                run_row = -1
                if mine <= last_tile:
                    # binary search of that tile's sorted labels for the start of the class's run
                    low = mine * TILE_ROWS
                    tile_end = min(low + TILE_ROWS, batch_size)
                    high = tile_end
                    while low < high:
                        middle = (low + high) // 2
                        if tile_sorted_labels[middle] < label:
                            low = middle + 1
                        else:
                            high = middle
                    if low < tile_end and tile_sorted_labels[low] == label:
                        run_row = tile_sorted_rows[low]  # the run's first sample, whose row holds its sum
                run_rows[thread] = run_row
                cuda.syncthreads()
                if k < centers.shape[1]:
                    for s in range(min(threads, last_tile - tile + 1)):
                        if run_rows[s] >= 0:
                            total += spanning_sums[run_rows[s], k]
                cuda.syncthreads()
                tile += threads
        elif k < centers.shape[1]:
            total = spanning_sums[slot, k]  # every run of the class added into its slot's row
        if k < centers.shape[1]:
            base = float64(centers[label, k]) if rule.moves_centers else 0.0
            written[label, k] = _written_value(rule, base, counters, num_classes, label, total)
