"""How close is close enough: the tolerances, and the comparison every check of the oracle makes.

A module of its own, below both the public ``check_center_loss`` and the diagnosis of mistakes,
which compare alike.
"""

from __future__ import annotations

import numpy as np

# A third-party step against the reference: its own summation order, float32 intermediates. Half
# precision sums of tens of terms carry no more than a few bits (bfloat16 keeps 8 of them).
TOLERANCE = {np.dtype(np.float16): 2e-2, np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}


def _bfloat16():
    """ml_dtypes' bfloat16 (which JAX and TensorFlow install), or None where it is missing."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


if _bfloat16() is not None:
    TOLERANCE[_bfloat16()] = 1e-1


def tolerance_of(inputs_dtype, value) -> float:
    """The tolerance a step's ``value`` is held to: its inputs' dtype's, or the dtype it was
    handed back in where that is coarser (float32 values of float64 inputs carry no more)."""
    return max(TOLERANCE[np.dtype(inputs_dtype)], TOLERANCE.get(np.asarray(value).dtype, 0.0))


def smallest_normal(dtype) -> float:
    """The smallest normal number of ``dtype``: below it a half-precision value (a float16 loss of
    1e-7, say) carries no relative precision, only steps of a fixed size."""
    bfloat16 = _bfloat16()
    if bfloat16 is not None and dtype == bfloat16:  # (a dtype equals None: np.dtype(None) is float64)
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).smallest_normal)
    return float(np.finfo(dtype).smallest_normal)


def checked_dtype(dtype) -> np.dtype:
    """``dtype`` as a NumPy dtype the oracle can check a step in (float16, bfloat16, float32 or
    float64); a ValueError naming them for any other, an ImportError for bfloat16 without
    ml_dtypes."""
    if str(dtype) == "bfloat16" and _bfloat16() is None:
        raise ImportError("dtype bfloat16 needs the ml_dtypes package (JAX and TensorFlow install it): "
                          "pip install ml_dtypes")
    try:
        checked = _bfloat16() if str(dtype) == "bfloat16" else np.dtype(dtype)
    except TypeError:
        checked = None
    if checked not in TOLERANCE:
        raise ValueError(f"dtypes may be {', '.join(sorted(str(d) for d in TOLERANCE))}, got {dtype!r}")
    return checked


#: The relative tolerance, per input dtype (``np.dtype(np.float32)``: 1e-5,
#: ``np.dtype(np.float64)``: 1e-12), to within which every centerkern backend equals the
#: ``numpy`` reference, whatever its summation order; for use with ``close_within``.
BACKEND_TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def close_within(got, expected, tolerance, *magnitudes) -> bool:
    """Equal to within ``tolerance``, relative to the larger of the value and the magnitudes
    (the inputs): sums of terms that cancel are exact only to the terms' own scale. NaN equals
    NaN; None equals None only.

    Element-wise, ``|got - expected| <= tolerance * (|expected| + scale)``, where ``scale`` is
    the largest absolute value in ``expected`` and the magnitudes.

    Parameters
    ----------
    got : array_like or None
        The values to check.
    expected : array_like or None
        The reference values, of the same shape as ``got``.
    tolerance : float
        The relative tolerance, for example ``BACKEND_TOLERANCE[dtype]``.
    *magnitudes : array_like
        The inputs the values were computed from: a difference within ``tolerance`` of their
        largest absolute value passes.

    Returns
    -------
    bool
        Whether ``got`` and ``expected`` agree (False for different shapes).

    Raises
    ------
    ValueError, TypeError
        NumPy's own, where ``got``, ``expected`` or a magnitude cannot be read as an array of
        floats (a ragged list, strings, objects). Different shapes are not an error: they
        disagree.

    See Also
    --------
    difference : Where and by how much two arrays differ, in words.

    Examples
    --------
    >>> from centerkern.testing import close_within
    >>> close_within([1.0, 2.0], [1.0, 2.0 + 1e-7], 1e-6)
    True
    >>> close_within([1.0, 2.0], [1.0, 2.1], 1e-6)
    False

    A result near zero, from inputs near 1, is exact only to their scale:

    >>> close_within(1e-9, 0.0, 1e-6)
    False
    >>> close_within(1e-9, 0.0, 1e-6, [1.0, -1.0])
    True
    >>> close_within(float("nan"), float("nan"), 1e-6), close_within(None, 0.0, 1e-6)
    (True, False)
    """
    if got is None or expected is None:
        return got is None and expected is None
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return False
    scale = max([1e-300] + [float(np.max(np.abs(m), initial=0.0)) for m in (expected, *magnitudes)])
    return bool(np.allclose(got, expected, rtol=tolerance, atol=tolerance * scale, equal_nan=True))


def difference(got, expected) -> str:
    """Where and by how much ``got`` differs from ``expected``, in words.

    The sentence the reports of ``check_center_loss`` use for a quantity that differs.

    Parameters
    ----------
    got : array_like
        The values to check.
    expected : array_like
        The reference values.

    Returns
    -------
    str
        The largest absolute difference, where it is and the two values there; or the two
        shapes, where they differ.

    Raises
    ------
    ValueError, TypeError
        NumPy's own, where ``got`` or ``expected`` cannot be read as an array of floats.

    See Also
    --------
    close_within : Whether two arrays agree.

    Examples
    --------
    >>> from centerkern.testing import difference
    >>> difference([[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.5]])
    'max abs difference 0.5 at (1, 1) (got 4, expected 4.5)'
    >>> difference([1.0, 2.0], [1.0, 2.0, 3.0])
    'shape (2,) instead of (3,)'
    """
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return f"shape {got.shape} instead of {expected.shape}"
    error = np.abs(got - expected)
    worst = np.unravel_index(int(np.argmax(error)), error.shape) if error.size else ()
    return (f"max abs difference {float(np.max(error, initial=0.0)):.3g}"
            + (f" at {tuple(int(i) for i in worst)} (got {got[worst]:.6g}, expected {expected[worst]:.6g})"
               if error.size else ""))
