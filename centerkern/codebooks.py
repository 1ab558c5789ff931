"""Codebooks and k-means on the center-loss kernels: VQ-VAE EMA updates and mini-batch k-means.

The update a codebook makes is the center-loss update: every code moved by the sum of the rows
assigned to it, duplicates added, nothing else touched. vector-quantize-pytorch and EnCodec
form that sum with a one-hot N x K matrix (an O(N K D) product for an O(N D) sum; at N = 65536
rows and K = 8192 codes the matrix alone is 2 GiB); here it is a scatter, in float64, the same
bits for any thread count.

- ``assign_codes``: each row's nearest code and its squared distance, a tile of rows at a time
  (never the N x K distance matrix), ties to the lowest index as ``argmin``;
- ``class_sums``: each code's (weighted) count and sum of rows, float64;
- ``ema_update``: the EMA codebook update with Laplace smoothing (EnCodec, Sonnet) or
  vector-quantize-pytorch's, in place on ``cluster_size``, ``embed_avg`` and ``embed``;
  ``ema_apply`` does it from counts and sums already summed (across processes, say);
- ``quantize``: the forward of a VQ layer and its EMA update in one call (nearest codes, the
  quantized rows, the update);
- ``kmeans_update`` and ``MiniBatchKMeans``: scikit-learn's mini-batch k-means update.

The formulas, with γ the decay, ε the smoothing constant, ``n_k`` and ``s_k`` the batch's
count and sum of code k (weighted by ``weights`` where given)::

    N_k ← γ N_k + (1 − γ) n_k           m_k ← γ m_k + (1 − γ) s_k
    laplace:       e_k = m_k / Ñ_k,  Ñ_k = (N_k + ε) / (Σ_j N_j + K ε) · Σ_j N_j
    current_code:  e_k = (m_k + ε e_k) / (N_k + ε)
    k-means:       c_k ← (W_k c_k + s_k) / (W_k + n_k),  W_k ← W_k + n_k   (codes with n_k > 0)

Host arrays (NumPy, torch CPU tensors, anything DLPack exports) run the ``numba`` kernels by
default; ``backend="numpy"`` runs the reference. Device arrays (torch CUDA tensors, CuPy and
Numba arrays) run the ``cuda`` kernels (``centerkern.cuda.codebooks``) on the caller's stream:
results are arrays of the caller's framework on the same device, state arrays are updated in
place, and codes and weights are checked on the device before anything is written. Its sums
are float64 atomics by default, whose order (and so last bits) may change from run to run;
``deterministic=True`` adds each code's rows in batch order instead, as the host backends do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _backends
from . import _codebooks_on_device as on_device
from ._core import codebooks as checks
from ._core.interop import converter_like
from ._core.validation import check_choice
from ._results import Assignment, ClassSums, Quantized

__all__ = ["Assignment", "ClassSums", "MiniBatchKMeans", "Quantized", "SMOOTHINGS", "assign_codes", "class_sums",
           "ema_apply", "ema_update", "kmeans_update", "quantize"]

#: The values ``smoothing=`` accepts: ``"laplace"`` (EnCodec, Sonnet) and ``"current_code"``
#: (vector-quantize-pytorch 1.34); the formulas are in the module's docstring.
SMOOTHINGS = checks.SMOOTHINGS

_HOST_CHOICES = ("auto", *_backends.HOST)


def _backend(backend: Any):
    name = check_choice(backend, "backend", _HOST_CHOICES)
    return _backends.load("numba" if name == "auto" else name)


def assign_codes(features: Any, codebook: Any, *, backend: str = "auto") -> Assignment:
    """Each row's nearest code, without the N x K distance matrix.

    Parameters
    ----------
    features : array, shape (N, D), float32 or float64
    codebook : array, shape (K, D), the dtype of features
    backend : {"auto", "numpy", "numba", "cuda"}, optional
        ``"auto"`` (the default) takes ``cuda`` where an input is a device array, else ``numba``.

    Returns
    -------
    Assignment
        ``codes`` (int64, N): the code of least squared Euclidean distance, the lowest index
        among equal ones (as ``argmin``); ``distances`` (N, the features' dtype): that distance.

    Notes
    -----
    The distance matrix is computed a tile of rows at a time (at most 2^20 entries) as
    ``|e|^2 - 2 x.e``; the distance returned is computed again, exactly, from the row and its
    code. Codes whose distances differ by less than the rounding of that product may be told
    apart differently by another implementation.

    Raises
    ------
    TypeError
        If an array is not float32 or float64, or the dtypes differ (no silent cast).
    ValueError
        If a shape does not fit, or a setting is out of its range.

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.codebooks import assign_codes
    >>> codebook = np.array([[0.0, 0.0], [1.0, 1.0]])
    >>> assign_codes(np.array([[0.9, 1.2], [0.1, -0.1], [0.5, 0.5]]), codebook)
    Assignment(codes=array([1, 0, 0]), distances=array([0.05, 0.02, 0.5 ]))
    """
    device = on_device.on_device(backend, features, codebook)
    if device is not None:
        return on_device.assign_codes(device, features, codebook)
    module = _backend(backend)
    rows, codebook = checks.features_and_codebook(features, codebook, "codebook")
    checks.check_has_codes(rows, codebook, "codebook")
    codes = np.empty(rows.shape[0], np.int64)
    distances = np.empty(rows.shape[0], rows.dtype)
    module.assign_codes(rows, codebook, codes, distances)
    convert = converter_like(features, host=True)
    return Assignment(convert(codes), convert(distances))


def class_sums(features: Any, codes: Any, num_codes: int, *, weights: Any = None, backend: str = "auto",
               deterministic: bool = False) -> ClassSums:
    """Each code's count and sum of rows, duplicates added, in float64.

    Parameters
    ----------
    features : array, shape (N, D), float32 or float64
    codes : array of int, N values in [0, num_codes)
    num_codes : int
        K.
    weights : array, shape (N,), optional
        Each row's weight (finite, >= 0); a 0/1 mask leaves rows out. Default: 1.
    backend : {"auto", "numpy", "numba", "cuda"}, optional
    deterministic : bool, optional
        ``cuda`` only: each code's rows added in batch order, without atomics, the same bits on
        every run (the host backends always add so).

    Returns
    -------
    ClassSums
        ``counts`` (float64, K): the weight of each code's rows; ``sums`` (float64, K x D): their
        weighted sum. Every code has its row, zero where no row has the code.

    Raises
    ------
    TypeError
        If an array is not float32 or float64, or the dtypes differ (no silent cast).
    ValueError
        If a shape does not fit, or a setting is out of its range.
    IndexError
        If a code lies outside [0, num_codes).

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.codebooks import class_sums
    >>> counts, sums = class_sums(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), [2, 0, 2], 3)
    >>> counts
    array([1., 0., 2.])
    >>> sums
    array([[3., 4.],
           [0., 0.],
           [6., 8.]])
    """
    device = on_device.on_device(backend, features, codes, weights)
    if device is not None:
        return on_device.class_sums(device, features, codes, _num_codes(num_codes), weights, deterministic)
    module = _backend(backend)
    num_codes = _num_codes(num_codes)
    rows = np.ascontiguousarray(checks.float_matrix(features, "features"))
    checked_codes = checks.codes_of(codes, rows, num_codes)
    weights = checks.sample_weights(weights, rows)
    counts = np.empty(num_codes, np.float64)
    sums = np.empty((num_codes, rows.shape[1]), np.float64)
    module.class_sums(rows, checked_codes, weights, counts, sums)
    convert = converter_like(features, host=True)
    return ClassSums(convert(counts), convert(sums))


def ema_update(features: Any, codes: Any, cluster_size: Any, embed_avg: Any, embed: Any, *, decay: float = 0.99,
               eps: float = 1e-5, smoothing: str = "laplace", weights: Any = None, backend: str = "auto",
               deterministic: bool = False) -> Any:
    """The EMA codebook update of a batch whose codes are known, in place.

    Parameters
    ----------
    features : array, shape (N, D), float32 or float64
    codes : array of int, N values in [0, K)
    cluster_size : array, shape (K,), the features' dtype
        The EMA count of each code, ``N_k``; updated in place.
    embed_avg : array, shape (K, D)
        The EMA sum of each code's rows, ``m_k``; updated in place.
    embed : array, shape (K, D)
        The codes, ``e_k``; overwritten with the smoothed ``m_k / N_k``.
    decay : float, optional
        γ in [0, 1]. 0.99 as EnCodec (vector-quantize-pytorch defaults to 0.8).
    eps : float, optional
        ε, the smoothing constant (>= 0).
    smoothing : {"laplace", "current_code"}, optional
        How counts near zero are smoothed; see the module's formulas (``SMOOTHINGS``). Laplace's
        divides by ``Σ N``: while every cluster size is zero (a fresh codebook's first batch
        empty), the codes become NaN, as in EnCodec.
    weights : array, shape (N,), optional
        Each row's weight; a 0/1 mask leaves rows out (vector-quantize-pytorch's ``mask``).
    backend : {"auto", "numpy", "numba", "cuda"}, optional
    deterministic : bool, optional
        As for ``class_sums``.

    Returns
    -------
    array of int64, shape (K,)
        How many rows each code got in this batch (zero: a dead code in this batch).

    Raises
    ------
    IndexError
        If a code lies outside [0, K); nothing is written.

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.codebooks import ema_update
    >>> embed = np.array([[0.0, 0.0], [1.0, 1.0]])
    >>> cluster_size, embed_avg = np.ones(2), embed.copy()
    >>> ema_update(np.array([[2.0, 2.0], [4.0, 4.0]]), [1, 1], cluster_size, embed_avg, embed, decay=0.5, eps=0.0)
    array([0, 2])
    >>> cluster_size, embed[1]
    (array([0.5, 1.5]), array([2.33333333, 2.33333333]))
    """
    device = on_device.on_device(backend, features, codes, cluster_size, embed_avg, embed, weights)
    if device is not None:
        return on_device.ema_update(device, features, codes, (cluster_size, embed_avg, embed),
                                     checks.ema_settings(decay, eps, smoothing), weights, deterministic)
    module = _backend(backend)
    settings = checks.ema_settings(decay, eps, smoothing)
    rows, embed_checked = checks.features_and_codebook(features, embed, "embed")
    checked_codes = checks.codes_of(codes, rows, embed_checked.shape[0])
    weights = checks.sample_weights(weights, rows)
    states = checks.ema_states(cluster_size, embed_avg, embed, embed_checked,
                               {"features": rows, "codes": checked_codes, "weights": weights})
    module.ema_step(rows, checked_codes, weights, *states, settings)
    return converter_like(features, host=True)(np.bincount(checked_codes, minlength=states[0].size))


def ema_apply(counts: Any, sums: Any, cluster_size: Any, embed_avg: Any, embed: Any, *, decay: float = 0.99,
              eps: float = 1e-5, smoothing: str = "laplace", backend: str = "auto") -> None:
    """The EMA codebook update from counts and sums already taken (``class_sums``, added across
    processes), in place: ``ema_update`` is ``class_sums`` then this, in one pass.

    Parameters
    ----------
    counts : array, shape (K,)
        ``n_k``, as ``class_sums`` gives it.
    sums : array, shape (K, D)
        ``s_k``.
    cluster_size, embed_avg, embed : arrays
        As for ``ema_update``, updated in place.
    decay, eps, smoothing, backend
        As for ``ema_update``.

    Raises
    ------
    TypeError
        If an array is not float32 or float64, or the dtypes differ (no silent cast).
    ValueError
        If a shape does not fit, or a setting is out of its range.
        A state array that is read-only or shares memory with another is refused before anything
        is written.

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.codebooks import class_sums, ema_apply
    >>> embed = np.array([[0.0, 0.0], [1.0, 1.0]])
    >>> cluster_size, embed_avg = np.ones(2), embed.copy()
    >>> counts, sums = class_sums(np.array([[2.0, 2.0], [4.0, 4.0]]), [1, 1], 2)
    >>> ema_apply(counts, sums, cluster_size, embed_avg, embed, decay=0.5, eps=0.0)
    >>> embed[1]
    array([2.33333333, 2.33333333])
    """
    device = on_device.on_device(backend, counts, sums, cluster_size, embed_avg, embed)
    if device is not None:
        return on_device.ema_apply(device, counts, sums, (cluster_size, embed_avg, embed),
                                    checks.ema_settings(decay, eps, smoothing))
    module = _backend(backend)
    settings = checks.ema_settings(decay, eps, smoothing)
    embed_checked = checks.float_matrix(embed, "embed")
    num_codes, width = embed_checked.shape
    counts = checks.float64_input(counts, "counts", (num_codes,))
    sums = checks.float64_input(sums, "sums", (num_codes, width))
    states = checks.ema_states(cluster_size, embed_avg, embed, embed_checked, {"counts": counts, "sums": sums})
    module.ema_apply(counts, sums, *states, settings)


def quantize(features: Any, cluster_size: Any, embed_avg: Any, embed: Any, *, decay: float = 0.99,
             eps: float = 1e-5, smoothing: str = "laplace", weights: Any = None, update: bool = True,
             backend: str = "auto", deterministic: bool = False) -> Quantized:
    """A VQ layer's forward and its EMA codebook update: each row's nearest code, the quantized
    rows (the codes before the update), then ``ema_update`` on those codes.

    Parameters
    ----------
    features : array, shape (N, D)
    cluster_size, embed_avg, embed : arrays
        The codebook's state, as for ``ema_update``; updated in place when ``update``.
    decay, eps, smoothing, weights, backend, deterministic
        As for ``ema_update``.
    update : bool, optional
        False: the forward only (evaluation), nothing written.

    Returns
    -------
    Quantized
        ``codes``, ``distances``, ``quantized`` (N x D) and the batch's ``counts`` per code.

    Raises
    ------
    TypeError
        If an array is not float32 or float64, or the dtypes differ (no silent cast).
    ValueError
        If a shape does not fit, or a setting is out of its range.
        Nothing is written when a check fails.

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.codebooks import quantize
    >>> embed = np.array([[0.0, 0.0], [1.0, 1.0]])
    >>> cluster_size, embed_avg = np.ones(2), embed.copy()
    >>> result = quantize(np.array([[0.9, 1.2], [1.1, 0.8]]), cluster_size, embed_avg, embed, decay=0.5)
    >>> result.codes, result.counts
    (array([1, 1]), array([0, 2]))
    >>> result.quantized
    array([[1., 1.],
           [1., 1.]])
    """
    device = on_device.on_device(backend, features, cluster_size, embed_avg, embed, weights)
    if device is not None:
        return on_device.quantize(device, features, (cluster_size, embed_avg, embed),
                                   checks.ema_settings(decay, eps, smoothing), weights, update, deterministic)
    module = _backend(backend)
    settings = checks.ema_settings(decay, eps, smoothing)
    rows, codebook = checks.features_and_codebook(features, embed, "embed")
    checks.check_has_codes(rows, codebook, "embed")
    codes = np.empty(rows.shape[0], np.int64)
    distances = np.empty(rows.shape[0], rows.dtype)
    if update:  # every check before the first write
        weights = checks.sample_weights(weights, rows)
        states = checks.ema_states(cluster_size, embed_avg, embed, codebook, {"features": rows, "weights": weights})
    module.assign_codes(rows, codebook, codes, distances)
    quantized = codebook[codes]  # gathered before the update moves the codes
    if update:
        module.ema_step(rows, codes, weights, *states, settings)
    convert = converter_like(features, host=True)
    return Quantized(convert(codes), convert(distances), convert(quantized),
                     convert(np.bincount(codes, minlength=codebook.shape[0])))


def kmeans_update(features: Any, codes: Any, centers: Any, weight_sums: Any, *, weights: Any = None,
                  backend: str = "auto", deterministic: bool = False) -> Any:
    """Mini-batch k-means' update of a batch whose codes are known, in place (scikit-learn's
    ``MiniBatchKMeans``, its ``_mini_batch_step`` without the random reassignment).

    Each center that the batch holds moves to the weighted mean of itself (weighing
    ``weight_sums[k]``) and its rows; ``weight_sums`` grows by the rows' weights.

    Parameters
    ----------
    features : array, shape (N, D), float32 or float64
    codes : array of int, N values in [0, K)
    centers : array, shape (K, D), the features' dtype; updated in place
    weight_sums : array, shape (K,), the features' dtype; updated in place
    weights : array, shape (N,), optional
        ``sample_weight``. Default: 1.
    backend : {"auto", "numpy", "numba", "cuda"}, optional
    deterministic : bool, optional
        As for ``class_sums``.

    Returns
    -------
    array of int64, shape (K,)
        How many rows each center got in this batch.

    Raises
    ------
    TypeError
        If an array is not float32 or float64, or the dtypes differ (no silent cast).
    ValueError
        If a shape does not fit, or a setting is out of its range.
    IndexError
        If a code lies outside [0, K); nothing is written.

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.codebooks import kmeans_update
    >>> centers, weight_sums = np.array([[0.0], [10.0]]), np.array([1.0, 0.0])
    >>> kmeans_update(np.array([[2.0], [4.0]]), [0, 0], centers, weight_sums)
    array([2, 0])
    >>> centers, weight_sums
    (array([[ 2.],
           [10.]]), array([3., 0.]))
    """
    device = on_device.on_device(backend, features, codes, centers, weight_sums, weights)
    if device is not None:
        return on_device.kmeans_update(device, features, codes, (centers, weight_sums), weights, deterministic)
    module = _backend(backend)
    rows, centers_checked = checks.features_and_codebook(features, centers, "centers")
    checked_codes = checks.codes_of(codes, rows, centers_checked.shape[0])
    weights = checks.sample_weights(weights, rows)
    inputs = {"features": rows, "codes": checked_codes, "weights": weights}
    states = checks.kmeans_states(centers, weight_sums, centers_checked, inputs)
    module.kmeans_update(rows, checked_codes, weights, *states)
    return converter_like(features, host=True)(np.bincount(checked_codes, minlength=centers_checked.shape[0]))


class MiniBatchKMeans:
    """Mini-batch k-means from given initial centers, the update of scikit-learn's
    ``MiniBatchKMeans.partial_fit`` (without its random reassignment of small clusters).

    Parameters
    ----------
    init : array, shape (K, D), float32 or float64
        The initial centers (copied).
    backend : {"auto", "numpy", "numba"}, optional

    Raises
    ------
    TypeError
        If ``init`` is not a float32 or float64 matrix.

    Attributes
    ----------
    cluster_centers_ : ndarray, shape (K, D)
    counts_ : ndarray, shape (K,)
        The weight each center has gathered (scikit-learn's ``_counts``).
    labels_ : ndarray of int64
        The last batch's nearest centers after its update, as scikit-learn's ``labels_``.

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.codebooks import MiniBatchKMeans
    >>> kmeans = MiniBatchKMeans(init=np.array([[0.0], [10.0]]))
    >>> kmeans.partial_fit(np.array([[1.0], [2.0], [9.0]])).cluster_centers_
    array([[1.5],
           [9. ]])
    >>> kmeans.predict(np.array([[6.0]]))
    array([1])
    """

    def __init__(self, init: Any, *, backend: str = "auto"):
        self.cluster_centers_ = np.array(checks.float_matrix(init, "init"), order="C", copy=True)
        _backend(backend)  # an unknown backend fails here, not in the first partial_fit
        self.counts_ = np.zeros(self.cluster_centers_.shape[0], self.cluster_centers_.dtype)
        self.labels_ = np.empty(0, np.int64)
        self.backend = backend

    def partial_fit(self, X: Any, sample_weight: Any = None) -> "MiniBatchKMeans":
        """Assign the batch to the current centers, move them (``kmeans_update``), then label the
        batch with the moved centers (``labels_``).

        Parameters
        ----------
        X : array, shape (N, D)
            The batch, read in the centers' dtype.
        sample_weight : array, shape (N,), optional
            Each row's weight. Default: 1.

        Returns
        -------
        MiniBatchKMeans
            This estimator, moved.

        Raises
        ------
        ValueError
            If the batch's width is not the centers', or a weight is negative or not finite.

        Examples
        --------
        >>> import numpy as np
        >>> from centerkern.codebooks import MiniBatchKMeans
        >>> MiniBatchKMeans(init=np.array([[0.0, 0.0]])).partial_fit(np.array([[2.0, 4.0]])).cluster_centers_
        array([[2., 4.]])
        """
        rows = np.asarray(X, dtype=self.cluster_centers_.dtype)
        codes = assign_codes(rows, self.cluster_centers_, backend=self.backend).codes
        kmeans_update(rows, codes, self.cluster_centers_, self.counts_, weights=sample_weight, backend=self.backend)
        self.labels_ = self.predict(rows)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """The nearest center of each row.

        Parameters
        ----------
        X : array, shape (N, D)
            Rows, read in the centers' dtype.

        Returns
        -------
        ndarray of int64, shape (N,)
            Each row's nearest center, the lowest index among equally near ones.

        Raises
        ------
        ValueError
            If the rows' width is not the centers'.

        Examples
        --------
        >>> import numpy as np
        >>> from centerkern.codebooks import MiniBatchKMeans
        >>> MiniBatchKMeans(init=np.array([[0.0], [1.0]])).predict(np.array([[0.9], [0.5]]))
        array([1, 0])
        """
        rows = np.asarray(X, dtype=self.cluster_centers_.dtype)
        return assign_codes(rows, self.cluster_centers_, backend=self.backend).codes


def _num_codes(num_codes: Any) -> int:
    if isinstance(num_codes, (bool, np.bool_)) or not isinstance(num_codes, (int, np.integer)):
        raise TypeError(f"num_codes must be an int, got {num_codes!r}")
    if num_codes < 0:
        raise ValueError(f"num_codes must be >= 0, got {num_codes}")
    return int(num_codes)
