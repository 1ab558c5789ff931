"""The ``@cuda.jit`` kernels of the ``cuda`` backend, and nothing else.

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
  the center as it was; the tile holding its first sample puts it on a list, so that this kernel
  visits only such classes. In the default mode each tile adds its run sum into a float64
  per-class row with one atomic per column. With ``deterministic=True`` each tile stores its run
  sum in a float64 slot of its own, and the second kernel adds the slots in tile order (it finds
  them by binary search in each tile's sorted labels): no float atomics, the same bits on every
  run. Either way the second kernel zeroes what it read, so the buffer needs no clearing pass.

One step is four kernels, in stream order: ``classify`` (the label range check fused with the
per-class bookkeeping, reading the caller's labels in their own integer dtype), ``copy_rows``
(only when the update goes into a copy, which makes five), ``tile_step``,
``finish_spanning_classes`` (which also reduces the loss on the device, in a fixed order), and
``settle`` (which puts the bookkeeping back).

The label check never needs the host. ``classify`` records the first bad position in
``status``; every later kernel that writes reads ``status`` first and writes nothing of the
caller's when it is set (the backend's own fresh results become NaN); ``settle`` moves the bad position and value into ``pending``, host-mapped memory the host
reads whenever it chooses to (at once with ``sync=True``, or at the next call), and clears
``status`` for the next call.

The launch shape is a compile-time fact: the shared arrays are sized by ``TILE_ROWS`` and
``COLUMNS_PER_BLOCK``, and the driver launches with the same two numbers. The CUDA simulator's
tests shrink them through ``CENTERKERN_CUDA_TILE`` ("rows,columns") so that small inputs span
many tiles and column blocks; kernels built with a shrunk shape are never written to the disk
cache, where a later process with the default shape would find them.
"""

from __future__ import annotations

import os

import numpy as np
from numba import cuda, float64, int64


def _launch_shape() -> tuple[int, int, bool]:
    shrunk = os.environ.get("CENTERKERN_CUDA_TILE")
    if not shrunk:
        return 64, 128, False  # the fastest of the launch shapes swept on an H200 (benchmarks/results/gpu-*.json)
    rows, columns = (int(n) for n in shrunk.split(","))
    return rows, columns, True


TILE_ROWS, COLUMNS_PER_BLOCK, _SHRUNK = _launch_shape()
_CACHE = not _SHRUNK

NO_ROW = np.int64(2**62)  # "no sample of this class yet" and "no bad label"; any row index is smaller
STATUS_SIZE = 1  # status[0]: the call's first bad position (NO_ROW if none)
PENDING_SIZE = 4  # pending: first bad position, its label (as int64 bits), K, whether the label is negative


@cuda.jit(device=True)
def _bad(status) -> bool:
    return status[0] != NO_ROW


@cuda.jit(cache=_CACHE)
def classify(labels, num_classes, first_row, last_row, counts, status):
    """First kernel of a step: check every label (recording the first bad position) and note,
    per class, its first and last row and its count. Writes only the backend's own bookkeeping.

    A block takes a tile of ``TILE_ROWS`` rows (one thread per row, as the tile kernel cuts them)
    and compares each row with the tile's others in shared memory, so that only the first row of
    a class in the tile updates its first row and count, and only the last its last row: with
    one class holding most of the batch, three atomics per tile instead of three per sample."""
    tile_labels = cuda.shared.array(TILE_ROWS, int64)
    p = cuda.threadIdx.x
    tiles = (labels.size + TILE_ROWS - 1) // TILE_ROWS
    for tile in range(cuda.blockIdx.x, tiles, cuda.gridDim.x):
        tile_start = tile * TILE_ROWS
        tile_size = min(TILE_ROWS, labels.size - tile_start)
        cuda.syncthreads()  # the previous tile's labels are no longer read
        if p < tile_size:
            tile_labels[p] = int64(labels[tile_start + p])  # an unsigned label past 2**63 turns negative: bad
        cuda.syncthreads()
        if p < tile_size:
            label = tile_labels[p]
            if label < 0 or label >= num_classes:
                cuda.atomic.min(status, 0, tile_start + p)
            else:
                first_of_class, last_of_class, count = True, True, 0
                for q in range(tile_size):
                    if tile_labels[q] == label:
                        count += 1
                        first_of_class = first_of_class and q >= p
                        last_of_class = last_of_class and q <= p
                if first_of_class:
                    cuda.atomic.min(first_row, label, tile_start + p)
                    cuda.atomic.add(counts, label, count)
                if last_of_class:
                    cuda.atomic.max(last_row, label, tile_start + p)


