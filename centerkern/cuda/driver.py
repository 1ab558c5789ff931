"""One call of the ``cuda`` backend, in order: its scratch, its launches, its label check.

The per-class bookkeeping (first and last row of each class, its count) lives in K-sized scratch
arrays that are set once and put back by the call's last kernel, which touches only the batch's
labels: no call passes over, or allocates, anything of size K. Scratch belongs to a device
context (two devices, or a context closed and made anew, never share it). Calls on different
streams of one device share it too, so a call on another stream than the previous one first
makes its stream wait for the previous call (an event, no host wait). New scratch is built in
full, on the call's stream, before it is published; a call that fails midway discards the
scratch, so the next call starts clean.

Kernels of a call are all compiled (``launcher.prepare``) before the first one that writes runs.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
from numba import cuda

from .._rules import RuleCoefficients
from .._errors import label_out_of_range
from . import kernels
from .arrays import DeviceArrays, DeviceView, _simulated
from .launcher import prepare

GRID_STRIDE_BLOCKS = 1024  # blocks for the 1-D grid-stride kernels over the batch
THREADS_1D = 256
ROW_BLOCKS = 8192  # most blocks along the rows (or tiles) of the 2-D grid-stride kernels


def _grid_1d(size: int) -> int:
    return max(1, min(GRID_STRIDE_BLOCKS, math.ceil(size / THREADS_1D)))


def _row_threads(width: int) -> int:
    return max(1, min(kernels.COLUMNS_PER_BLOCK, width))


def _row_blocks(rows: int) -> int:
    return max(1, min(ROW_BLOCKS, rows))


# --------------------------------------------------------------------------- scratch


class _Scratch:
    """Work arrays of one device context, kept between calls."""

    def __init__(self, context: Any):
        self.context = context  # held, so that its id() keys this scratch alone
        self.capacity = 0
        self.classes: tuple[DeviceView, DeviceView, DeviceView] | None = None
        self.buffers: dict[tuple, Any] = {}
        self.views: dict[tuple, DeviceView] = {}
        self.status: DeviceView | None = None
        self.pending = None  # host-mapped record of a bad label, for the host (see kernels.PENDING_SIZE)
        self._pending_view: DeviceView | None = None
        self.last_stream: int | None = None
        self.done = None  # an event recorded after the last call, on its stream
        self.captured = False  # whether a CUDA graph has captured a call using this scratch
        self.under_capture = False  # whether the call now running is being captured
        self.retired: list = []  # arrays replaced by larger ones, kept while a graph may use them

    def pending_view(self) -> DeviceView:
        if self._pending_view is None:
            self._pending_view = DeviceView.of(self.pending, None)
        return self._pending_view

    def pending_host(self) -> np.ndarray:
        # the simulator's mapped arrays are NumPy arrays wrapped; the real ones are NumPy arrays
        return getattr(self.pending, "_ary", self.pending)

    def ensure_status(self, arrays: DeviceArrays) -> None:
        if self.pending is None:
            self._grow("the label check's record")
            self.pending = cuda.mapped_array(kernels.PENDING_SIZE, dtype=np.int64)
            self.pending_host()[:] = kernels.NO_ROW
        self.status = self.buffer("status", (kernels.STATUS_SIZE,), np.int64, arrays, fill_value=kernels.NO_ROW)

    def always_clear(self, arrays: DeviceArrays) -> DeviceView:
        """A status that no call ever sets, for copies into the backend's own fresh arrays: they
        run whatever the labels, and before the call's own check."""
        return self.buffer("always clear", (kernels.STATUS_SIZE,), np.int64, arrays, fill_value=kernels.NO_ROW)

    def _grow(self, what: str) -> None:
        if self.under_capture:
            raise RuntimeError(
                f"this call needs more scratch ({what}) than earlier calls on this device, and a stream under CUDA "
                "graph capture cannot allocate it: run the same step once before capturing it (torch asks for a "
                "warm-up too)"
            )

    def class_bookkeeping(self, num_classes: int, arrays: DeviceArrays):
        if num_classes > self.capacity:
            self._grow(f"{num_classes} classes")
            # built in full before it is published: a failure here leaves the old arrays in use
            capacity = max(num_classes, 2 * self.capacity)
            built = []
            for value in (kernels.NO_ROW, -1, 0):
                view = DeviceView.of(cuda.device_array(capacity, dtype=np.int64, stream=arrays.stream), None)
                fill(view, value, arrays)
                built.append(view)
            if self.captured and self.classes is not None:
                self.retired.append(self.classes)
            self.classes, self.capacity = tuple(built), capacity
        return self.classes

    def buffer(self, name: str, shape: tuple[int, ...], dtype, arrays: DeviceArrays, fill_value=None) -> DeviceView:
        """A device array of ``shape`` and ``dtype``, reused across calls. Its contents are
        undefined, or ``fill_value`` throughout (a promise the kernels keep by putting back what
        they used: the buffer is filled once, when it is allocated)."""
        dtype = np.dtype(dtype)
        view = self.views.get((name, shape, dtype))
        if view is not None:
            return view
        size = math.prod(shape)
        held = self.buffers.get((name, dtype))
        if held is None or held.size < size:
            self._grow(name)
            held = cuda.device_array(max(size, 1, 2 * (0 if held is None else held.size)), dtype=dtype,
                                     stream=arrays.stream)
            if fill_value is not None:
                fill(DeviceView.of(held, None), fill_value, arrays)
            if self.captured and (name, dtype) in self.buffers:
                self.retired.append(self.buffers[(name, dtype)])
            self.buffers[(name, dtype)] = held
            self.views = {key: value for key, value in self.views.items() if key[0] != name}
        view = DeviceView.of(held[:size].reshape(shape), None)
        if len(self.views) > 64:  # batch shapes that keep changing: keep the cache small
            self.views.clear()
        self.views[(name, shape, dtype)] = view
        return view

    def take_pending_error(self) -> IndexError | None:
        """The bad label a finished call left for the host, if any (and forget it)."""
        if self.pending is None:
            return None
        record = self.pending_host()
        position = int(record[0])
        if position == kernels.NO_ROW:
            return None
        value, num_classes = int(record[1]), int(record[2])
        if value < 0 and not record[3]:
            value += 2**64  # an unsigned label, reported as the caller wrote it
        record[0] = kernels.NO_ROW
        return label_out_of_range(position, value, num_classes)


