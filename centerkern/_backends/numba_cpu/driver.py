"""What Python does around the numba backend's entry points: the three backend functions.

One call is one compiled entry point (``step``, where the algorithm is told): a stable radix
sort by label that is also the range check, an O(B) plan, and the passes of the layout the plan
calls for, on every thread (``step_parallel``) or, for batches too small to pay for waking them,
on the calling thread (``step_serial``). Here: the choice of entry, the scratch (kept per Python
thread, so that nothing of size B is allocated per call), turns for launches where Numba's
threading layer needs them, copies of the rare array not laid out as the entries take it, and a
bad label the sort found raised as SPEC's ``IndexError`` (nothing was written). Results are
bitwise identical for any thread count.

Kernels compile when a call first needs them, once per float dtype and regime, and are cached
on disk (``jit``): a call compiles only the entry point it runs. ``python -m centerkern compile``
fills the cache ahead of time (``ENTRIES``).
"""

from __future__ import annotations

import math
import threading
from contextlib import nullcontext

import numba
import numpy as np

from . import codebooks
from . import memory
from . import step
from .jit import cache_location
from .step import LAYOUTS, PARALLEL_ELEMENTS
from ..numpy_reference import assign_in_tiles
from ..._core.errors import label_out_of_range
from ..._core.rules import SCATTER_SUB, RuleCoefficients

# Every entry point a call can reach: what ``python -m centerkern compile`` compiles.
ENTRIES = (step.step_serial, step.step_parallel, memory.gather_rows, memory.fill_zeros, *codebooks.ENTRIES)


def kernel_cache() -> tuple[str | None, str]:
    """(directory, how it was chosen) of this backend's kernel cache, or (None, why there is none)."""
    return cache_location(ENTRIES[0].dispatcher.py_func)

_workqueue_lock = threading.Lock()
_NO_LOCK = nullcontext()
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
MOST_THREADS = numba.config.NUMBA_NUM_THREADS


class _Scratch(threading.local):
    """Each Python thread's scratch, kept from call to call: B-sized vectors allocated per call
    would pay page faults again every time (measured at B=65k). Every call rewrites what it reads."""

    def __init__(self):
        self.ints = np.empty(0, np.int64)
        self.floats = np.empty(0, np.float64)
        self.last_layout = None

    def ints_for(self, batch_size: int) -> np.ndarray:
        needed = step.int_scratch_size(batch_size)
        if self.ints.size < needed:
            self.ints = np.empty(needed, np.int64)
        return self.ints


_scratch = _Scratch()


def last_layout() -> str | None:
    """The layout the last call of this thread ran ("batch order" or "label order")."""
    return _scratch.last_layout


def _readable(array: np.ndarray) -> np.ndarray:
    """``array`` as the entry points take an input: C-contiguous, aligned (a copy if it is not)
    and read-only, the signature's exact type. A writable array would have to be converted to
    it, and Numba converts only while compiling is off, which it is not while another thread
    compiles the same entry for another dtype: the call would then try to compile instead."""
    if not (array.flags.c_contiguous and array.flags.aligned):
        array = np.array(array, order="C")
    if array.flags.writeable:
        array = array.view()
        array.flags.writeable = False
    return array


