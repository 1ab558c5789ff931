"""The ``cuda`` backend: ``@cuda.jit`` kernels for the gather, the scatter and the fused step.

The algorithm is the numba backend's, laid out for a GPU. The batch is cut into tiles of
``TILE_ROWS`` consecutive rows; a block takes one tile and ``COLUMNS_PER_BLOCK`` columns, one
thread per column, so every global load and store is coalesced along a row. Inside the block
the tile's rows are ordered by label (a rank sort of at most 64 labels in shared memory), and
each thread walks that order adding a run of equal labels in a float64 register. Aggregating
per class before touching global memory is what keeps a hot label (one class holding most of a
batch) from serialising the GPU on atomics.

What a run's sum does next depends on the class:

* a class whose samples all lie in one tile is finished there: the thread read its center once,
  before the run, and writes the new value after it. Nobody else reads or writes that element.
  With many classes (the usual case) this is nearly every class, and the step moves no more
  bytes than it must.
* a class that spans tiles is finished by a second kernel, once every tile has read the center
  as it was; the tile holding its first sample puts it on a list, so that this kernel visits
  only such classes. In the default mode each tile adds its run sum into a per-class row with
  one float atomic per column. With ``deterministic=True`` each tile stores its run sum in a
  slot of its own, and the second kernel adds the slots in tile order (it finds them by binary
  search in each tile's sorted labels): no float atomics, the same bits on every run. Either
  way the second kernel zeroes what it read, so the buffer needs no clearing pass.

Per-class bookkeeping (first and last row of each class, its count) lives in K-sized integer
scratch arrays that are set once and put back by a last kernel touching only the batch's labels,
so that no call passes over all K rows. The loss is reduced per block in a fixed tree and the
block sums are added on the host in float64, in block order.

Device arrays (``__cuda_array_interface__``: numba, CuPy, torch) are used in place, without a
copy; NumPy inputs are copied to the device and the results copied back.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import numpy as np
from numba import cuda, float64, int64

from ._rules import RuleCoefficients
from ._validation import BackendUnavailableError, HostArrays, is_device_array

# Launch shape. Module attributes, read at every call, so tests can shrink them to make small
# inputs span many tiles and blocks (the kernels take them as arguments; shared arrays are sized
# by the MAX_ constants).
TILE_ROWS = 64  # the fastest of the launch shapes swept on an H200 (benchmarks/results/gpu-*.json)
COLUMNS_PER_BLOCK = 128
MAX_TILE_ROWS = 64
MAX_COLUMNS_PER_BLOCK = 128
GRID_STRIDE_BLOCKS = 1024  # blocks for the 1-D grid-stride kernels over the batch
THREADS_1D = 256
ROW_BLOCKS = 8192  # most blocks along the rows (or tiles) of the 2-D grid-stride kernels

NO_ROW = np.int64(2**62)  # "no sample of this class yet"; any row index is smaller


def is_available() -> bool:
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver installation reads as "not available", said by require_available
        return False


def require_available() -> None:
    if not is_available():
        simulator = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
        raise BackendUnavailableError(
            "backend 'cuda' needs a CUDA GPU and its driver, and Numba found none"
            + ("" if simulator else " (without a GPU, NUMBA_ENABLE_CUDASIM=1 runs Numba's CUDA simulator)")
        )


# --------------------------------------------------------------------------- kernels


@cuda.jit(cache=True)
def _find_first_bad_label(labels, num_classes, first_bad):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, labels.size, stride):
        label = labels[i]
        if label < 0 or label >= num_classes:
            cuda.atomic.min(first_bad, 0, i)


@cuda.jit(cache=True)
def _copy_labels(labels, out):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, labels.size, stride):
        out[i] = labels[i]


@cuda.jit(cache=True)
def _copy_matrix(source, destination):
    for row in range(cuda.blockIdx.x, source.shape[0], cuda.gridDim.x):
        for k in range(cuda.threadIdx.x, source.shape[1], cuda.blockDim.x):
            destination[row, k] = source[row, k]


@cuda.jit(cache=True)
def _fill_matrix(destination, value):
    for row in range(cuda.blockIdx.x, destination.shape[0], cuda.gridDim.x):
        for k in range(cuda.threadIdx.x, destination.shape[1], cuda.blockDim.x):
            destination[row, k] = value


@cuda.jit(cache=True)
def _fill_vector(destination, value):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, destination.size, stride):
        destination[i] = value


@cuda.jit(cache=True)
def _gather(centers, labels, out):
    for row in range(cuda.blockIdx.x, labels.size, cuda.gridDim.x):
        label = labels[row]
        for k in range(cuda.threadIdx.x, centers.shape[1], cuda.blockDim.x):
            out[row, k] = centers[label, k]


@cuda.jit(cache=True)
def _classify(labels, first_row, last_row, counts):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, labels.size, stride):
        label = labels[i]
        cuda.atomic.min(first_row, label, i)
        cuda.atomic.max(last_row, label, i)
        cuda.atomic.add(counts, label, 1)


@cuda.jit(cache=True)
def _reset_classes(labels, first_row, last_row, counts, spanning_count):
    # only the batch's own classes were touched: put them back for the next call
    start, stride = cuda.grid(1), cuda.gridsize(1)
    if start == 0:
        spanning_count[0] = 0
    for i in range(start, labels.size, stride):
        label = labels[i]
        first_row[label] = NO_ROW
        last_row[label] = -1
        counts[label] = 0


@cuda.jit(cache=True)
def _tile_step(
    rows, labels, centers, written, grad, first_row, last_row, counts, spanning_sums,
    spanning_leaders, spanning_count, tile_sorted_labels, tile_sorted_rows, block_squares,
    rows_are_features, deterministic, moves_centers, step, count_weight, grad_scale, tile_rows,
):
    """Each block: tiles of the batch (grid-stride), one slice of columns (see the module docstring)."""
    tile_labels = cuda.shared.array(MAX_TILE_ROWS, int64)
    order = cuda.shared.array(MAX_TILE_ROWS, int64)
    squares_by_thread = cuda.shared.array(MAX_COLUMNS_PER_BLOCK, float64)

    thread, threads = cuda.threadIdx.x, cuda.blockDim.x
    k = cuda.blockIdx.y * threads + thread
    squares = 0.0
    tiles = (labels.size + tile_rows - 1) // tile_rows
    for tile in range(cuda.blockIdx.x, tiles, cuda.gridDim.x):
        tile_start = tile * tile_rows
        tile_size = min(tile_rows, labels.size - tile_start)
        cuda.syncthreads()  # the previous tile's shared arrays are no longer read
        for p in range(thread, tile_size, threads):
            tile_labels[p] = labels[tile_start + p]
        cuda.syncthreads()
        # rank sort by (label, row): stable, so a run adds its rows in batch order
        for p in range(thread, tile_size, threads):
            rank = 0
            for q in range(tile_size):
                if tile_labels[q] < tile_labels[p] or (tile_labels[q] == tile_labels[p] and q < p):
                    rank += 1
            order[rank] = p
        cuda.syncthreads()
        if cuda.blockIdx.y == 0:  # the combine kernel of deterministic mode searches these
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
                if first // tile_rows == last_row[label] // tile_rows:  # the class lies in this tile
                    # (the center term is chosen, not multiplied by 0: an infinite center must not
                    # turn grad_centers to NaN)
                    base = center if moves_centers else 0.0
                    written[label, k] = base + step / (1.0 + count_weight * counts[label]) * total
                else:
                    if deterministic:
                        spanning_sums[run_first, k] = total  # this tile's own slot
                    else:
                        cuda.atomic.add(spanning_sums, (first, k), total)
                    if first // tile_rows == tile and cuda.blockIdx.y == 0 and thread == 0:
                        # list the class once, for the kernel that finishes it
                        spanning_leaders[cuda.atomic.add(spanning_count, 0, 1)] = first

    squares_by_thread[thread] = squares
    cuda.syncthreads()
    width = 1
    while width < threads:  # fixed tree: the same sum on every run
        if thread % (2 * width) == 0 and thread + width < threads:
            squares_by_thread[thread] += squares_by_thread[thread + width]
        cuda.syncthreads()
        width *= 2
    if thread == 0:
        block_squares[cuda.blockIdx.x * cuda.gridDim.y + cuda.blockIdx.y] = squares_by_thread[0]


@cuda.jit(cache=True)
def _finish_spanning_classes(
    labels, centers, written, first_row, last_row, counts, spanning_sums, spanning_leaders, spanning_count,
    tile_sorted_labels, tile_sorted_rows,
    deterministic, moves_centers, step, count_weight, tile_rows,
):
    """Each block: classes that span tiles (grid-stride over the list the tile kernel made),
    one slice of columns. The sums it reads are zeroed again behind it, so that the buffer is
    all zeros at the start of every call without a pass to clear it."""
    slots = cuda.shared.array(MAX_COLUMNS_PER_BLOCK, int64)
    thread, threads = cuda.threadIdx.x, cuda.blockDim.x
    k = cuda.blockIdx.y * threads + thread
    for item in range(cuda.blockIdx.x, spanning_count[0], cuda.gridDim.x):
        row = spanning_leaders[item]
        label = labels[row]
        first_tile = row // tile_rows
        last_tile = last_row[label] // tile_rows
        total = 0.0
        if deterministic:
            tile = first_tile
            while tile <= last_tile:
                # the block's threads look up as many tiles at once, then add them in tile order
                mine = tile + thread
                slot = -1
                if mine <= last_tile:
                    # binary search of that tile's sorted labels for the start of the class's run
                    low = mine * tile_rows
                    tile_end = min(low + tile_rows, labels.size)
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
                            total += float64(spanning_sums[slots[s], k])
                            spanning_sums[slots[s], k] = 0
                cuda.syncthreads()
                tile += threads
        elif k < centers.shape[1]:
            total = float64(spanning_sums[row, k])
            spanning_sums[row, k] = 0
        if k < centers.shape[1]:
            base = float64(centers[label, k]) if moves_centers else 0.0
            written[label, k] = base + step / (1.0 + count_weight * counts[label]) * total


# --------------------------------------------------------------------------- arrays


def _interface(array: Any) -> dict:
    """The array's CUDA Array Interface. The simulator's device arrays are NumPy arrays in
    disguise and offer NumPy's array interface instead, which has the same keys."""
    if hasattr(array, "__cuda_array_interface__"):
        return array.__cuda_array_interface__
    return array.__array_interface__