_scratches: dict[int, _Scratch] = {}
_kept_for_graphs: list[_Scratch] = []  # discarded scratch that a captured graph may still use


def _discard(scratch: _Scratch) -> None:
    """After a failure midway the bookkeeping may be dirty: the next call starts afresh. Memory a
    captured graph refers to is kept, since its replays still use it."""
    _scratches.pop(_context_key(scratch.context), None)
    if scratch.captured:
        _kept_for_graphs.append(scratch)


def _context_key(context: Any) -> int:
    # Numba keeps one context object per device and thread until cuda.close(); a scratch holds
    # its context, so the id cannot be reused while the scratch lives. (The simulator makes a new
    # context object at every request, all standing for its one device.)
    return 0 if _simulated() else id(context)


def _scratch_for_current_context() -> _Scratch:
    context = cuda.current_context()
    key = _context_key(context)
    scratch = _scratches.get(key)
    if scratch is None or (scratch.context is not context and not _simulated()):
        scratch = _scratches[key] = _Scratch(context)
    return scratch


def _device_context(arrays: DeviceArrays):
    """Numba's context for the device of the call's arrays (torch's current device may differ
    from Numba's)."""
    if _simulated() or cuda.get_current_device().id == arrays.device_ordinal:
        return nullcontext()
    return cuda.gpus[arrays.device_ordinal]


def _is_capturing(arrays: DeviceArrays) -> bool:
    if _simulated():
        return False
    from cuda.bindings import driver as cuda_driver

    error, status = cuda_driver.cuStreamIsCapturing(cuda_driver.CUstream(arrays.stream_handle))
    if error != cuda_driver.CUresult.CUDA_SUCCESS:  # e.g. the legacy stream while another captures
        raise RuntimeError(f"cannot queue work on stream {arrays.stream_handle:#x}: {error.name}")
    return status != cuda_driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE


@contextmanager
def _call(arrays: DeviceArrays):
    """Everything one call does on the device: scratch of the right context, ordered after the
    previous call on another stream, discarded if anything fails midway; with ``sync``, the
    label check's verdict before returning."""
    with _device_context(arrays):
        scratch = _scratch_for_current_context()
        capturing = _is_capturing(arrays)
        if capturing and arrays.sync:
            raise ValueError("sync=True waits for the GPU, which a stream under CUDA graph capture cannot; "
                             "pass sync=False to capture this call")
        if arrays.sync and scratch.done is not None:
            # this call waits for the GPU anyway: let an earlier sync=False call finish first, so
            # that its bad label is raised before this call writes, and the verdict read after
            # this call is this call's own
            scratch.done.synchronize()
        error = scratch.take_pending_error()  # a bad label of an earlier sync=False call
        if error is not None:
            raise error
        if not capturing and scratch.done is not None and scratch.last_stream != arrays.stream_handle:
            scratch.done.wait(arrays.stream)
        scratch.under_capture = capturing
        try:
            # under capture, Numba must not free memory (cuMemFree would end the capture)
            with cuda.defer_cleanup() if capturing else nullcontext():
                scratch.ensure_status(arrays)
                yield scratch
        except BaseException:
            _discard(scratch)
            raise
        finally:
            scratch.under_capture = False
        if capturing:
            # a graph now holds the scratch's addresses: none of it may be freed from now on. (An
            # event recorded under capture cannot be waited on outside it: the ordering of eager
            # calls stays as it was.)
            scratch.captured = True
        elif not _simulated():
            scratch.done = scratch.done or cuda.event(timing=False)
            scratch.done.record(arrays.stream)
            scratch.last_stream = arrays.stream_handle
        if arrays.sync:
            arrays.stream.synchronize()
            error = scratch.take_pending_error()
            if error is not None:
                raise error


def check_errors() -> None:
    """Wait for the current device, then raise the ``IndexError`` of a bad label left by a call
    made with ``sync=False`` (SPEC: "Device arrays"), if there is one."""
    cuda.synchronize()
    scratch = _scratches.get(_context_key(cuda.current_context()))
    error = None if scratch is None else scratch.take_pending_error()
    if error is not None:
        raise error


# --------------------------------------------------------------------------- small kernels


def fill(view: DeviceView, value, arrays: DeviceArrays) -> None:
    """Fill an array of the backend's own, on the call's stream."""
    if view.ndim == 1:
        prepare(kernels.fill_vector, _grid_1d(view.size), THREADS_1D, arrays, view, value)()
    else:
        prepare(kernels.fill_rows, _row_blocks(view.shape[0]), _row_threads(view.shape[1]), arrays, view, value)()


def copy(source: DeviceView, destination: DeviceView) -> None:
    """``destination[...] = source`` for a fresh ``destination`` of the backend's own (a vector or
    a matrix), on the call's stream."""
    arrays = destination.arrays
    with _device_context(arrays):
        always_clear = _scratch_for_current_context().always_clear(arrays)
        if source.ndim == 1:
            prepare(kernels.copy_vector, _grid_1d(source.size), THREADS_1D, arrays, source, destination,
                    always_clear)()
        else:
            prepare(kernels.copy_rows, _row_blocks(source.shape[0]), _row_threads(source.shape[1]), arrays,
                    source, destination, always_clear, True)()


# --------------------------------------------------------------------------- the three functions


class _OnDevice:
    """The call's arrays as device views: device arrays as they are, NumPy arrays (the ``cuda``
    backend asked for on host inputs) copied in, and the written ones copied back at the end."""

    def __init__(self, *candidates):
        views = [a for a in candidates if isinstance(a, DeviceView)]
        self.arrays = views[0].arrays if views else DeviceArrays(None)
        self.on_host = not views
        self._write_back = []

    def __call__(self, array, written=False):
        if isinstance(array, DeviceView):
            return array
        view = self.arrays.asarray(array, "array")
        if written:
            self._write_back.append((view, array))
        return view

    def finish(self):
        for view, host in self._write_back:
            host[...] = view.numba().copy_to_host(stream=self.arrays.stream)
        if self._write_back:
            self.arrays.stream.synchronize()


def gather_centers(centers: Any, labels: Any) -> Any:
    """Return ``centers[labels]``, a new (B, D) array (on the device for device inputs)."""
    on_device = _OnDevice(centers, labels)
    arrays = on_device.arrays
    centers, labels = on_device(centers), on_device(labels)
    out = arrays.empty((labels.size, centers.shape[1]), centers.dtype)
    with _call(arrays) as scratch:
        launches = [
            prepare(kernels.check_labels, _grid_1d(labels.size), THREADS_1D, arrays, labels, centers.shape[0],
                    scratch.status),
            prepare(kernels.gather, _row_blocks(labels.size), _row_threads(centers.shape[1]), arrays, centers,
                    labels, out, scratch.status),
            prepare(kernels.settle_gather, 1, 1, arrays, labels, centers.shape[0], scratch.status, scratch.pending_view()),
        ]
        for launch in launches:
            launch()
    return out.numba().copy_to_host() if on_device.on_host else out


