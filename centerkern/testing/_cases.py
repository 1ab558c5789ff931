"""The oracle's cases as data: what a report's evidence is made of, saved and loaded again.

A case is the inputs of one step, ``(features, labels, centers, alpha)`` in NumPy. A report's
cases (``Diagnosis.cases``) are exactly what the step was run on, so a user who saves them can
run the step on them again in a regression test, bit for bit and in the same memory layout.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from ._comparison import TOLERANCE, checked_dtype

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


def as_case(case) -> Case:
    """``case`` as a ``Case`` the oracle can run a step on, or an error that says what is wrong
    with it: four items, features and centers 2-D of one dtype the oracle checks in, with D
    columns each, integer labels of one per feature row, each in [0, K)."""
    try:
        features, labels, centers, alpha = case
    except (TypeError, ValueError):
        raise TypeError(f"a case is (features, labels, centers, alpha), got {type(case).__name__} "
                        f"of {len(case) if hasattr(case, '__len__') else 'no'} items") from None
    features = features if isinstance(features, np.ndarray) else np.asarray(features)
    centers = centers if isinstance(centers, np.ndarray) else np.asarray(centers)
    labels = np.asarray(labels)
    for name, array in (("features", features), ("centers", centers)):
        if array.ndim != 2 or array.dtype not in TOLERANCE:
            raise TypeError(f"a case's {name} must be a 2-D array of {', '.join(sorted(map(str, TOLERANCE)))}, "
                            f"got {array.ndim}-D {array.dtype}")
    if features.dtype != centers.dtype or features.shape[1] != centers.shape[1]:
        raise ValueError(f"a case's features {features.shape} {features.dtype} and centers {centers.shape} "
                         f"{centers.dtype} must share their dtype and their number of columns")
    if labels.shape != (features.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"a case's labels must be {features.shape[0]} integers (one per feature row), got "
                         f"shape {labels.shape} {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= centers.shape[0]):
        raise ValueError(f"a case's labels must lie in [0, {centers.shape[0]}), got {labels.min()} to {labels.max()}")
    return Case(features, labels.astype(np.int64, copy=False), centers, float(alpha))


def _layout_of(array: np.ndarray) -> str:
    if array.ndim < 2 or array.flags.c_contiguous:  # a vector (the labels) is taken as its values
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
    """Write ``cases`` to ``path`` (a NumPy ``.npz`` archive), values, dtypes and layouts included.

    What a regression test reads back with ``load_cases``: typically a report's evidence,
    ``mismatch.diagnosis.cases``, saved where a bug was found (or ``Diagnosis.save_cases``). The
    file is written at ``path`` exactly, whatever its suffix.

    Parameters
    ----------
    path : str or path-like
        The file to write.
    cases : iterable of Case or of (features, labels, centers, alpha)
        The cases.

    Raises
    ------
    OSError
        If the file cannot be written.
    TypeError, ValueError
        If a case is not one the oracle can run (see ``check_center_loss``'s ``cases``).

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
    for number, case in enumerate(map(as_case, cases)):
        for field in ("features", "labels", "centers"):
            array = getattr(case, field)
            # NumPy writes a dtype it does not know (ml_dtypes' bfloat16) as raw bytes: keep its name
            arrays[f"{number}/{field}"] = np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")
            arrays[f"{number}/{field}.dtype"] = np.array(array.dtype.name)
            arrays[f"{number}/{field}.layout"] = np.array(_layout_of(array))
        arrays[f"{number}/alpha"] = np.float64(case.alpha)
    with open(path, "wb") as file:  # np.savez given a name would add ".npz" to it
        np.savez(file, **arrays)


def load_cases(path: str | os.PathLike) -> list[Case]:
    """The cases ``save_cases`` wrote to ``path``, as they were: values, dtypes and memory
    layouts (C or Fortran order; a strided array comes back as every other column of a wider
    one, as ``center_loss_inputs`` draws it).

    Hand them to ``check_center_loss(step, rule, cases=..., max_examples=0)``: the step is run
    on each, and a disagreement raises ``CenterLossMismatch`` with the diagnosis, as a search
    would.

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
        If it is not a file of cases, or holds none.
    ImportError
        If it holds bfloat16 cases and ml_dtypes is not installed.

    See Also
    --------
    save_cases : What writes them.
    check_center_loss : Its ``cases`` parameter.

    Examples
    --------
    See ``save_cases``.
    """
    def array(stored, name):
        raw = stored[name]
        dtype = checked_dtype(str(stored[f"{name}.dtype"])) if name.endswith(("features", "centers")) \
            else np.dtype(str(stored[f"{name}.dtype"]))
        return in_layout(raw.view(dtype), str(stored[f"{name}.layout"]))

    with np.load(path, allow_pickle=False) as stored:
        count = len({name.split("/", 1)[0] for name in stored.files})
        cases = []
        try:
            for number in range(count):
                cases.append(Case(array(stored, f"{number}/features"), array(stored, f"{number}/labels"),
                                  array(stored, f"{number}/centers"), float(stored[f"{number}/alpha"])))
        except KeyError:
            cases = []
    if not cases:
        raise ValueError(f"{os.fspath(path)} holds no center-loss cases: write them with save_cases, or "
                         "Diagnosis.save_cases")
    return cases
