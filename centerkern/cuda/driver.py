"""One call of the ``cuda`` backend, in order: its arrays, its temporaries, its launches, its verdict.

A call shares nothing with other calls but the compiled kernels and its device's error record
(``record``): its one temporary is made for the call from the caller's allocator on the
caller's stream (``arrays``) and carved into its parts (``_step_layout``), so calls on several
streams, or from several host threads, are independent. The per-class bookkeeping is a K-sized
int32 vector cleared on the stream; the float64 sums of classes that span tiles take rows for
what can span, not one per sample.

A call's launches are described once per launch signature (shapes, strides, dtypes, rule,
settings, device context) and kept as a ``launcher.LaunchPlan``: a later call with the same
signature allocates its temporary, hands the plan its arrays' data pointers, and the plan
clears the temporary's first bytes and launches. Every kernel of a call is compiled before the
first one that writes runs.
"""

from __future__ import annotations

import math
import threading
from typing import Any, NamedTuple

import numpy as np

from .._core.errors import label_out_of_range
from .._core.rules import SCATTER_SUB, RuleCoefficients
from . import kernels
from . import record
from .arrays import DeviceArrays, grid_1d, launch_1d, row_blocks, row_threads
from .kernels import StepSettings
from .launcher import (Launch, compile_all, driver_stream, is_direct, launch_through_numba, make_plan, read_int64s,
                       plan_for, setup_under_capture)
from .views import DeviceView

# the bookkeeping counts rows in int32 (see kernels): B - row and row + 1 must fit; so must label + 1
MOST_ROWS = 2**31 - 2
MOST_CLASSES = 2**31 - 2


_last = threading.local()


def take_last_run() -> tuple | None:
    """(plan, roots, layout) of this thread's last call made with ``DeviceArrays.keep_run``, and
    forget it (it holds the call's arrays): what ``repeat.remember`` builds on."""
    last = getattr(_last, "run", None)
    _last.run = None
    return last


def verdict_at(pointer: int, stream_handle: int) -> IndexError | None:
    """The error of the verdict at device address ``pointer``, once the stream's work is done
    (the host waits), or None for a good call."""
    return _verdict_error(read_int64s(pointer, kernels.VERDICT_SIZE, stream_handle))


def _verdict_error(verdict) -> IndexError | None:
    position, value, num_classes, negative = (int(v) for v in verdict)
    if position == kernels.NO_ROW:
        return None
    if value < 0 and not negative:
        value += 2**64  # an unsigned label, reported as the caller wrote it
    return label_out_of_range(position, value, num_classes)


class Layout(NamedTuple):
    """A call's one temporary: its ``size`` in bytes, the ``zero_bytes`` the stream clears first,
    and its parts, name: (byte offset, shape, dtype)."""

    size: int
    zero_bytes: int
    parts: dict