def scatter_sub_update(centers: Any, labels: Any, updates: Any, *, deterministic: bool = False,
                       copy_from: Any = None) -> None:
    """Subtract ``updates[i]`` from ``centers[labels[i]]`` for every i, duplicates accumulating."""
    on_device = _OnDevice(centers, labels, updates)
    arrays = on_device.arrays
    target = on_device(centers, written=True)
    with _call(arrays) as scratch:
        unused_grad = scratch.buffer("unused grad", (1, 1), target.dtype, arrays)
        unused_loss = scratch.buffer("unused loss", (1,), np.float64, arrays)
        _segmented_update(
            arrays, scratch, on_device(updates), on_device(labels), target, target, unused_grad, unused_loss,
            None if copy_from is None else on_device(copy_from), False, -1.0, 0.0, 0.0, 0.0, True, deterministic,
        )
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
    copy_from: Any = None,
) -> Any:
    """One step of ``rule``: write the grad and the center rows; return the loss, a Python float
    for host inputs, or a float64 device array of one value whose owner is the caller
    framework's 0-d array."""
    on_device = _OnDevice(features, labels, centers)
    arrays = on_device.arrays
    target = on_device(centers, written=True)
    written_view = target if written is centers else on_device(written, written=True)
    loss = arrays.new_loss()
    with _call(arrays) as scratch:
        _segmented_update(
            arrays, scratch, on_device(features), on_device(labels), target, written_view,
            on_device(grad, written=True), loss, None if copy_from is None else on_device(copy_from),
            True, rule.step, rule.count_weight, rule.grad_scale, rule.loss_scale, rule.moves_centers, deterministic,
        )
    on_device.finish()
    return float(loss.numba().copy_to_host()[0]) if on_device.on_host else loss


def _segmented_update(arrays, scratch, rows, labels, centers, written, grad, loss, copy_from, rows_are_features,
                      rule_step, count_weight, grad_scale, loss_scale, moves_centers, deterministic) -> None:
    """The launches of one step or scatter (see ``kernels``), all prepared before the first runs."""
    batch_size, width = rows.shape
    num_classes = centers.shape[0]
    threads = _row_threads(width)
    column_blocks = max(1, math.ceil(width / threads))
    tile_blocks = _row_blocks(math.ceil(batch_size / kernels.TILE_ROWS))

    first_row, last_row, counts = scratch.class_bookkeeping(num_classes, arrays)
    buffer = scratch.buffer
    spanning_sums = buffer("spanning sums", (batch_size, width), np.float64, arrays, fill_value=0.0)
    spanning_leaders = buffer("spanning leaders", (batch_size,), np.int64, arrays)
    spanning_count = buffer("spanning count", (1,), np.int64, arrays, fill_value=0)
    tile_sorted_labels = buffer("tile sorted labels", (batch_size,), np.int64, arrays)
    tile_sorted_rows = buffer("tile sorted rows", (batch_size,), np.int64, arrays)
    block_squares = buffer("block squares", (tile_blocks * column_blocks,), np.float64, arrays)
    status = scratch.status

    launches = [prepare(kernels.classify, tile_blocks, kernels.TILE_ROWS, arrays,
                        labels, num_classes, first_row, last_row, counts, status)]
    if copy_from is not None:
        launches.append(prepare(kernels.copy_rows, _row_blocks(num_classes), threads, arrays,
                                copy_from, centers, status, centers.fresh))
    launches += [
        prepare(kernels.tile_step, (tile_blocks, column_blocks), threads, arrays,
                rows, labels, centers, written, grad, first_row, last_row, counts, spanning_sums,
                spanning_leaders, spanning_count, tile_sorted_labels, tile_sorted_rows, block_squares, status,
                rows_are_features, deterministic, moves_centers, rule_step, count_weight, grad_scale,
                grad.fresh, written.fresh and written is not centers),
        prepare(kernels.finish_spanning_classes, (_grid_1d(batch_size), column_blocks), threads, arrays,
                labels, centers, written, last_row, counts, spanning_sums, spanning_leaders, spanning_count,
                tile_sorted_labels, tile_sorted_rows, block_squares, loss, status,
                rows_are_features, deterministic, moves_centers, rule_step, count_weight, loss_scale),
        prepare(kernels.settle, _grid_1d(batch_size), THREADS_1D, arrays,
                labels, num_classes, first_row, last_row, counts, spanning_count, status, scratch.pending_view()),
    ]
    for launch in launches:
        launch()