@cuda.jit(cache=_CACHE)
def check_labels(labels, num_classes, status):
    """The range check alone, for the gather (which keeps no bookkeeping)."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, labels.size, stride):
        label = int64(labels[i])
        if label < 0 or label >= num_classes:
            cuda.atomic.min(status, 0, i)


@cuda.jit(cache=_CACHE)
def copy_rows(source, destination, status, destination_is_fresh):
    """``destination[...] = source``, unless a label of the call was bad: then a destination of the
    caller's is left alone, and a fresh one of the backend's is filled with NaN, so that no
    result of a failed call can be mistaken for a value. (Copies made before the call's check
    are given a status that is never set.)"""
    bad = _bad(status)
    if bad and not destination_is_fresh:
        return
    for row in range(cuda.blockIdx.x, source.shape[0], cuda.gridDim.x):
        for k in range(cuda.threadIdx.x, source.shape[1], cuda.blockDim.x):
            destination[row, k] = np.nan if bad else source[row, k]


@cuda.jit(cache=_CACHE)
def copy_vector(source, destination, status):
    """A copy into a fresh vector of the backend's own, before the call's check."""
    if _bad(status):
        return
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
def gather(centers, labels, out, status):
    """``out[i] = centers[labels[i]]``; ``out`` is the backend's own, filled with NaN on a bad label."""
    bad = _bad(status)
    for row in range(cuda.blockIdx.x, labels.size, cuda.gridDim.x):
        label = int64(labels[row])
        for k in range(cuda.threadIdx.x, centers.shape[1], cuda.blockDim.x):
            out[row, k] = np.nan if bad else centers[label, k]


@cuda.jit(cache=_CACHE)
def tile_step(
    rows, labels, centers, written, grad, first_row, last_row, counts, spanning_sums,
    spanning_leaders, spanning_count, tile_sorted_labels, tile_sorted_rows, block_squares, status,
    rows_are_features, deterministic, moves_centers, step, count_weight, grad_scale, grad_is_fresh,
    written_is_fresh,
):
    """Each block: tiles of the batch (grid-stride), one slice of columns (see the module docstring)."""
    if _bad(status):
        # nothing of the caller's is written on a bad batch; the backend's own fresh outputs
        # (the grad, grad_centers) become NaN, so that a caller that does not wait for the
        # verdict (sync=False) cannot train on uninitialised memory
        _fill_nan_if(grad_is_fresh and rows_are_features, grad)
        _fill_nan_if(written_is_fresh, written)
        return
    tile_labels = cuda.shared.array(TILE_ROWS, int64)
    order = cuda.shared.array(TILE_ROWS, int64)
    squares_by_thread = cuda.shared.array(COLUMNS_PER_BLOCK, float64)

    thread, threads = cuda.threadIdx.x, cuda.blockDim.x
    k = cuda.blockIdx.y * threads + thread
    squares = 0.0
    tiles = (labels.size + TILE_ROWS - 1) // TILE_ROWS
    for tile in range(cuda.blockIdx.x, tiles, cuda.gridDim.x):
        tile_start = tile * TILE_ROWS
        tile_size = min(TILE_ROWS, labels.size - tile_start)
        cuda.syncthreads()  # the previous tile's shared arrays are no longer read
        for p in range(thread, tile_size, threads):
            tile_labels[p] = int64(labels[tile_start + p])
        cuda.syncthreads()
        # rank sort by (label, row): stable, so a run adds its rows in batch order
        for p in range(thread, tile_size, threads):
            rank = 0
            for q in range(tile_size):
                if tile_labels[q] < tile_labels[p] or (tile_labels[q] == tile_labels[p] and q < p):
                    rank += 1
            order[rank] = p
        cuda.syncthreads()
        if cuda.blockIdx.y == 0:  # the deterministic finish searches these
            for position in range(thread, tile_size, threads):
                tile_sorted_labels[tile_start + position] = tile_labels[order[position]]
                tile_sorted_rows[tile_start + position] = tile_start + order[position]
        if k >= rows.shape[1]:
            continue
        total = 0.0
        center = 0.0
        run_first = 0
        for position in range(tile_size):
            p = order[position]
            label = tile_labels[p]
            if position == 0 or tile_labels[order[position - 1]] != label:  # a run starts
                total = 0.0
                run_first = tile_start + p
                center = float64(centers[label, k])  # read before any write: the pre-update center
            i = tile_start + p
            if rows_are_features:
                difference = float64(rows[i, k]) - center
                grad[i, k] = grad_scale * difference
                squares += difference * difference
            else:
                difference = float64(rows[i, k])
            total += difference
            if position == tile_size - 1 or tile_labels[order[position + 1]] != label:  # the run ends
                first = first_row[label]
                if first // TILE_ROWS == last_row[label] // TILE_ROWS:  # the class lies in this tile
                    # (the center term is chosen, not multiplied by 0: an infinite center must not
                    # turn grad_centers to NaN)
                    base = center if moves_centers else 0.0
                    written[label, k] = base + step / (1.0 + count_weight * counts[label]) * total
                else:
                    if deterministic:
                        spanning_sums[run_first, k] = total  # this tile's own slot
                    else:
                        cuda.atomic.add(spanning_sums, (first, k), total)
                    if first // TILE_ROWS == tile and cuda.blockIdx.y == 0 and thread == 0:
                        # list the class once, for the kernel that finishes it
                        spanning_leaders[cuda.atomic.add(spanning_count, 0, 1)] = first

    squares_by_thread[thread] = squares
    cuda.syncthreads()
    total = _block_sum(squares_by_thread, thread, threads)
    if thread == 0:
        block_squares[cuda.blockIdx.x * cuda.gridDim.y + cuda.blockIdx.y] = total


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
    labels, centers, written, last_row, counts, spanning_sums, spanning_leaders, spanning_count,
    tile_sorted_labels, tile_sorted_rows, block_squares, loss, status,
    rows_are_features, deterministic, moves_centers, step, count_weight, loss_scale,
):
    """Each block: classes that span tiles (grid-stride over the list the tile kernel made), one
    slice of columns. The sums it reads are zeroed again behind it, so that the buffer is all
    zeros at the start of every call without a pass to clear it. Block (0, 0) first reduces the
    tile kernel's block sums into the loss, in a fixed order."""
    partials = cuda.shared.array(COLUMNS_PER_BLOCK, float64)
    slots = cuda.shared.array(COLUMNS_PER_BLOCK, int64)
    thread, threads = cuda.threadIdx.x, cuda.blockDim.x
    bad = _bad(status)
    if rows_are_features and cuda.blockIdx.x == 0 and cuda.blockIdx.y == 0:
        partial = 0.0
        if not bad:
            for b in range(thread, block_squares.size, threads):  # each thread its own fixed stride
                partial += block_squares[b]
        partials[thread] = partial
        cuda.syncthreads()
        total = _block_sum(partials, thread, threads)
        if thread == 0:
            loss[0] = np.nan if bad else loss_scale * total
    if bad:
        return

    k = cuda.blockIdx.y * threads + thread
    for item in range(cuda.blockIdx.x, spanning_count[0], cuda.gridDim.x):
        row = spanning_leaders[item]
        label = int64(labels[row])
        first_tile = row // TILE_ROWS
        last_tile = last_row[label] // TILE_ROWS
        total = 0.0
        if deterministic:
            tile = first_tile
            while tile <= last_tile:
                # the block's threads look up as many tiles at once, then add them in tile order
                mine = tile + thread
                slot = -1
                if mine <= last_tile:
                    # binary search of that tile's sorted labels for the start of the class's run
                    low = mine * TILE_ROWS
                    tile_end = min(low + TILE_ROWS, labels.size)
                    high = tile_end
                    while low < high:
                        middle = (low + high) // 2
                        if tile_sorted_labels[middle] < label:
                            low = middle + 1
                        else:
                            high = middle
                    if low < tile_end and tile_sorted_labels[low] == label:
                        slot = tile_sorted_rows[low]
                slots[thread] = slot
                cuda.syncthreads()
                if k < centers.shape[1]:
                    for s in range(min(threads, last_tile - tile + 1)):
                        if slots[s] >= 0:
                            total += spanning_sums[slots[s], k]
                            spanning_sums[slots[s], k] = 0.0
                cuda.syncthreads()
                tile += threads
        elif k < centers.shape[1]:
            total = spanning_sums[row, k]
            spanning_sums[row, k] = 0.0
        if k < centers.shape[1]:
            base = float64(centers[label, k]) if moves_centers else 0.0
            written[label, k] = base + step / (1.0 + count_weight * counts[label]) * total


