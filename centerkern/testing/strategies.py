"""Hypothesis strategies for center-loss inputs, public so that other projects can reuse them in
their own property tests.

    from hypothesis import given
    from .strategies import center_loss_inputs

    @given(center_loss_inputs())
    def test_my_step(case):
        features, labels, centers, alpha = case
        ...
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ._cases import Case, in_layout

__all__ = ["center_loss_inputs", "labels_with_hot_classes"]


@st.composite
def labels_with_hot_classes(draw, batch_size: int, num_classes: int, max_hot: int = 3):
    """int64 labels in [0, num_classes): sometimes uniform, sometimes most of the batch in a few
    hot classes, sometimes a single class. Duplicates are what breaks scatter code.

    Parameters
    ----------
    batch_size : int
        How many labels (B).
    num_classes : int
        K, at least 1: the labels lie in [0, K).
    max_hot : int, optional
        How many hot classes at most, which then hold about 80% of the batch.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of int64 NumPy arrays of shape (batch_size,).

    Raises
    ------
    hypothesis.errors.InvalidArgument
        When an example is drawn, if ``num_classes`` is below 1.
    ValueError
        When an example is drawn, if ``batch_size`` is negative (NumPy's own).

    See Also
    --------
    center_loss_inputs : Whole center-loss cases, with labels from this strategy.

    Examples
    --------
    >>> import numpy as np
    >>> from hypothesis import given, settings
    >>> from centerkern.testing.strategies import labels_with_hot_classes
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(labels_with_hot_classes(batch_size=8, num_classes=3))
    ... def test_labels(labels):
    ...     assert labels.shape == (8,) and labels.dtype == np.int64
    ...     assert 0 <= labels.min() and labels.max() < 3
    >>> test_labels()
    """
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mode = draw(st.sampled_from(["uniform", "hot", "one class"]))
    # drawn whatever the mode: a draw made only for one mode would make that mode's cases look
    # larger to hypothesis, which shrinks towards fewer draws
    only_class = draw(st.integers(0, num_classes - 1))
    if mode == "one class" or num_classes == 1:
        return np.full(batch_size, only_class, dtype=np.int64)
    labels = rng.integers(0, num_classes, batch_size)
    if mode == "hot":
        hot = rng.choice(num_classes, size=min(max_hot, num_classes), replace=False)
        labels = np.where(rng.random(batch_size) < 0.8, rng.choice(hot, batch_size), labels)
    return labels.astype(np.int64)


@st.composite
def center_loss_inputs(draw, max_batch: int = 32, max_width: int = 12, max_classes: int = 10,
                       dtypes=(np.float32, np.float64), alpha=None):
    """``(features, labels, centers, alpha)`` as NumPy arrays: B from 1 (batches of one are a
    classic edge), heavy duplicates, one class, both dtypes, odd memory layouts.

    Features and centers are drawn at three scales (1, 10 and 0.01) and in C, Fortran or
    strided layout each; the labels come from ``labels_with_hot_classes``.

    Parameters
    ----------
    max_batch : int, optional
        The largest batch size B.
    max_width : int, optional
        The largest feature size D.
    max_classes : int, optional
        The largest number of classes K.
    dtypes : tuple of type, optional
        The float dtypes to draw from (features and centers share one).
    alpha : float or None, optional
        A fixed alpha; None (the default) draws 0.5, 0.9 or 0.95.

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of ``Case`` named tuples ``(features, labels, centers, alpha)``: ``features`` (B, D)
        and ``centers`` (K, D) of one dtype, ``labels`` int64 (B,) in [0, K), ``alpha`` a float.

    Raises
    ------
    hypothesis.errors.InvalidArgument
        When an example is drawn, if ``max_batch``, ``max_width`` or ``max_classes`` is below 1
        or ``dtypes`` is empty.

    See Also
    --------
    centerkern.testing.check_center_loss : Runs a step on these cases.

    Examples
    --------
    A property test of one's own: every backend equals the ``numpy`` reference to within
    ``BACKEND_TOLERANCE``.

    >>> import centerkern
    >>> from hypothesis import given, settings
    >>> from centerkern.testing import BACKEND_TOLERANCE, close_within
    >>> from centerkern.testing.strategies import center_loss_inputs
    >>> @settings(max_examples=5, deadline=None, database=None)
    ... @given(center_loss_inputs(max_batch=8, alpha=0.5))
    ... def test_backends_agree(case):
    ...     features, labels, centers, alpha = case
    ...     assert features.shape[0] == labels.shape[0] and alpha == 0.5
    ...     reference = centerkern.center_loss(features, labels, centers, alpha, backend="numpy")
    ...     fast = centerkern.center_loss(features, labels, centers, alpha, backend="numba")
    ...     tolerance = BACKEND_TOLERANCE[features.dtype]
    ...     assert close_within(fast.centers, reference.centers, tolerance, features, centers)
    >>> test_backends_agree()
    """
    batch = draw(st.integers(1, max_batch))
    width = draw(st.integers(1, max_width))
    classes = draw(st.integers(1, max_classes))
    dtype = draw(st.sampled_from(list(dtypes)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1.0, 10.0, 0.01]))
    features = in_layout((rng.standard_normal((batch, width)) * scale).astype(dtype),
                       draw(st.sampled_from(["c", "fortran", "strided"])))
    centers = in_layout((rng.standard_normal((classes, width)) * scale).astype(dtype),
                      draw(st.sampled_from(["c", "fortran", "strided"])))
    labels = draw(labels_with_hot_classes(batch, classes))
    if alpha is None:
        alpha = draw(st.sampled_from([0.5, 0.9, 0.95]))
    return Case(features, labels, centers, float(alpha))
