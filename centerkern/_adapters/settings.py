"""What every framework adapter decides alike from its arguments: which kernels a host step
runs (``backend=``), and in which dtype half-precision features are computed.

Framework-neutral: dtypes are compared by name, so that the same rule serves ``torch.dtype``,
``tf.DType`` and the NumPy dtypes of JAX arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .. import _backends
from .._core.validation import check_choice

# what backend= takes where the kernels run on the host (JAX's and TensorFlow's callbacks and
# custom calls, Dask's chunks): "auto" and the host backends
HOST_CHOICES = ("auto", *_backends.HOST)

# Features of these dtypes (autocast's, Keras's mixed-precision policies, a bfloat16 model) are
# computed in the centers' dtype.
HALF_PRECISION = ("float16", "bfloat16")


def host_backend(backend: str) -> str:
    """The host backend that ``backend`` names: itself, or for ``"auto"`` ``"numba"``, as
    ``centerkern.center_loss(backend="auto")`` takes for host arrays.

    Parameters
    ----------
    backend : {"auto", "numpy", "numba"}
        The adapter's ``backend=``.

    Returns
    -------
    str
        ``"numpy"`` or ``"numba"``.

    Raises
    ------
    ValueError
        For any other value (``"cuda"`` included: a host step computes on host arrays).
    """
    check_choice(backend, "backend", HOST_CHOICES)
    return "numba" if backend == "auto" else backend


# Cached: a training step asks at every call, and a torch dtype's name is found only after NumPy
# has refused it (a raised TypeError, about a microsecond); the dtypes a program uses are few.
@functools.lru_cache(maxsize=None)
def dtype_name(dtype: Any) -> str:
    """``dtype``'s name as NumPy spells it: ``"float16"`` for ``torch.float16``, ``tf.float16``
    and ``np.float16`` alike."""
    if isinstance(dtype, str):
        return dtype
    name = getattr(dtype, "name", None)  # NumPy dtypes (JAX's bfloat16 among them) and TensorFlow's
    if isinstance(name, str):
        return name
    try:  # scalar types: np.float16, jnp.bfloat16
        return np.dtype(dtype).name
    except TypeError:  # torch.float16, which NumPy does not know
        return str(dtype).rpartition(".")[2]


def computed_dtype(features_dtype: Any, centers_dtype: Any) -> Any:
    """The dtype a step computes the features in: the centers' when the features are half
    precision (float16 or bfloat16), else the features' own.

    Why: the kernels compute in float32 or float64 only, and the centers are state that must
    keep its precision across steps (mixed-precision training keeps its weights in float32 and
    computes the loss there, as autocast and Keras's policies advise), so half-precision features
    are cast up to the centers, which is exact; the gradient reaches them cast back by the
    framework's autodiff. Any other mismatch is left to the step's dtype check, which refuses it:
    casting float64 features down, or float32 ones to half-precision centers, would lose digits
    silently.

    Parameters
    ----------
    features_dtype, centers_dtype : dtype or str
        The features' and the centers' dtypes, in any framework's spelling (or their names).

    Returns
    -------
    dtype
        ``centers_dtype`` or ``features_dtype``, as given: what the features are to be cast to
        (a no-op when it is their own).

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern._adapters.settings import computed_dtype
    >>> computed_dtype(np.float16, np.float32)
    <class 'numpy.float32'>
    >>> computed_dtype("bfloat16", "float64")
    'float64'
    >>> computed_dtype("float64", "float32")  # refused later by the dtype check
    'float64'
    """
    return centers_dtype if dtype_name(features_dtype) in HALF_PRECISION else features_dtype