@cuda.jit(device=True)
def _settle_status(labels, num_classes, status, pending):
    """One thread: a bad label of this call goes to ``pending`` for the host (unless an earlier
    one the host has not collected yet is there), and ``status`` is cleared for the next call."""
    position = status[0]
    if position != NO_ROW:
        if pending[0] == NO_ROW:
            pending[1] = int64(labels[position])
            pending[2] = num_classes
            pending[3] = 1 if labels[position] < 0 else 0  # uint64 labels past 2**63 read negative as int64
            cuda.threadfence_system()  # the host, which reads pending[0] first, sees the rest with it
            pending[0] = position
        status[0] = NO_ROW


@cuda.jit(cache=_CACHE)
def settle(labels, num_classes, first_row, last_row, counts, spanning_count, status, pending):
    """Last kernel of a step: put back the bookkeeping of the batch's own (good) classes, so that
    no call passes over all K rows, and settle the label check."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    if start == 0:
        spanning_count[0] = 0
        _settle_status(labels, num_classes, status, pending)
    for i in range(start, labels.size, stride):
        label = int64(labels[i])
        if 0 <= label < num_classes:
            first_row[label] = NO_ROW
            last_row[label] = -1
            counts[label] = 0


@cuda.jit(cache=_CACHE)
def settle_gather(labels, num_classes, status, pending):
    if cuda.grid(1) == 0:
        _settle_status(labels, num_classes, status, pending)