def _interface_extent(array: Any) -> tuple[int, int]:
    """[start, end) of the bytes a device array may touch."""
    interface = _interface(array)
    pointer = interface["data"][0]
    itemsize = np.dtype(interface["typestr"]).itemsize
    shape = interface["shape"]
    if any(n == 0 for n in shape):
        return pointer, pointer
    strides = interface.get("strides") or _contiguous_strides(shape, itemsize)
    low = sum(s * (n - 1) for s, n in zip(strides, shape) if s < 0)
    high = sum(s * (n - 1) for s, n in zip(strides, shape) if s > 0)
    return pointer + low, pointer + high + itemsize


def _contiguous_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _grid_1d(size: int) -> int:
    return max(1, min(GRID_STRIDE_BLOCKS, math.ceil(size / THREADS_1D)))


def _row_threads(width: int) -> int:
    return max(1, min(COLUMNS_PER_BLOCK, MAX_COLUMNS_PER_BLOCK, width))


def _row_blocks(rows: int) -> int:
    return max(1, min(ROW_BLOCKS, rows))


class DeviceArrays:
    """Conversion and inspection of device arrays, the twin of ``_validation.HostArrays``."""

    name = "device"

    @staticmethod
    def asarray(x: Any, what: str) -> Any:
        if getattr(x, "__cuda_ndarray__", False):
            return x  # already a Numba device array
        if hasattr(x, "__cuda_array_interface__"):
            return cuda.as_cuda_array(x)  # zero-copy view of the caller's device memory (CuPy, torch)
        return cuda.to_device(np.ascontiguousarray(HostArrays.asarray(x, what)))

    @staticmethod
    def holds(x: Any) -> bool:
        return is_device_array(x)

    @staticmethod
    def flat_labels(labels: Any) -> Any:
        if labels.ndim == 1:
            return labels
        if labels.is_c_contiguous():
            return labels.reshape(labels.size)
        return cuda.to_device(np.ascontiguousarray(labels.copy_to_host()).reshape(-1))  # rare: strided N-D labels

    @staticmethod
    def first_out_of_range(labels: Any, num_classes: int) -> tuple[int, int] | None:
        if labels.size == 0:
            return None
        first_bad = _scratch.buffer("first bad label", (1,), np.int64)
        first_bad.copy_to_device(np.array([labels.size], dtype=np.int64))
        _find_first_bad_label[_grid_1d(labels.size), THREADS_1D](labels, num_classes, first_bad)
        position = int(first_bad.copy_to_host()[0])  # one integer crosses to the host, not the labels
        if position == labels.size:
            return None
        return position, int(labels[position : position + 1].copy_to_host()[0])

    @staticmethod
    def as_label_vector(labels: Any) -> Any:
        if labels.dtype == np.int64 and labels.is_c_contiguous():
            return labels  # already what the kernels read: no copy, no launch
        out = cuda.device_array(labels.size, dtype=np.int64)
        if labels.size:
            _copy_labels[_grid_1d(labels.size), THREADS_1D](labels, out)
        return out

    @staticmethod
    def contiguous(x: Any) -> Any:
        return x  # the kernels index with strides; copying would cost more than it saves

    @staticmethod
    def is_writable(x: Any) -> bool:
        return not _interface(x)["data"][1]

    @staticmethod
    def same_memory(a: Any, b: Any) -> bool:
        ia, ib = _interface(a), _interface(b)
        return (ia["data"][0] == ib["data"][0] and tuple(ia["shape"]) == tuple(ib["shape"])
                and (ia.get("strides") or _contiguous_strides(ia["shape"], a.dtype.itemsize))
                == (ib.get("strides") or _contiguous_strides(ib["shape"], b.dtype.itemsize)))

    @staticmethod
    def may_share_memory(a: Any, b: Any) -> bool:
        start_a, end_a = _interface_extent(a)
        start_b, end_b = _interface_extent(b)
        return start_a < end_b and start_b < end_a

    @staticmethod
    def copy(x: Any) -> Any:
        out = cuda.device_array(x.shape, dtype=x.dtype)
        DeviceArrays.copy_into(out, x)
        return out

    @staticmethod
    def copy_into(destination: Any, source: Any) -> None:
        if source.ndim == 1:
            if source.size:
                _copy_labels[_grid_1d(source.size), THREADS_1D](source, destination)
        elif source.shape[0] and source.shape[1]:
            _copy_matrix[_row_blocks(source.shape[0]), _row_threads(source.shape[1])](source, destination)

    @staticmethod
    def empty(shape: tuple[int, ...], dtype) -> Any:
        return cuda.device_array(shape, dtype=dtype)

    @staticmethod
    def zeros(shape: tuple[int, int], dtype) -> Any:
        out = cuda.device_array(shape, dtype=dtype)
        if shape[0] and shape[1]:
            _fill_matrix[_row_blocks(shape[0]), _row_threads(shape[1])](out, 0)
        return out