def _run(labels, rows, centers, written, grad, rows_are_features, rule, layout="auto"):
    # inputs may be read-only; targets are writable (checked by the validation)
    if not (labels.flags.c_contiguous and labels.flags.aligned and rows.flags.c_contiguous and rows.flags.aligned
            and centers.flags.carray and written.flags.carray and grad.flags.carray):
        return _run_on_copies(labels, rows, centers, written, grad, rows_are_features, rule, layout)
    parallel = labels.size * rows.shape[1] >= PARALLEL_ELEMENTS
    kernel = (step.step_parallel if parallel else step.step_serial).compiled(rows.dtype)
    labels, rows = _readable(labels), _readable(rows)
    ints = _scratch.ints_for(labels.size)
    layout_code = LAYOUTS.index(layout)
    threads = MOST_THREADS if parallel else 1
    while True:
        with _one_launch_at_a_time() if parallel else _NO_LOCK:
            squares = kernel(labels, rows, centers, written, grad, rows_are_features, rule, ints, _scratch.floats,
                             layout_code, threads)
        if ints[step.BAD_POSITION] >= 0:
            position = int(ints[step.BAD_POSITION])
            raise label_out_of_range(position, int(labels[position]), centers.shape[0])
        if ints[step.LAYOUT_RUN]:
            _scratch.last_layout = LAYOUTS[ints[step.LAYOUT_RUN]]
            return squares
        # the float scratch was too small, and nothing was written: grow it and run again
        _scratch.floats = np.empty(int(ints[step.FLOATS_NEEDED]) * 5 // 4, np.float64)


def _run_on_copies(labels, rows, centers, written, grad, *settings):
    """``_run`` where an array is not as the entry points take it (compiled for C-contiguous,
    aligned arrays only, one signature per dtype): such an input is read from a C-contiguous
    copy, such a target (a Fortran-ordered ``out``, a strided ``grad_out``) computed in one and
    copied back once the call has succeeded. A rare case, which costs its copies, not a compile."""
    targets = (centers, written, grad)
    computed = [target if target.flags.carray else np.array(target, order="C") for target in targets]
    if written is centers:
        computed[1] = computed[0]
    squares = _run(_readable(labels), _readable(rows), *computed, *settings)
    for target, result in zip(targets, computed):
        if result is not target:
            np.copyto(target, result)
    return squares


# from 4 MB on, zeros are filled by every thread
PARALLEL_ZEROS_BYTES = 1 << 22


def zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """``np.zeros``, filled by every thread when large. A large ``np.zeros`` gets fresh pages from
    the kernel, which zeroes them one fault at a time on one core (measured: a 20 MB K x D array,
    rule pytorch's grad_centers at M, 440 us; this, 190 us)."""
    if math.prod(shape) * np.dtype(dtype).itemsize < PARALLEL_ZEROS_BYTES:
        return np.zeros(shape, dtype=dtype)
    array = np.empty(shape, dtype)
    with _one_launch_at_a_time():
        memory.fill_zeros.compiled(array.dtype)(array.reshape(-1))
    return array


def gather_centers(centers: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return ``centers[labels]``, a new (B, D) array."""
    if not (centers.flags.c_contiguous and centers.flags.aligned):
        return centers[labels]  # NumPy's own gather: no K x D copy to make the kernel's layout
    out = np.empty((labels.size, centers.shape[1]), dtype=centers.dtype)
    with _one_launch_at_a_time():
        memory.gather_rows.compiled(centers.dtype)(_readable(centers), _readable(labels), out)
    return out


def scatter_sub_update(
    centers: np.ndarray, labels: np.ndarray, updates: np.ndarray, *, deterministic: bool = False,
    copy_from: np.ndarray | None = None, layout: str = "auto",
) -> None:
    """Subtract ``updates[i]`` from ``centers[labels[i]]`` for every i, duplicates accumulating
    (after copying ``copy_from`` into ``centers``, when given). A label out of range raises
    SPEC's ``IndexError`` before anything is written. (``deterministic``, part of the signature
    every backend shares, changes nothing here: results are always the same bits.)"""
    if copy_from is not None:
        np.copyto(centers, copy_from)
    # the scatter writes no grad: an empty stand-in (not ``updates``, which may be read-only)
    no_grad = np.empty((0, centers.shape[1]), dtype=centers.dtype)
    _run(labels, updates, centers, centers, no_grad, False, SCATTER_SUB, layout)


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
    squares = _run(labels, features, centers, written, grad, True, rule, layout)
    return float(rule.loss_scale * squares)


# Codebooks (``centerkern.codebooks``): the kernels of ``codebooks`` on C-contiguous arrays. A
# state array laid out otherwise is updated in a C-contiguous copy, copied back once the call
# has succeeded, as ``_run_on_copies`` does for the center-loss step.

_NO_WEIGHTS = np.empty(0, np.float64)


def _order_scratch(batch_size: int, num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty(num_codes + 1, np.int64), np.empty(batch_size, np.int64)


def _item_rows(num_codes: int, width: int) -> np.ndarray:
    """One float64 row per parallel work item, where its thread sums a code's rows."""
    return np.empty(((num_codes + codebooks.CODES_PER_ITEM - 1) // codebooks.CODES_PER_ITEM, width), np.float64)


def _in_place(kernel, dtype, inputs: tuple, states: tuple, after: tuple) -> None:
    """Run ``kernel`` (``codebooks.Regimes``, compiled for ``dtype``, on one thread or every
    thread by the call's size) on read-only ``inputs`` and on ``states`` updated in place
    (through C-contiguous copies where they are not), the settings and scratch ``after`` them."""
    computed = [state if state.flags.carray else np.array(state, order="C") for state in states]
    entry = kernel.of(sum(array.size for array in (*inputs, *states)))
    with _one_launch_at_a_time() if entry is kernel.parallel else _NO_LOCK:
        entry.compiled(dtype)(*(_readable(x) for x in inputs), *computed, *after)
    for state, result in zip(states, computed):
        if result is not state:
            np.copyto(state, result)


def _weights(weights):
    return _NO_WEIGHTS if weights is None else weights


def assign_codes(features, codebook, codes, distances) -> None:
    """Write each row's nearest code (squared Euclidean distance, the lowest index on a tie) and
    its distance: the reference's tiles (``numpy_reference.assign_in_tiles``), with the products
    in the features' dtype (float32 BLAS is twice float64's speed). NumPy's, not a kernel: a
    parallel kernel between BLAS calls measured slower, its threads and BLAS's, which spin for a
    while after each product, sharing the cores tile after tile (about 4x at N = 8192,
    K = 1024, D = 64 on 2 cores)."""
    assign_in_tiles(features, codebook, codes, distances, features.dtype)


def class_sums(features, codes, weights, counts, sums) -> None:
    """Write the per-code weight sums and weighted feature sums of the batch (float64)."""
    starts, order = _order_scratch(codes.size, counts.size)
    _in_place(codebooks.class_sums, features.dtype, (features, codes, _weights(weights)), (counts, sums),
              (starts, order))


def ema_step(features, codes, weights, cluster_size, embed_avg, embed, settings) -> None:
    """The EMA codebook update of ``settings`` in place, the batch's sums taken on the way."""
    num_codes = cluster_size.size
    starts, order = _order_scratch(codes.size, num_codes)
    _in_place(codebooks.ema_step, features.dtype, (features, codes, _weights(weights)), (cluster_size, embed_avg, embed),
              (settings.decay, settings.eps, settings.laplace,
               starts, order, np.empty(num_codes, np.float64), _item_rows(num_codes, features.shape[1])))


def ema_apply(counts, sums, cluster_size, embed_avg, embed, settings) -> None:
    """The EMA codebook update of ``settings`` from per-code ``counts`` and ``sums`` (float64)."""
    _in_place(codebooks.ema_apply, embed.dtype, (counts, sums), (cluster_size, embed_avg, embed),
              (settings.decay, settings.eps, settings.laplace, np.empty(cluster_size.size, np.float64)))


def kmeans_update(features, codes, weights, centers, weight_sums) -> None:
    """Mini-batch k-means' update (scikit-learn's ``_mini_batch_step``) in place."""
    starts, order = _order_scratch(codes.size, centers.shape[0])
    _in_place(codebooks.kmeans_update, features.dtype, (features, codes, _weights(weights)), (centers, weight_sums),
              (starts, order, _item_rows(centers.shape[0], features.shape[1])))
