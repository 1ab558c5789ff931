"""Class centers over data larger than memory: ``centerkern.dask.class_centers``.

::

    embeddings = da.from_zarr("embeddings.zarr")          # (N, D), chunked by rows
    labels = da.from_zarr("labels.zarr")                  # (N,)
    centers, counts = centerkern.dask.class_centers(embeddings, labels, num_classes)
    center_loss.centers.copy_(torch.from_numpy(centers))  # start training from them

Every chunk of rows is reduced to per-class sums and counts by the scatter kernel (duplicates
add up; float64 sums), and the partial results are added in a tree, ``split_every`` at a time.
A task holds one chunk, or at most ``split_every`` (K, D) partials: memory grows with the chunk
size and K x D, never with N. Runs on whatever scheduler is active (threads by default, a
``dask.distributed`` client when one is set up).
"""

from __future__ import annotations

import math
from typing import Any

import dask
import dask.array as da
import numpy as np

from . import _api
from ._adapters.settings import host_backend
from ._core.validation import FLOAT_DTYPES, check_labels

__all__ = ["class_centers"]


def class_centers(
    features: Any, labels: Any, num_classes: int, *, split_every: int = 8, backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """The mean feature of every class, and how many rows each class has.

    The whole graph is computed by this call, on the active scheduler; what it returns are
    NumPy arrays.

    Parameters
    ----------
    features : array_like
        A dask or NumPy array, shape (N, D), float32 or float64.
    labels : array_like
        A dask or NumPy integer array, shape (N,), values in [0, num_classes).
    num_classes : int
        K, the number of classes (rows of ``centers``).
    split_every : int
        How many partial results one task of the reduction tree adds (at least 2).
    backend : {"auto", "numpy", "numba"}
        The kernels each chunk runs (``auto``: numba).

    Returns
    -------
    centers : numpy.ndarray
        Shape (num_classes, D), the dtype of ``features``; zero for classes with no rows.
    counts : numpy.ndarray
        Of int64, shape (num_classes,).

    Raises
    ------
    ValueError
        For an unknown ``backend``, features that are not 2-D or labels that are not 1-D,
        unknown chunk sizes, a number of labels other than N, a ``num_classes`` that is not a
        positive integer, or a ``split_every`` below 2.
    TypeError
        For features neither float32 nor float64, or labels that are not integers.
    IndexError
        For a label outside [0, num_classes), with its position in the whole array.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> from centerkern.dask import class_centers
    >>> features = da.from_array(np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 2.0], [5.0, 0.0]]), chunks=(2, 2))
    >>> labels = da.from_array(np.array([0, 0, 2, 0]), chunks=2)

    Class 0 has rows in both chunks; class 1 has none.

    >>> centers, counts = class_centers(features, labels, num_classes=3)
    >>> centers
    array([[3., 2.],
           [0., 0.],
           [0., 2.]])
    >>> counts
    array([3, 0, 1])
    >>> centers.dtype, counts.dtype
    (dtype('float64'), dtype('int64'))
    """
    backend = host_backend(backend)  # auto: numba, as for any host arrays
    features, labels = da.asarray(features), da.asarray(labels)
    if features.ndim != 2 or labels.ndim != 1:
        raise ValueError(f"features must be 2-D and labels 1-D, got shapes {features.shape} and {labels.shape}")
    if np.dtype(features.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"features must be float32 or float64, got dtype {features.dtype}")
    if np.dtype(labels.dtype).kind not in "iu":
        raise TypeError(f"labels must have an integer dtype (not bool), got dtype {labels.dtype}")
    if any(math.isnan(size) for size in (*features.shape, *labels.shape)):
        raise ValueError("features and labels need known chunk sizes; call compute_chunk_sizes() first")
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for features of shape {features.shape}")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")
    num_classes = int(num_classes)

    features = features.rechunk({1: -1})  # a task sees whole rows: every column of its chunk
    labels = labels.rechunk((features.chunks[0],))
    first_rows = np.cumsum((0, *features.chunks[0][:-1]))
    partials = [
        dask.delayed(_chunk_sums)(feature_block, label_block, num_classes, int(first_row), backend)
        for feature_block, label_block, first_row in zip(
            features.to_delayed().ravel(), labels.to_delayed().ravel(), first_rows
        )
    ]
    while len(partials) > 1:
        partials = [
            dask.delayed(_add_partials)(*partials[i : i + split_every]) for i in range(0, len(partials), split_every)
        ]
    if not partials:  # no chunks at all
        return np.zeros((num_classes, features.shape[1]), features.dtype), np.zeros(num_classes, np.int64)
    (sums, counts), = dask.compute(partials[0])
    centers = sums / np.maximum(counts, 1)[:, None]  # classes never seen: 0 / 1
    return centers.astype(features.dtype), counts


def _chunk_sums(features: np.ndarray, labels: np.ndarray, num_classes: int, first_row: int, backend: str):
    """Per-class sums (float64) and counts of one chunk of rows."""
    labels = check_labels(labels, features.shape[0], num_classes, f"the chunk of shape {features.shape}", first_row)
    sums = np.zeros((num_classes, features.shape[1]), np.float64)
    # scatter_sub of -features adds the features up, duplicates included, in float64
    _api.scatter_sub_update(sums, labels, np.negative(features, dtype=np.float64), out=sums, backend=backend)
    return sums, np.bincount(labels, minlength=num_classes).astype(np.int64)


def _add_partials(*partials):
    # the first partial is this task's alone (each partial has exactly one consumer): add in place
    sums, counts = partials[0]
    for more_sums, more_counts in partials[1:]:
        sums += more_sums
        counts += more_counts
    return sums, counts