# --------------------------------------------------------------------------- driver


class _Scratch(threading.local):
    """Work arrays kept between calls (one set per thread): the K-sized per-class bookkeeping,
    so that a call neither allocates nor clears anything of size K, and the batch-sized buffers,
    so that a call does not pay for device allocations."""

    def __init__(self):
        self.capacity = 0
        self.first_row = self.last_row = self.counts = None
        self.buffers = {}
        self.views = {}

    def buffer(self, name: str, shape: tuple[int, ...], dtype, zeroed: bool = False) -> Any:
        """A device array of ``shape`` and ``dtype``, reused across calls. Its contents are
        undefined, or all zeros when ``zeroed`` (a promise the kernels keep by zeroing what
        they used: the buffer is cleared once, when it is allocated)."""
        size = math.prod(shape)
        dtype = np.dtype(dtype)
        view = self.views.get((name, shape, dtype))
        if view is not None:  # slicing a device array costs hundreds of Python calls: reuse the view
            return view
        held = self.buffers.get((name, dtype))
        if held is None or held.size < size:
            held = cuda.device_array(max(size, 2 * (0 if held is None else held.size)), dtype=dtype)
            if zeroed:
                _fill_vector[_grid_1d(held.size), THREADS_1D](held, 0)
            self.buffers[(name, dtype)] = held
            self.views = {key: value for key, value in self.views.items() if key[0] != name}
        view = held[:size].reshape(shape)
        if len(self.views) > 64:  # batch shapes that keep changing: keep the cache small
            self.views.clear()
        self.views[(name, shape, dtype)] = view
        return view

    def classes(self, num_classes: int):
        if num_classes > self.capacity:
            capacity = max(num_classes, 2 * self.capacity)
            self.first_row = cuda.device_array(capacity, dtype=np.int64)
            self.last_row = cuda.device_array(capacity, dtype=np.int64)
            self.counts = cuda.device_array(capacity, dtype=np.int64)
            self._fill(capacity)
            self.capacity = capacity
        return self.first_row, self.last_row, self.counts

    def _fill(self, size):
        blocks = _grid_1d(size)
        _fill_vector[blocks, THREADS_1D](self.first_row, NO_ROW)
        _fill_vector[blocks, THREADS_1D](self.last_row, -1)
        _fill_vector[blocks, THREADS_1D](self.counts, 0)

    def discard(self):
        """After a failure midway the bookkeeping may be dirty: start afresh next time."""
        self.capacity = 0
        self.buffers = {}
        self.views = {}


