"""The codebook functions (``centerkern.codebooks``) on the GPU: host functions with the
signatures of the other backends' codebook functions (``assign_codes``, ``class_sums``,
``ema_apply``, ``ema_step``, ``kmeans_update``), on Numba device arrays (or anything with
``__cuda_array_interface__``, seen through ``numba.cuda.as_cuda_array``), queued on ``stream``
(Numba's default stream where None); and ``CodebookArrays``, one call's arrays as
``centerkern.codebooks`` checks them.

The kernels, and why they are laid out as they are, are in ``codebook_kernels``. What Python does
around them: temporaries of the call (the float64 sums, the new cluster sizes) from Numba's
allocator on the call's stream; with ``deterministic=True``, the rows ordered by code on the
host (a stable ``argsort`` of a copy of the codes) and that order's offsets copied back; for the
checks, the verdict of ``check_codes`` read by the host (one wait for the GPU) before anything
of the caller's is written.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from .arrays import DeviceArrays
from .codebook_kernels import (ASSIGN_ROWS, COLUMNS, KERNELS, MOST_BLOCKS, REDUCE_THREADS, ROWS_PER_BLOCK, THREADS,
                               check_codes, ema_codes, ema_sizes, gather_rows, kmeans_centers, kmeans_weights,
                               nearest_codes, ordered_sums, scatter_sums)
from .kernels import fill_rows, fill_vector
from .views import DeviceView

__all__ = ["CheckedCodes", "CodebookArrays", "KERNELS", "assign_codes", "class_sums", "ema_apply", "ema_step",
           "gather_codes", "kmeans_update"]

_MOST_Y_BLOCKS = 65535  # the CUDA limit of gridDim.y


# --------------------------------------------------------------------------- launch shapes


def _grid_1d(size: int) -> int:
    return max(1, min(MOST_BLOCKS, -(-size // THREADS)))


def _grid_rows(rows: int) -> tuple[int, int]:
    """(1, blocks) of a kernel taking ``ROWS_PER_BLOCK`` rows (or codes) a block along y."""
    return 1, max(1, min(MOST_BLOCKS, _MOST_Y_BLOCKS, -(-rows // ROWS_PER_BLOCK)))


_BLOCK_2D = (COLUMNS, ROWS_PER_BLOCK)


def _stream(stream: Any) -> Any:
    return cuda.default_stream() if stream is None else stream


def _numba(x: Any) -> Any:
    """A Numba device array of ``x`` (itself where it is one already; None stays None)."""
    if x is None or getattr(x, "__cuda_ndarray__", False):
        return x
    return cuda.as_cuda_array(x)


def _nothing(dtype, stream) -> Any:
    """An empty vector: what the kernels read as "no weights" or "no counts"."""
    return cuda.device_array(0, dtype=dtype, stream=stream)


def _fill(array: Any, value: float, stream: Any) -> None:
    if array.size == 0:
        return
    if array.ndim == 1:
        fill_vector[_grid_1d(array.size), THREADS, stream](array, value)
    else:
        fill_rows[max(1, min(MOST_BLOCKS, array.shape[0])), COLUMNS, stream](array, value)


# --------------------------------------------------------------------------- host functions


def assign_codes(features, codebook, codes, distances, *, stream=None) -> None:
    """Write each row's nearest code and its squared Euclidean distance, one thread a row: never
    an N x K matrix.

    The ``cuda`` twin of the other backends' ``assign_codes``: nothing is checked here
    (``centerkern.codebooks.assign_codes`` checks its inputs, then calls this).

    Parameters
    ----------
    features : array, shape (N, D)
        float32 or float64, a device array.
    codebook : array, shape (K, D)
        The codes, in the dtype of ``features``; K >= 1 where N >= 1.
    codes : array of int64, shape (N,)
        Written: each row's code of least squared distance, the lowest index among equal ones
        (as ``argmin``).
    distances : array, shape (N,)
        Written, in the dtype of ``features``: each row's squared distance to its code, summed
        in float64 from the row and the code.
    stream : None or Numba stream, optional
        Where the kernel is queued; None: Numba's default stream.

    Raises
    ------
    TypeError
        If an array is not a device array (has no ``__cuda_array_interface__``).

    Examples
    --------
    >>> import numpy as np
    >>> from numba import cuda
    >>> import centerkern.cuda
    >>> features = cuda.to_device(np.array([[0.9, 1.2], [0.1, -0.1]]))
    >>> codebook = cuda.to_device(np.array([[0.0, 0.0], [1.0, 1.0]]))
    >>> codes, distances = cuda.device_array(2, np.int64), cuda.device_array(2)
    >>> centerkern.cuda.assign_codes(features, codebook, codes, distances)
    >>> codes.copy_to_host(), distances.copy_to_host().round(6)
    (array([1, 0]), array([0.05, 0.02]))
    """
    stream = _stream(stream)
    features, codebook, codes, distances = (_numba(x) for x in (features, codebook, codes, distances))
    if features.shape[0] == 0:
        return
    blocks = -(-features.shape[0] // ASSIGN_ROWS)
    nearest_codes[blocks, ASSIGN_ROWS, stream](features, codebook, codes, distances)


def _order_by_code(codes, num_codes: int, stream) -> tuple[Any, Any]:
    """On the device: the rows ordered by code, stably (each code's rows in batch order), and
    each code's offsets into that order; sorted on the host, from a copy of the codes."""
    host = codes.copy_to_host(stream=stream)
    stream.synchronize()
    order = np.argsort(host, kind="stable").astype(np.int64)
    starts = np.zeros(num_codes + 1, np.int64)
    np.cumsum(np.bincount(host, minlength=num_codes), out=starts[1:])
    return cuda.to_device(order, stream=stream), cuda.to_device(starts, stream=stream)


def class_sums(features, codes, weights, counts, sums, *, deterministic=False, stream=None) -> None:
    """Write each code's weight and weighted sum of rows, in float64, duplicates added.

    The ``cuda`` twin of the other backends' ``class_sums``: nothing is checked here
    (``centerkern.codebooks.class_sums`` checks its inputs, the codes' range on the device).

    Parameters
    ----------
    features : array, shape (N, D)
        float32 or float64, a device array.
    codes : array of int64, shape (N,)
        Each row's code, in [0, K).
    weights : None or array of float64, shape (N,)
        Each row's weight; None: every row weighs 1.
    counts : array of float64, shape (K,)
        Written: the weight of each code's rows (zero where no row has the code).
    sums : array of float64, shape (K, D)
        Written: the weighted sum of each code's rows.
    deterministic : bool, optional
        False (the default): float64 atomics, whose order (and so the last bits) may change from
        run to run. True: each code's rows added in batch order by one thread per (code,
        column), the rows ordered by code on the host, the same bits on every run.
    stream : None or Numba stream, optional
        Where the kernels are queued; None: Numba's default stream.

    Raises
    ------
    TypeError
        If an array is not a device array (has no ``__cuda_array_interface__``).

    Examples
    --------
    >>> import numpy as np
    >>> from numba import cuda
    >>> import centerkern.cuda
    >>> features = cuda.to_device(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    >>> codes = cuda.to_device(np.array([2, 0, 2], np.int64))
    >>> counts, sums = cuda.device_array(3), cuda.device_array((3, 2))
    >>> centerkern.cuda.class_sums(features, codes, None, counts, sums, deterministic=True)
    >>> counts.copy_to_host()
    array([1., 0., 2.])
    >>> sums.copy_to_host()
    array([[3., 4.],
           [0., 0.],
           [6., 8.]])
    """
    stream = _stream(stream)
    features, codes, weights, counts, sums = (_numba(x) for x in (features, codes, weights, counts, sums))
    weights = _nothing(np.float64, stream) if weights is None else weights
    num_codes = counts.size
    if deterministic:
        if num_codes == 0:
            return
        order, starts = _order_by_code(codes, num_codes, stream)
        ordered_sums[_grid_rows(num_codes), _BLOCK_2D, stream](features, order, starts, weights, counts, sums)
        return
    _fill(counts, 0.0, stream)
    _fill(sums, 0.0, stream)
    if codes.size:
        scatter_sums[_grid_rows(codes.size), _BLOCK_2D, stream](features, codes, weights, counts, sums)


def ema_apply(counts, sums, cluster_size, embed_avg, embed, settings, *, stream=None) -> None:
    """The EMA codebook update from a batch's per-code counts and sums, in place.

    The ``cuda`` twin of the other backends' ``ema_apply`` (see ``centerkern.codebooks`` for
    the formulas): the new cluster sizes and their total in one block, summed in a fixed order,
    then each (code, column) on its own, in float64.

    Parameters
    ----------
    counts : array, shape (K,)
        Each code's batch count ``n_k`` (read as float64).
    sums : array, shape (K, D)
        Each code's batch sum ``s_k`` (read as float64).
    cluster_size : array, shape (K,)
        ``N_k``, float32 or float64; updated in place.
    embed_avg : array, shape (K, D)
        ``m_k``, in the dtype of ``cluster_size``; updated in place.
    embed : array, shape (K, D)
        The codes ``e_k``, in the same dtype; overwritten with the smoothed averages.
    settings : EMASettings
        ``centerkern._core.codebooks.EMASettings(decay, eps, laplace)``.
    stream : None or Numba stream, optional
        Where the kernels are queued; None: Numba's default stream.

    Raises
    ------
    TypeError
        If an array is not a device array (has no ``__cuda_array_interface__``).

    Examples
    --------
    >>> import numpy as np
    >>> from numba import cuda
    >>> import centerkern.cuda
    >>> from centerkern._core.codebooks import EMASettings
    >>> counts, sums = cuda.to_device(np.array([0.0, 2.0])), cuda.to_device(np.array([[0.0, 0.0], [6.0, 6.0]]))
    >>> cluster_size, embed_avg = cuda.to_device(np.ones(2)), cuda.to_device(np.array([[0.0, 0.0], [1.0, 1.0]]))
    >>> embed = cuda.to_device(np.array([[0.0, 0.0], [1.0, 1.0]]))
    >>> centerkern.cuda.ema_apply(counts, sums, cluster_size, embed_avg, embed, EMASettings(0.5, 0.0, False))
    >>> cluster_size.copy_to_host(), embed.copy_to_host()[1]
    (array([0.5, 1.5]), array([2.33333333, 2.33333333]))
    """
    stream = _stream(stream)
    counts, sums, cluster_size, embed_avg, embed = (_numba(x) for x in (counts, sums, cluster_size, embed_avg, embed))
    num_codes = embed.shape[0]
    if num_codes == 0:
        return
    new_sizes = cuda.device_array(num_codes, dtype=np.float64, stream=stream)
    total = cuda.device_array(1, dtype=np.float64, stream=stream)
    ema_sizes[1, REDUCE_THREADS, stream](cluster_size, counts, float(settings.decay), new_sizes, total)
    ema_codes[_grid_rows(num_codes), _BLOCK_2D, stream](sums, new_sizes, total, embed_avg, embed,
                                                         float(settings.decay), float(settings.eps),
                                                         bool(settings.laplace))


def _batch_sums(features, codes, weights, num_codes: int, deterministic: bool, stream) -> tuple[Any, Any]:
    counts = cuda.device_array(num_codes, dtype=np.float64, stream=stream)
    sums = cuda.device_array((num_codes, features.shape[1]), dtype=np.float64, stream=stream)
    class_sums(features, codes, weights, counts, sums, deterministic=deterministic, stream=stream)
    return counts, sums


def ema_step(features, codes, weights, cluster_size, embed_avg, embed, settings, *, deterministic=False,
             stream=None) -> None:
    """The EMA codebook update of a batch whose codes are known, in place: ``class_sums`` into
    float64 temporaries, then ``ema_apply``.

    Parameters
    ----------
    features : array, shape (N, D)
        float32 or float64, a device array.
    codes : array of int64, shape (N,)
        Each row's code, in [0, K).
    weights : None or array of float64, shape (N,)
        Each row's weight; None: every row weighs 1.
    cluster_size, embed_avg, embed : arrays
        The state, as for ``ema_apply``, in the dtype of ``features``; updated in place.
    settings : EMASettings
        ``centerkern._core.codebooks.EMASettings(decay, eps, laplace)``.
    deterministic : bool, optional
        The sums as ``class_sums`` takes them with ``deterministic``.
    stream : None or Numba stream, optional
        Where the kernels are queued; None: Numba's default stream.

    Raises
    ------
    TypeError
        If an array is not a device array (has no ``__cuda_array_interface__``).

    Examples
    --------
    >>> import numpy as np
    >>> from numba import cuda
    >>> import centerkern.cuda
    >>> from centerkern._core.codebooks import EMASettings
    >>> features, codes = cuda.to_device(np.array([[2.0, 2.0], [4.0, 4.0]])), cuda.to_device(np.array([1, 1]))
    >>> cluster_size, embed_avg = cuda.to_device(np.ones(2)), cuda.to_device(np.array([[0.0, 0.0], [1.0, 1.0]]))
    >>> embed = cuda.to_device(np.array([[0.0, 0.0], [1.0, 1.0]]))
    >>> centerkern.cuda.ema_step(features, codes, None, cluster_size, embed_avg, embed, EMASettings(0.5, 0.0, False))
    >>> cluster_size.copy_to_host(), embed.copy_to_host()[1]
    (array([0.5, 1.5]), array([2.33333333, 2.33333333]))
    """
    stream = _stream(stream)
    features, codes, weights = (_numba(x) for x in (features, codes, weights))
    counts, sums = _batch_sums(features, codes, weights, _numba(embed).shape[0], deterministic, stream)
    ema_apply(counts, sums, cluster_size, embed_avg, embed, settings, stream=stream)


def kmeans_update(features, codes, weights, centers, weight_sums, *, deterministic=False, stream=None) -> None:
    """Mini-batch k-means' update of a batch whose codes are known, in place (scikit-learn's
    ``_mini_batch_step``).

    Each center the batch holds moves to the weighted mean of itself (weighing
    ``weight_sums[k]``) and its rows; ``weight_sums`` grows by the batch's weights; centers the
    batch does not hold stay as they are.

    Parameters
    ----------
    features : array, shape (N, D)
        float32 or float64, a device array.
    codes : array of int64, shape (N,)
        Each row's center, in [0, K).
    weights : None or array of float64, shape (N,)
        Each row's weight; None: every row weighs 1.
    centers : array, shape (K, D)
        In the dtype of ``features``; updated in place.
    weight_sums : array, shape (K,)
        In the dtype of ``features``; updated in place.
    deterministic : bool, optional
        The sums as ``class_sums`` takes them with ``deterministic``.
    stream : None or Numba stream, optional
        Where the kernels are queued; None: Numba's default stream.

    Raises
    ------
    TypeError
        If an array is not a device array (has no ``__cuda_array_interface__``).

    Examples
    --------
    >>> import numpy as np
    >>> from numba import cuda
    >>> import centerkern.cuda
    >>> features, codes = cuda.to_device(np.array([[2.0], [4.0]])), cuda.to_device(np.array([0, 0]))
    >>> centers, weight_sums = cuda.to_device(np.array([[0.0], [10.0]])), cuda.to_device(np.array([1.0, 0.0]))
    >>> centerkern.cuda.kmeans_update(features, codes, None, centers, weight_sums)
    >>> centers.copy_to_host().ravel(), weight_sums.copy_to_host()
    (array([ 2., 10.]), array([3., 0.]))
    """
    stream = _stream(stream)
    features, codes, weights, centers, weight_sums = (_numba(x) for x in (features, codes, weights, centers,
                                                                           weight_sums))
    num_codes = centers.shape[0]
    if num_codes == 0:
        return
    counts, sums = _batch_sums(features, codes, weights, num_codes, deterministic, stream)
    kmeans_centers[_grid_rows(num_codes), _BLOCK_2D, stream](counts, sums, centers, weight_sums)
    kmeans_weights[_grid_1d(num_codes), THREADS, stream](counts, weight_sums)


def gather_codes(codebook, codes, rows, *, stream=None) -> None:
    """Write ``rows[i] = codebook[codes[i]]`` (codes in range)."""
    stream = _stream(stream)
    codebook, codes, rows = (_numba(x) for x in (codebook, codes, rows))
    if codes.size:
        gather_rows[_grid_rows(codes.size), _BLOCK_2D, stream](codebook, codes, rows)


# --------------------------------------------------------------------------- one call's arrays


class CheckedCodes(NamedTuple):
    """What ``CodebookArrays.checked_codes`` gives: the codes as int64, the weights as float64
    (None where none were given), each code's number of rows (int64; None where not asked for),
    the first bad code as (position, value) and the position of the first bad weight (None where
    all are good)."""

    codes: DeviceView
    weights: DeviceView | None
    counts: DeviceView | None
    bad_code: tuple[int, int] | None
    bad_weight: int | None


class CodebookArrays(DeviceArrays):
    """``DeviceArrays`` for the codebook functions: the call's device arrays, stream and
    allocator, with the checks of codes and weights that run on the device, and ``run``, which
    calls a host function of this module on them in the arrays' device context and stream."""

    def checked_codes(self, codes: DeviceView, num_codes: int, weights: DeviceView | None,
                      count: bool) -> CheckedCodes:
        """``check_codes`` on a vector of codes of any integer dtype (and the weights, of any
        real dtype, one per code), then its verdict, read by the host."""
        size = codes.size
        checked = self.empty((size,), np.int64)
        checked_weights = None if weights is None else self.empty((size,), np.float64)
        counts = self.empty((num_codes,), np.int64) if count else None
        with self.device_context():
            stream = self.memory.stream
            if counts is not None:
                _fill(counts.numba(), 0, stream)
            status = cuda.to_device(np.full(2, size, np.int64), stream=stream)
            if size:
                no_weights = _nothing(np.float64, stream)
                check_codes[_grid_1d(size), THREADS, stream](
                    codes.numba(), num_codes, no_weights if weights is None else weights.numba(), checked.numba(),
                    no_weights if weights is None else checked_weights.numba(),
                    _nothing(np.int64, stream) if counts is None else counts.numba(), status)
            verdict = status.copy_to_host(stream=stream)
            stream.synchronize()
            bad_code, bad_weight = (int(v) for v in verdict)
            value = None
            if bad_code < size:
                value = int(codes.numba()[bad_code:bad_code + 1].copy_to_host(stream=stream)[0])
                stream.synchronize()
        return CheckedCodes(checked, checked_weights, counts, None if value is None else (bad_code, value),
                            bad_weight if bad_weight < size else None)

    def run(self, function, *arguments, **options) -> None:
        """``function`` (a host function of this module) on ``arguments`` (views as Numba arrays),
        in the arrays' device context, on the call's stream."""
        with self.device_context():
            function(*(a.numba() if isinstance(a, DeviceView) else a for a in arguments), stream=self.memory.stream,
                     **options)

    def to_host(self, view: DeviceView) -> np.ndarray:
        """A result copied to host memory (a call on host arrays only)."""
        with self.device_context():
            host = view.numba().copy_to_host(stream=self.memory.stream)
            self.memory.stream.synchronize()
        return host
