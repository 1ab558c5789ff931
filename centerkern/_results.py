"""What the public functions return (``CenterLossResult``; the codebook functions' ``Assignment``,
``ClassSums`` and ``Quantized``), and the words their docstrings share."""

from __future__ import annotations

from typing import Any, NamedTuple

# Parameters and errors that the three functions document alike, written once and put in their
# docstrings where ``{name}`` stands alone on a line (str.replace, not str.format: the
# docstrings hold braces of their own).
_SHARED_DOCS = {
    "backend": """backend : {"auto", "numpy", "numba", "cuda"}, optional
        Where to compute; ``"auto"`` (the default) takes ``cuda`` for device arrays and
        ``numba`` otherwise (see ``backends``).""",
    "deterministic": """deterministic : bool, optional
        Bitwise-identical results from run to run. The CPU backends always are; the ``cuda``
        backend is when asked (no float atomics).""",
    "sync and stream": """sync : bool, optional
        Device arrays only; see ``center_loss``.
    stream : None, Numba stream or int, optional
        Device arrays only; see ``center_loss``.""",
    "IndexError": """IndexError
        If a label lies outside [0, K): the message names the first bad value, its position
        and K. (For device arrays with ``sync=False``, raised later; see ``center_loss``.)""",
    "BackendUnavailableError": """BackendUnavailableError
        If ``backend="cuda"`` (or ``"auto"`` with device arrays) and Numba's CUDA target cannot
        be loaded or finds no GPU.""",
}


def with_shared_docs(function):
    if function.__doc__ is None:  # python -OO strips docstrings
        return function
    for name, text in _SHARED_DOCS.items():
        function.__doc__ = function.__doc__.replace("    {" + name + "}\n", "    " + text + "\n")
    return function


class CenterLossResult(NamedTuple):
    """What ``center_loss`` returns.

    A named tuple: its fields, below, are read by name (``result.loss``) or unpacked in order
    (``loss, grad, centers, grad_centers = result``).

    Parameters
    ----------
    loss : float, or a 0-d float64 device array
        The rule's loss, accumulated in float64: a Python float for host inputs; for device
        inputs a 0-d float64 array on the device, in the features' framework (``float(loss)``
        is where the caller chooses to wait for the GPU).
    grad : array, shape (B, D)
        d loss / d features.
    centers : array, shape (K, D)
        The centers after the step (``out`` itself when given).
    grad_centers : array, shape (K, D), or None
        d loss / d centers for rule ``pytorch`` (for the caller's optimizer); None otherwise.

    See Also
    --------
    center_loss : The function that returns it.

    Examples
    --------
    >>> import numpy as np
    >>> import centerkern
    >>> features = np.array([[1.0, 1.0], [1.0, 3.0], [4.0, 2.0]])
    >>> labels = np.array([0, 0, 1])
    >>> centers = np.zeros((2, 2))
    >>> result = centerkern.center_loss(features, labels, centers, 0.5)
    >>> round(result.loss, 6)
    5.333333
    >>> result.grad.shape, result.centers.shape, result.grad_centers is None
    ((3, 2), (2, 2), True)
    >>> loss, grad, new_centers, grad_centers = result
    >>> new_centers.tolist()
    [[1.0, 2.0], [2.0, 1.0]]

    Rule ``pytorch`` leaves the centers to the caller's optimizer and returns their gradient:

    >>> result = centerkern.center_loss(features, labels, centers, 0.5, rule="pytorch")
    >>> np.round(result.grad_centers, 6).tolist()
    [[-1.333333, -2.666667], [-2.666667, -1.333333]]
    """

    loss: float
    grad: Any
    centers: Any
    grad_centers: Any


class Assignment(NamedTuple):
    """What ``assign_codes`` returns, a named tuple.

    Parameters
    ----------
    codes : array of int64, shape (N,)
        Each row's nearest code.
    distances : array, shape (N,)
        Each row's squared Euclidean distance to its code, in the features' dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.codebooks import assign_codes
    >>> codes, distances = assign_codes(np.array([[0.0, 1.0]]), np.array([[0.0, 0.0], [0.0, 2.0]]))
    >>> codes, distances
    (array([0]), array([1.]))
    """

    codes: Any
    distances: Any


class ClassSums(NamedTuple):
    """What ``class_sums`` returns, a named tuple.

    Parameters
    ----------
    counts : array of float64, shape (K,)
        The weight of each code's rows.
    sums : array of float64, shape (K, D)
        Their weighted sum.

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.codebooks import class_sums
    >>> class_sums(np.ones((3, 1)), [1, 1, 0], 2)
    ClassSums(counts=array([1., 2.]), sums=array([[1.],
           [2.]]))
    """

    counts: Any
    sums: Any


class Quantized(NamedTuple):
    """What ``quantize`` returns, a named tuple.

    Parameters
    ----------
    codes : array of int64, shape (N,)
        Each row's nearest code.
    distances : array, shape (N,)
        Its squared distance to the code.
    quantized : array, shape (N, D)
        The codes' vectors before the update, as the VQ layers return them.
    counts : array of int64, shape (K,)
        How many rows each code got in this batch (zero: a dead code).

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.codebooks import quantize
    >>> embed = np.array([[0.0], [5.0]])
    >>> result = quantize(np.array([[1.0], [4.0], [6.0]]), np.ones(2), embed.copy(), embed, update=False)
    >>> result.codes, result.counts
    (array([0, 1, 1]), array([1, 2]))
    """

    codes: Any
    distances: Any
    quantized: Any
    counts: Any