_scratch = _Scratch()


class _OnDevice:
    """Device views of the arguments; NumPy arguments are copied in, and written ones back."""

    def __init__(self):
        self._write_back = []

    def __call__(self, array, written=False):
        if is_device_array(array):
            return array
        device = cuda.to_device(np.ascontiguousarray(array))
        if written:
            self._write_back.append((device, array))
        return device

    def finish(self):
        for device, host in self._write_back:
            host[...] = device.copy_to_host()


def _segmented_update(rows, labels, centers, written, grad, rows_are_features, rule_step, count_weight,
                      grad_scale, moves_centers, deterministic) -> float:
    batch_size, width = rows.shape
    if batch_size == 0 or width == 0:
        return 0.0
    tile_rows = min(TILE_ROWS, MAX_TILE_ROWS)
    threads = _row_threads(width)
    column_blocks = math.ceil(width / threads)
    tile_blocks = _row_blocks(math.ceil(batch_size / tile_rows))

    first_row, last_row, counts = _scratch.classes(centers.shape[0])
    try:
        _classify[_grid_1d(batch_size), THREADS_1D](labels, first_row, last_row, counts)
        spanning_sums = _scratch.buffer("spanning sums", (batch_size, width), rows.dtype, zeroed=True)
        spanning_leaders = _scratch.buffer("spanning leaders", (batch_size,), np.int64)
        spanning_count = _scratch.buffer("spanning count", (1,), np.int64, zeroed=True)
        tile_sorted_labels = _scratch.buffer("tile sorted labels", (batch_size,), np.int64)
        tile_sorted_rows = _scratch.buffer("tile sorted rows", (batch_size,), np.int64)
        block_squares = _scratch.buffer("block squares", (tile_blocks * column_blocks,), np.float64)
        _tile_step[(tile_blocks, column_blocks), threads](
            rows, labels, centers, written, grad, first_row, last_row, counts, spanning_sums,
            spanning_leaders, spanning_count, tile_sorted_labels, tile_sorted_rows, block_squares,
            rows_are_features, deterministic, moves_centers, rule_step, count_weight, grad_scale, tile_rows,
        )
        _finish_spanning_classes[(_grid_1d(batch_size), column_blocks), threads](
            labels, centers, written, first_row, last_row, counts, spanning_sums, spanning_leaders, spanning_count,
            tile_sorted_labels, tile_sorted_rows,
            deterministic, moves_centers, rule_step, count_weight, tile_rows,
        )
        _reset_classes[_grid_1d(batch_size), THREADS_1D](labels, first_row, last_row, counts, spanning_count)
    except BaseException:
        _scratch.discard()
        raise
    # block sums added on the host, in block order: the same float64 total on every run
    return float(np.sum(block_squares.copy_to_host())) if rows_are_features else 0.0


