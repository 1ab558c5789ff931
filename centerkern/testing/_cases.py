"""The oracle's cases as data: what a report's evidence is made of, saved and loaded again.

A case is the inputs of one step, ``(features, labels, centers, alpha)`` in NumPy. A report's
cases (``Diagnosis.cases``) are exactly what the step was run on, so a user who saves them can
run the step on them again in a regression test, bit for bit and in the same memory layout.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

LAYOUTS = ("c", "fortran", "strided")


class Case(NamedTuple):
    """The inputs of one center-loss step, as the oracle hands them to the step under test.

    A named tuple, so that ``features, labels, centers, alpha = case`` works as it does for the
    cases ``centerkern.testing.strategies.center_loss_inputs`` draws.

    Parameters
    ----------
    features : numpy.ndarray, shape (B, D)
        The features, float32 or float64 (or a half-precision dtype the check was asked for).
    labels : numpy.ndarray of int64, shape (B,)
        The class of each row, in [0, K).
    centers : numpy.ndarray, shape (K, D)
        The centers before the step, in the features' dtype.
    alpha : float
        The rule's alpha.

    See Also
    --------
    save_cases, load_cases : A report's cases written to a file, and read back.

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.testing import Case
    >>> case = Case(np.ones((2, 3)), np.array([0, 0]), np.zeros((1, 3)), 0.5)
    >>> case.dtype, case.shape
    (dtype('float64'), 'B=2, D=3, K=1')
    >>> features, labels, centers, alpha = case
    """

    features: np.ndarray
    labels: np.ndarray
    centers: np.ndarray
    alpha: float

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the features and centers."""
        return self.features.dtype

    @property
    def shape(self) -> str:
        """``B=..., D=..., K=...``, as the reports write a case's size."""
        return f"B={self.features.shape[0]}, D={self.features.shape[1]}, K={self.centers.shape[0]}"


def _layout_of(array: np.ndarray) -> str:
    if array.flags.c_contiguous:
        return "c"
    if array.flags.f_contiguous:
        return "fortran"
    return "strided"


def in_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """``array`` in ``layout``: the layouts ``center_loss_inputs`` draws (strided: every other
    column of a wider array)."""
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "strided":
        padded = np.zeros((array.shape[0], 2 * array.shape[1]), dtype=array.dtype)
        padded[:, ::2] = array
        return padded[:, ::2]
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def save_cases(path: str | os.PathLike, cases) -> None:
    """Write ``cases`` to ``path`` (a NumPy ``.npz`` file), values, dtypes and layouts included.

    What a regression test reads back with ``load_cases``: typically a report's evidence,
    ``mismatch.diagnosis.cases``, saved where a bug was found (or ``Diagnosis.save_cases``).

    Parameters
    ----------
    path : str or path-like
        The file to write; NumPy adds ``.npz`` where the name lacks it.
    cases : iterable of Case or of (features, labels, centers, alpha)
        The cases.

    Raises
    ------
    OSError
        If the file cannot be written.

    See Also
    --------
    load_cases : Read them back.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from centerkern.testing import Case, load_cases, save_cases
    >>> case = Case(np.asfortranarray(np.ones((2, 3))), np.array([0, 0]), np.zeros((1, 3)), 0.5)
    >>> path = os.path.join(tempfile.mkdtemp(), "cases.npz")
    >>> save_cases(path, [case])
    >>> (again,) = load_cases(path)
    >>> np.array_equal(again.features, case.features), again.features.flags.f_contiguous, again.alpha
    (True, True, 0.5)
    """
    arrays = {}
    for number, (features, labels, centers, alpha) in enumerate(cases):
        arrays[f"{number}/features"] = np.ascontiguousarray(features)
        arrays[f"{number}/labels"] = np.ascontiguousarray(labels)
        arrays[f"{number}/centers"] = np.ascontiguousarray(centers)
        arrays[f"{number}/alpha"] = np.float64(alpha)
        arrays[f"{number}/layouts"] = np.array([_layout_of(np.asarray(features)), _layout_of(np.asarray(centers))])
    np.savez(path, **arrays)


def load_cases(path: str | os.PathLike) -> list[Case]:
    """The cases ``save_cases`` wrote to ``path``, as they were: values, dtypes, memory layouts.

    Hand them to ``check_center_loss(step, rule, cases=...)``: the step is run on each, and a
    disagreement raises ``CenterLossMismatch`` with the diagnosis, as a search would.

    Parameters
    ----------
    path : str or path-like
        A file written by ``save_cases`` (or ``Diagnosis.save_cases``).

    Returns
    -------
    list of Case
        In the order they were saved.

    Raises
    ------
    OSError
        If the file cannot be read.
    ValueError
        If it is not a file of cases.

    See Also
    --------
    save_cases : What writes them.
    check_center_loss : Its ``cases`` parameter.

    Examples
    --------
    See ``save_cases``.
    """
    with np.load(path, allow_pickle=False) as stored:
        names = set(stored.files)
        count = len({name.split("/", 1)[0] for name in names})
        cases = []
        for number in range(count):
            try:
                features_layout, centers_layout = (str(v) for v in stored[f"{number}/layouts"])
                cases.append(Case(in_layout(stored[f"{number}/features"], features_layout),
                                  stored[f"{number}/labels"].copy(),
                                  in_layout(stored[f"{number}/centers"], centers_layout),
                                  float(stored[f"{number}/alpha"])))
            except KeyError as missing:
                raise ValueError(f"{os.fspath(path)} is not a file of center-loss cases (no {missing} in it): "
                                 "write one with save_cases") from None
    return cases