def _layout(*parts: tuple[str, tuple[int, ...], Any], zeroed: int) -> Layout:
    """The parts laid end to end, each at an offset its dtype aligns (8 bytes at most); the first
    ``zeroed`` of them are cleared by the call."""
    offset, placed, zero_bytes = 0, {}, 0
    for index, (name, shape, dtype) in enumerate(parts):
        dtype = np.dtype(dtype)
        offset = -(-offset // dtype.itemsize) * dtype.itemsize
        placed[name] = (offset, shape, dtype)
        offset += math.prod(shape) * dtype.itemsize
        if index < zeroed:
            zero_bytes = -(-offset // 4) * 4  # cleared in 32-bit words
    return Layout(offset, zero_bytes, placed)


class _Call:
    """Everything one call does around its launches: its arrays as device views (host arrays,
    for ``backend='cuda'`` on NumPy inputs, copied in and the written ones copied back), the
    device's context, an earlier call's bad label raised before anything is written, its one
    temporary, its launch plan, and with ``sync`` (or host arrays) the call's own verdict."""

    def __init__(self, *candidates):
        views = [a for a in candidates if isinstance(a, DeviceView)]
        self.arrays = views[0].arrays if views else DeviceArrays(None)
        self.on_host = not views
        self.waits = self.on_host or self.arrays.sync
        self._write_back = []
        self.verdict = None

    def __call__(self, array, written=False):
        if isinstance(array, DeviceView):
            return array
        view = self.arrays.asarray(array, "array")
        if written:
            self._write_back.append((view, array))
        return view

    def __enter__(self) -> "_Call":
        self._context = self.arrays.device_context()
        if self.arrays.elsewhere:
            self._context.__enter__()
        try:
            self.context_id = self.arrays.context_id
            self.record = self._record()
            earlier = self.record.take()  # an earlier sync=False call's bad label, raised before this call writes
            if earlier is not None:
                raise earlier
        except BaseException:
            if self.arrays.elsewhere:
                self._context.__exit__(None, None, None)
            raise
        return self

    def _record(self) -> record.ErrorRecord:
        found = record._records.get(self.context_id)
        if found is not None:
            return found
        with setup_under_capture(self.arrays.capturing):  # made once per device context
            return record.for_context(self.context_id, self.arrays.device_ordinal)

    def run(self, signature: tuple, roots: dict[str, DeviceView | None], layout_of, launches_of) -> None:
        """Launch the call's kernels: through this thread's plan for the call's launch signature
        (``signature`` and the roots' dtypes, shapes and strides), made at the first call with it
        from ``layout_of()`` (the temporary's ``Layout``) and ``launches_of(parts)`` (the
        launches, given the temporary's parts as views)."""
        views = list(roots.values())
        # which roots are one array (features passed as the centers, say) is part of the signature:
        # the plan patches such roots from one pointer
        aliases = tuple([views.index(v) if v is not None else None for v in views])
        key = (signature, self.context_id, self.arrays.device_ordinal, aliases,
               *[None if v is None else (v.dtype, v.shape, v.strides) for v in views])
        direct = is_direct()
        plan = plan_for(key) if direct else None
        layout = layout_of() if plan is None else plan.layout
        temporary = self.arrays.temporary(layout.size)
        if self.waits:
            self.verdict = temporary.part(*layout.parts["verdict"])
        if plan is None:
            parts = {name: temporary.part(offset, shape, dtype) for name, (offset, shape, dtype) in layout.parts.items()}
            launches = launches_of(parts)
            every_root = {**roots, "temporary": temporary, "record": self.record.view}
            plan = make_plan(key, launches, every_root, layout, self.context_id, self.arrays.capturing) \
                if direct else None
            if plan is None:  # Numba's own launch path: the temporary's first bytes cleared by a kernel
                if layout.zero_bytes:
                    zeroed = temporary.part(0, (layout.zero_bytes // 4,), np.int32)
                    launches = [Launch(kernels.fill_vector, *launch_1d(zeroed.size), (zeroed, 0)), *launches]
                compile_all(launches, self.arrays.capturing)
                launch_through_numba(launches, self.arrays.stream)
                return
        if self.arrays.keep_run:
            _last.run = (plan, roots, plan.layout)
        pointers = [0 if v is None else v.pointer for v in roots.values()]
        plan.run(driver_stream(self.arrays.stream_handle), (*pointers, temporary.pointer, self.record.view.pointer))

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            if kind is not None:
                _last.run = None  # a call that raised is not one to repeat (and its arrays are let go)
            if kind is None and self.waits:
                bad = self._own_verdict()
                if bad is not None:
                    _last.run = None
                    raise bad
                for view, host in self._write_back:
                    host[...] = view.numba().copy_to_host(stream=self.arrays.stream)
                if self._write_back:
                    self.arrays.stream.synchronize()
        finally:
            self.arrays.release()
            if self.arrays.elsewhere:
                self._context.__exit__(None, None, None)
        return False

    def _own_verdict(self) -> IndexError | None:
        """The call's verdict, copied back once the call's kernels are done (the host waits)."""
        if self.verdict is None:
            return None
        if is_direct():
            return verdict_at(self.verdict.pointer, self.arrays.stream_handle)
        verdict = self.verdict.numba().copy_to_host(stream=self.arrays.stream)
        self.arrays.stream.synchronize()
        return _verdict_error(verdict)

    @property
    def posts(self) -> bool:
        """Whether the last kernel posts a bad label to the device's record: when nobody waits
        for this call's own verdict."""
        return not self.waits


def _gather_layout(batch_size: int) -> Layout:
    _check_sizes(batch_size, 0)
    return _layout(("counters", (kernels.COUNTER_FIELDS,), np.int32), ("verdict", (kernels.VERDICT_SIZE,), np.int64),
                   zeroed=1)


def _check_sizes(batch_size: int, num_classes: int) -> None:
    if batch_size > MOST_ROWS:
        raise ValueError(f"the cuda backend takes at most {MOST_ROWS} rows per call, got {batch_size}")
    if num_classes > MOST_CLASSES:
        raise ValueError(f"the cuda backend takes at most {MOST_CLASSES} classes, got {num_classes}")


def gather_centers(centers: Any, labels: Any) -> Any:
    """Return ``centers[labels]``, a new (B, D) array (on the device for the device views of a
    checked call, see Returns).

    Called directly, on arrays that are not views of a checked call (NumPy arrays, or device
    arrays such as Numba's as they are), the call runs on Numba's default stream, copies host
    inputs to the device, waits for the GPU and raises a bad label's ``IndexError`` itself.
    ``centerkern.gather_centers`` checks its inputs first (shapes, dtypes, overlaps) and passes
    them as ``DeviceArrays`` views, with the caller's stream and ``sync`` choice.

    Parameters
    ----------
    centers : array, shape (K, D)
        A float32 or float64 array: a ``DeviceView``, a device array or a NumPy array.
    labels : array of int
        An integer vector of B values in [0, K), checked on the device.

    Returns
    -------
    DeviceView or numpy.ndarray, shape (B, D)
        The rows, in the dtype of ``centers``: a ``DeviceView`` on the device when the inputs
        are ``DeviceArrays`` views, else a NumPy array (copied back once the GPU is done).

    Raises
    ------
    IndexError
        If a label lies outside [0, K), once the call waits for the GPU (called directly, or
        with ``sync=True``; with ``sync=False`` the next call or ``check_errors`` raises it), or
        if an earlier call made with ``sync=False`` left a bad label on the device: raised
        before this call writes anything.

    See Also
    --------
    centerkern.gather_centers : The public function, which checks its inputs first.

    Examples
    --------
    These need a CUDA GPU, or Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).

    >>> import numpy as np
    >>> from numba import cuda
    >>> import centerkern
    >>> import centerkern.cuda
    >>> centers = cuda.to_device(np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]))
    >>> labels = cuda.to_device(np.array([2, 0, 2]))
    >>> centerkern.cuda.gather_centers(centers, labels).tolist()
    [[4.0, 5.0], [0.0, 1.0], [4.0, 5.0]]
    >>> centerkern.cuda.gather_centers(centers, cuda.to_device(np.array([0, 3])))
    Traceback (most recent call last):
        ...
    IndexError: label 3 at position 1 is out of range: labels must lie in [0, 3) for 3 classes

    The public function keeps the result of device inputs on the device:

    >>> rows = centerkern.gather_centers(centers, labels)
    >>> rows.copy_to_host().tolist()
    [[4.0, 5.0], [0.0, 1.0], [4.0, 5.0]]
    """
    call = _Call(centers, labels)
    centers, labels = call(centers), call(labels)
    out = call.arrays.empty((labels.size, centers.shape[1]), centers.dtype)
    with call:
        def launches(parts):
            return [
                Launch(kernels.check_labels, *launch_1d(labels.size), (labels, centers.shape[0], parts["counters"])),
                Launch(kernels.gather, row_blocks(labels.size), row_threads(centers.shape[1]),
                       (centers, labels, out, parts["counters"], parts["verdict"], call.record.view, call.posts)),
            ]

        call.run(("gather", call.posts), {"centers": centers, "labels": labels, "out": out},
                 lambda: _gather_layout(labels.size), launches)
    return out.numba().copy_to_host() if call.on_host else out


def scatter_sub_update(centers: Any, labels: Any, updates: Any, *, deterministic: bool = False,
                       copy_from: Any = None) -> None:
    """Subtract ``updates[i]`` from ``centers[labels[i]]`` for every i, duplicates accumulating.

    ``centers`` is written in place. A bad label makes the call write nothing to the caller's
    arrays.

    Called directly, on arrays that are not views of a checked call (NumPy arrays, or device
    arrays such as Numba's as they are), the call runs on Numba's default stream, copies host
    inputs to the device, waits for the GPU and raises a bad label's ``IndexError`` itself.
    ``centerkern.scatter_sub_update`` checks its inputs first (shapes, dtypes, overlaps) and passes
    them as ``DeviceArrays`` views, with the caller's stream and ``sync`` choice.

    Parameters
    ----------
    centers : array, shape (K, D)
        The array written: a float32 or float64 ``DeviceView``, device array or NumPy array
        (written back once the GPU is done).
    labels : array of int
        An integer vector of B values in [0, K), checked on the device.
    updates : array, shape (B, D)
        The rows to subtract, in the dtype of ``centers``.
    deterministic : bool, optional
        Bitwise-identical results from run to run: no float atomics, the partial sums of a
        class added in tile order.
    copy_from : None or array, shape (K, D), optional
        The centers to start from, copied into ``centers`` by the call's kernels once the labels
        are known to be good (``centers`` is then a fresh array; ``scatter_sub_update`` with
        ``out=None``). None (the default): ``centers`` holds them already, the in-place path.

    Raises
    ------
    IndexError
        If a label lies outside [0, K), once the call waits for the GPU (called directly, or
        with ``sync=True``; with ``sync=False`` the next call or ``check_errors`` raises it), or
        if an earlier call made with ``sync=False`` left a bad label on the device: raised
        before this call writes anything.
    ValueError
        If the batch has more than 2**31 - 2 rows.

    See Also
    --------
    centerkern.scatter_sub_update : The public function, which checks its inputs first.

    Examples
    --------
    These need a CUDA GPU, or Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).

    >>> import numpy as np
    >>> from numba import cuda
    >>> import centerkern.cuda
    >>> centers = cuda.to_device(np.array([[1.0], [2.0], [3.0]]))
    >>> labels = cuda.to_device(np.array([0, 0, 1, 1]))
    >>> updates = cuda.to_device(np.array([[9.0], [10.0], [11.0], [12.0]]))
    >>> centerkern.cuda.scatter_sub_update(centers, labels, updates)
    >>> centers.copy_to_host().tolist()
    [[-18.0], [-21.0], [3.0]]

    Into another array, starting from ``copy_from``, which is left as it was:

    >>> start = cuda.to_device(np.array([[1.0], [2.0], [3.0]]))
    >>> moved = cuda.device_array((3, 1))
    >>> centerkern.cuda.scatter_sub_update(moved, labels, updates, deterministic=True, copy_from=start)
    >>> moved.copy_to_host().tolist(), start.copy_to_host().tolist()
    ([[-18.0], [-21.0], [3.0]], [[1.0], [2.0], [3.0]])
    """
    _segmented_update(updates, labels, centers, centers, None, SCATTER_SUB, rows_are_features=False,
                      deterministic=deterministic, copy_from=copy_from)


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
    framework's 0-d array.

    Every sample reads the centers as they were before the call. A bad label makes the call
    write nothing to the caller's arrays, and its loss NaN.

    Called directly, on arrays that are not views of a checked call (NumPy arrays, or device
    arrays such as Numba's as they are), the call runs on Numba's default stream, copies host
    inputs to the device, waits for the GPU and raises a bad label's ``IndexError`` itself.
    ``centerkern.center_loss`` checks its inputs first (shapes, dtypes, overlaps) and passes
    them as ``DeviceArrays`` views, with the caller's stream and ``sync`` choice. Called directly,
    the inputs count as host inputs here: the loss comes back as a Python float.

    Parameters
    ----------
    features : array, shape (B, D)
        A float32 or float64 ``DeviceView``, device array or NumPy array.
    labels : array of int
        An integer vector of B values in [0, K), checked on the device.
    centers : array, shape (K, D)
        The centers, in the dtype of ``features``; for rules that move the centers, written in
        place (the caller's ``out``, or a fresh array filled from ``copy_from``).
    grad : array, shape (B, D)
        Where the gradient d loss / d features is written.
    written : array, shape (K, D)
        Where the rows of the batch's classes are written: ``centers`` itself for rules that
        move the centers (``facenet``, ``wen``), a zeroed ``grad_centers`` for ``pytorch``.
    rule : RuleCoefficients
        The rule's coefficients for this batch: ``centerkern._core.rules.rule_coefficients(rule,
        alpha, B, D)``, as ``centerkern.center_loss`` makes them.
    deterministic : bool, optional
        Bitwise-identical results from run to run: no float atomics, the partial sums of a
        class added in tile order.
    copy_from : None or array, shape (K, D), optional
        The centers to start from, copied into ``centers`` by the call's kernels once the labels
        are known to be good (``centerkern.center_loss`` with ``out=None``). None (the default):
        ``centers`` holds them already, the in-place path.

    Returns
    -------
    float or DeviceView
        The loss, accumulated in float64: a Python float for host inputs (and direct calls), a
        ``DeviceView`` of one float64 value for ``DeviceArrays`` views.

    Raises
    ------
    IndexError
        If a label lies outside [0, K), once the call waits for the GPU (called directly, or
        with ``sync=True``; with ``sync=False`` the next call or ``check_errors`` raises it), or
        if an earlier call made with ``sync=False`` left a bad label on the device: raised
        before this call writes anything.
    ValueError
        If the batch has more than 2**31 - 2 rows.

    See Also
    --------
    centerkern.center_loss : The public function, which checks its inputs first.

    Examples
    --------
    These need a CUDA GPU, or Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).

    >>> import numpy as np
    >>> from numba import cuda
    >>> import centerkern.cuda
    >>> from centerkern._core.rules import rule_coefficients
    >>> features = cuda.to_device(np.array([[1.0, 1.0], [1.0, 3.0], [4.0, 2.0]]))
    >>> labels = cuda.to_device(np.array([0, 0, 1]))
    >>> centers = cuda.to_device(np.zeros((2, 2)))
    >>> grad = cuda.device_array((3, 2))
    >>> rule = rule_coefficients("facenet", 0.5, 3, 2)
    >>> loss = centerkern.cuda.center_loss_step(features, labels, centers, grad, centers, rule)
    >>> round(loss, 6)
    5.333333
    >>> centers.copy_to_host().tolist()
    [[1.0, 2.0], [2.0, 1.0]]
    >>> np.round(grad.copy_to_host(), 6).tolist()
    [[0.333333, 0.333333], [0.333333, 1.0], [1.333333, 0.666667]]

    Through ``centerkern.center_loss``, device inputs give device results, the loss a 0-d
    float64 array:

    >>> result = centerkern.center_loss(features, labels, cuda.to_device(np.zeros((2, 2))), 0.5)
    >>> loss = result.loss.copy_to_host()
    >>> loss.shape, loss.dtype, round(float(loss), 6)
    ((), dtype('float64'), 5.333333)
    """
    return _segmented_update(features, labels, centers, written, grad, rule, rows_are_features=True,
                             deterministic=deterministic, copy_from=copy_from)


def spanning_slots(batch_size: int, num_classes: int) -> int:
    """Slots of the spanning table (see ``kernels``): one for every class that can span tiles, a
    class with two samples or more, so at most min(K, B // 2)."""
    return max(1, min(num_classes, batch_size // 2))


def _step_layout(batch_size: int, num_classes: int, width: int, deterministic: bool) -> Layout:
    """The temporary of a step or scatter: the counters and the spanning table's keys (cleared by
    the call's memset), the float64 spanning sums (a row per slot, cleared by the run that claims
    it; with ``deterministic`` one row per sample, each written whole before it is read), the
    tile kernel's block sums of squares, the verdict, and with ``deterministic`` the tile-sorted
    labels and rows the finishing kernel searches."""
    _check_sizes(batch_size, num_classes)
    slots = spanning_slots(batch_size, num_classes)
    threads = row_threads(width)
    blocks = row_blocks(math.ceil(batch_size / kernels.TILE_ROWS)) * max(1, math.ceil(width / threads))
    per_row = batch_size if deterministic else 1
    counters = ("counters", (kernels.COUNTER_FIELDS + kernels.BOOK_ROWS * num_classes,), np.int32)
    keys = ("keys", (slots,), np.int32)
    sums = ("spanning_sums", (max(1, batch_size) if deterministic else slots, width), np.float64)
    rest = [("block_squares", (blocks,), np.float64), ("verdict", (kernels.VERDICT_SIZE,), np.int64),
            ("tile_sorted_labels", (per_row,), np.int64), ("tile_sorted_rows", (per_row,), np.int64)]
    return _layout(counters, keys, sums, *rest, zeroed=2)


def _segmented_update(rows, labels, centers, written, grad, rule: RuleCoefficients, *, rows_are_features: bool,
                      deterministic: bool, copy_from) -> Any:
    """One call of ``center_loss_step`` (``rows_are_features``: the rows are features, with a grad
    and a loss) or of ``scatter_sub_update`` (the rows are updates; ``grad`` None, ``rule``
    ``SCATTER_SUB``), as those functions describe it. Returns the step's loss, None for the
    scatter."""
    call = _Call(rows, labels, centers)
    target = call(centers, written=True)
    written = target if written is centers else call(written, written=True)
    rows, labels = call(rows), call(labels)
    grad = call(grad, written=True) if rows_are_features else None
    copy_from = None if copy_from is None else call(copy_from)
    loss = call.arrays.new_loss() if rows_are_features else None
    settings = StepSettings(
        rows_are_features=bool(rows_are_features),
        deterministic=bool(deterministic),
        grad_is_fresh=bool(rows_are_features and grad.fresh),
        written_is_fresh=bool(written.fresh and written is not target),
        posts_bad_label=call.posts,
    )
    roots = {"rows": rows, "labels": labels, "centers": target, "written": written, "grad": grad,
             "copy_from": copy_from, "loss": loss}
    batch_size, width = rows.shape
    with call:
        call.run(("step", rule, settings, target.fresh), roots,
                 lambda: _step_layout(batch_size, target.shape[0], width, settings.deterministic),
                 lambda parts: _update_launches(call, rule, settings, parts, **roots))
    if loss is None:
        return None
    return float(loss.numba().copy_to_host()[0]) if call.on_host else loss


def _update_launches(call, rule: RuleCoefficients, settings: StepSettings, parts: dict, *, rows, labels, centers,
                     written, grad, copy_from, loss) -> list[Launch]:
    """The launches of one step or scatter (see ``kernels``), on the temporary's ``parts``. A
    scatter (``settings.rows_are_features`` False) has no grad and no loss: the kernels read
    neither."""
    batch_size, width = rows.shape
    num_classes = centers.shape[0]
    threads = row_threads(width)
    column_blocks = max(1, math.ceil(width / threads))
    tile_blocks = row_blocks(math.ceil(batch_size / kernels.TILE_ROWS))
    counters, keys, spanning_sums = parts["counters"], parts["keys"], parts["spanning_sums"]
    tile_sorted = parts["tile_sorted_labels"], parts["tile_sorted_rows"]
    block_squares = parts["block_squares"]
    if not settings.rows_are_features:
        grad, loss = rows, block_squares  # typed stand-ins, never written (see tile_step)

    launches = [Launch(kernels.classify, tile_blocks, kernels.TILE_ROWS, (labels, num_classes, counters))]
    if copy_from is not None:
        launches.append(Launch(kernels.copy_rows, row_blocks(num_classes), threads,
                               (copy_from, centers, counters, centers.fresh)))
    launches += [
        Launch(kernels.tile_step, (tile_blocks, column_blocks), threads,
               (rows, labels, centers, written, grad, counters, keys, spanning_sums, *tile_sorted, block_squares,
                rule, settings)),
        Launch(kernels.finish_spanning_classes, (grid_1d(keys.size), column_blocks), threads,
               (labels, centers, written, counters, keys, spanning_sums, *tile_sorted, block_squares, loss,
                parts["verdict"], call.record.view, rule, settings)),
    ]
    return launches


def check_errors(device: Any = None) -> None:
    """Wait for the GPU, then raise the ``IndexError`` of a bad label left by a call made with
    ``sync=False``, if there is one.

    A call made with ``sync=False`` returns before its labels are checked; a bad one makes it
    write nothing and its loss NaN, and leaves its error on the device. The next call on that
    device raises it before it writes anything, or this function does: a training loop can
    call it where it waits for the GPU anyway (when it reads the loss, say). Each bad label is
    raised once, oldest first.

    Parameters
    ----------
    device : int, optional
        A device ordinal: check that device only. By default every device that has run a call
        of this backend is checked.

    Raises
    ------
    IndexError
        If a call made with ``sync=False`` had a label outside [0, K): the message names the
        value, its position and K, as the call would have. If more bad calls were left than the
        device's record holds, a note on the error says how many went unrecorded.

    See Also
    --------
    centerkern.center_loss : Its ``sync`` parameter.

    Examples
    --------
    These need a CUDA GPU, or Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).

    >>> import numpy as np
    >>> from numba import cuda
    >>> import centerkern
    >>> import centerkern.cuda
    >>> features = cuda.to_device(np.ones((3, 2)))
    >>> centers = cuda.to_device(np.zeros((2, 2)))
    >>> bad_labels = cuda.to_device(np.array([0, 1, 2]))
    >>> result = centerkern.center_loss(features, bad_labels, centers, 0.5, out=centers, sync=False)
    >>> centerkern.cuda.check_errors()
    Traceback (most recent call last):
        ...
    IndexError: label 2 at position 2 is out of range: labels must lie in [0, 2) for 2 classes
    >>> bool(np.isnan(result.loss.copy_to_host())), centers.copy_to_host().tolist()
    (True, [[0.0, 0.0], [0.0, 0.0]])
    >>> centerkern.cuda.check_errors()  # raised once: nothing is left
    """
    record.check_errors(device)