def gather_centers(centers: Any, labels: Any) -> Any:
    """Return ``centers[labels]``, a new (B, D) array (on the device for device inputs)."""
    on_device = _OnDevice()
    device_centers, device_labels = on_device(centers), on_device(labels)
    out = cuda.device_array((device_labels.size, device_centers.shape[1]), dtype=device_centers.dtype)
    if out.shape[0] and out.shape[1]:
        _gather[_row_blocks(out.shape[0]), _row_threads(out.shape[1])](device_centers, device_labels, out)
    return out if is_device_array(centers) else out.copy_to_host()


def scatter_sub_update(centers: Any, labels: Any, updates: Any, *, deterministic: bool = False) -> None:
    """Subtract ``updates[i]`` from ``centers[labels[i]]`` for every i, duplicates accumulating."""
    on_device = _OnDevice()
    device_centers = on_device(centers, written=True)
    unused_grad = _scratch.buffer("unused grad", (1, 1), device_centers.dtype)
    _segmented_update(on_device(updates), on_device(labels), device_centers, device_centers, unused_grad,
                      False, -1.0, 0.0, 0.0, True, deterministic)
    on_device.finish()


def center_loss_step(
    features: Any,
    labels: Any,
    centers: Any,
    grad: Any,
    written: Any,
    rule: RuleCoefficients,
    *,
    deterministic: bool = False,
) -> float:
    """One step of ``rule``: write the grad and the center rows, return ``sum_i ||d_i||^2``."""
    on_device = _OnDevice()
    device_centers = on_device(centers, written=written is centers)
    device_written = device_centers if written is centers else on_device(written, written=True)
    squares = _segmented_update(
        on_device(features), on_device(labels), device_centers, device_written, on_device(grad, written=True),
        True, rule.step, rule.count_weight, rule.grad_scale, rule.moves_centers, deterministic,
    )
    on_device.finish()
    return squares
