"""The step on the batch's own classes: how the JAX and TensorFlow adapters stay independent of K.

Inside ``jax.jit`` or ``tf.function`` the kernels run as a host callback, and whatever the
callback takes and returns is copied across. Passing the (K, D) centers would copy them twice
per step, for a batch that touches at most B of the K rows. So the adapters rewrite the step in
the framework's own ops: ``classes, index = unique(labels)`` (``labels == classes[index]``),
``rows = centers[classes]``, the kernel step on ``(features, index, rows)``, and the new rows
scattered back into ``classes``. Each class is one row of ``rows``, so the scatter back has no
duplicates, and the kernels still see every duplicate label of the batch through ``index``.
"""

from __future__ import annotations

import numpy as np

from . import _api, _validation


def check_shapes_and_dtypes(features, centers, label_count: int | None, label_dtype) -> None:
    """``center_loss``'s checks that need no values, on a framework's own arrays (inside
    ``jax.jit`` or ``tf.function`` the values are not there yet; the labels' range is checked
    where they are). ``label_count`` None: not known until run time."""
    _validation.check_same_dtype(features=features, centers=centers)
    if len(features.shape) != 2 or len(centers.shape) != 2:
        raise ValueError(f"features and centers must be 2-D, got shapes {features.shape} and {centers.shape}")
    _validation.check_feature_size(features, "features", centers)
    if label_count is not None and features.shape[0] is not None and label_count != features.shape[0]:
        raise ValueError(f"{label_count} labels for features of shape {tuple(features.shape)}")
    if np.dtype(label_dtype).kind not in "iu":
        raise TypeError(f"labels must have an integer dtype (not bool), got dtype {np.dtype(label_dtype)}")


def host_step(features, labels, index, rows, alpha, *, num_classes: int, rule: str, backend: str):
    """``(loss, grad, new_rows)`` as NumPy arrays: the kernel step on the batch's classes.

    ``labels`` are the caller's, checked here against ``num_classes`` so that a bad label gets
    SPEC's ``IndexError`` (the framework's own gather would clip or fill it silently)."""
    # the frameworks hand over their own array types; on the host these views share memory
    features, labels, index, rows, alpha = (np.asarray(x) for x in (features, labels, index, rows, alpha))
    _validation.check_labels(labels, features.shape[0], num_classes, f"features of shape {features.shape}")
    result = _api.center_loss(features, index, rows, alpha, rule=rule, backend=backend)
    return np.asarray(result.loss, dtype=features.dtype), result.grad, result.centers
