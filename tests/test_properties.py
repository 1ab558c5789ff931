"""Every backend equals the numpy reference on inputs built to break it (hypothesis).

Heavy duplicates (a few hot classes hold most of the batch), one class, empty batches, every
integer label dtype, labels shaped (B, 1), Fortran-ordered and strided views, both float dtypes,
all three rules, and for numba both one thread and all of them.
"""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import centerkern

import naive
from conftest import BACKENDS, FAST_BACKENDS, MAX_BATCH, MAX_WIDTH, assert_matches, to_host

LABEL_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
THREAD_COUNTS = sorted({1, numba.config.NUMBA_NUM_THREADS})
# (backend, numba thread count): the numba backend at one thread and at all of them
FAST_BACKEND_RUNS = [(b, t) for b in FAST_BACKENDS for t in (THREAD_COUNTS if b == "numba" else [None])]


def _layout(array, layout):
    """The same values in another memory layout (always a new array)."""
    if layout == "fortran":
        return np.array(array, order="F")
    if layout == "strided":  # every other row and column of a larger array
        padded = np.zeros((2 * array.shape[0], 2 * array.shape[1]), dtype=array.dtype)
        padded[::2, ::2] = array
        return padded[::2, ::2]
    return np.array(array, order="C")


@st.composite
def batches(draw, max_batch=MAX_BATCH):
    """(features, labels, centers, updates) with hot classes, any label dtype and layout."""
    batch = draw(st.integers(0, max_batch))
    width = draw(st.integers(1, MAX_WIDTH))
    classes = draw(st.integers(1, 50))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    hot = rng.choice(classes, size=min(classes, draw(st.integers(1, 3))), replace=False)
    hot_share = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    labels = np.where(rng.random(batch) < hot_share, rng.choice(hot, batch), rng.integers(0, classes, batch))
    labels = labels.astype(draw(st.sampled_from(LABEL_DTYPES)))
    if draw(st.booleans()):
        labels = labels.reshape(-1, 1)
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    features = _layout((rng.standard_normal((batch, width)) * scale).astype(dtype), draw(st.sampled_from(["c", "fortran", "strided"])))
    centers = _layout((rng.standard_normal((classes, width)) * scale).astype(dtype), draw(st.sampled_from(["c", "fortran", "strided"])))
    updates = _layout((rng.standard_normal((batch, width)) * scale).astype(dtype), draw(st.sampled_from(["c", "fortran", "strided"])))
    return features, labels, centers, updates


def _with_threads(backend, threads):
    if backend == "numba":
        numba.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    yield
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("fast_backend, threads", FAST_BACKEND_RUNS)
@settings(max_examples=40, deadline=None)
@given(data=batches(), rule=st.sampled_from(centerkern.RULES), alpha=st.sampled_from([0.5, 0.95, 0.0, 1.3]),
       in_place=st.sampled_from([None, "c", "fortran", "strided"]))
def test_center_loss_equals_reference(fast_backend, threads, data, rule, alpha, in_place):
    features, labels, centers, _ = data
    reference = centerkern.center_loss(features, labels, centers, alpha, rule=rule, backend="numpy")
    _with_threads(fast_backend, threads)
    target = _layout(centers, in_place) if in_place else None  # out=centers on a copy, in that layout
    before = centers.copy()
    result = centerkern.center_loss(features, labels, target if in_place else centers, alpha, rule=rule,
                                    out=target, backend=fast_backend)
    np.testing.assert_array_equal(centers, before)
    assert result.loss == pytest.approx(reference.loss, rel=1e-9 if features.dtype == np.float32 else 1e-12, abs=1e-300)
    assert result.grad.dtype == features.dtype and result.centers.dtype == features.dtype
    assert_matches(result.grad, reference.grad, features, centers)
    assert_matches(result.centers, reference.centers, features, centers)
    if in_place:
        assert result.centers is target
    if rule == "pytorch":
        assert_matches(result.grad_centers, reference.grad_centers, features, centers)
    else:
        assert result.grad_centers is None


@pytest.mark.parametrize("fast_backend, threads", FAST_BACKEND_RUNS)
@settings(max_examples=40, deadline=None)
@given(data=batches(), in_place=st.sampled_from([None, "c", "fortran", "strided"]))
def test_scatter_equals_reference(fast_backend, threads, data, in_place):
    _, labels, centers, updates = data
    reference = centerkern.scatter_sub_update(centers, labels, updates, backend="numpy")
    _with_threads(fast_backend, threads)
    before = centers.copy()
    if in_place:
        target = _layout(centers, in_place)
        result = centerkern.scatter_sub_update(target, labels, updates, out=target, backend=fast_backend)
        assert result is target
    else:
        result = centerkern.scatter_sub_update(centers, labels, updates, backend=fast_backend)
        np.testing.assert_array_equal(centers, before)
    assert_matches(result, reference, centers, updates)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(data=batches())
def test_gather_equals_indexing(backend, data):
    _, labels, centers, _ = data
    result = centerkern.gather_centers(centers, labels, backend=backend)
    np.testing.assert_array_equal(to_host(result), centers[labels.reshape(-1)])
    assert result.dtype == centers.dtype


@settings(max_examples=25, deadline=None)
@given(data=batches(max_batch=60), rule=st.sampled_from(centerkern.RULES), alpha=st.sampled_from([0.5, 0.95]))
def test_reference_equals_naive_loops(data, rule, alpha):
    features, labels, centers, updates = data
    loss, grad, after, grad_centers = naive.center_loss(features, labels, centers, alpha, rule)
    result = centerkern.center_loss(features, labels, centers, alpha, rule=rule, backend="numpy")
    assert result.loss == pytest.approx(loss, rel=1e-9, abs=1e-300)
    assert_matches(result.grad, grad.astype(features.dtype), features, centers)
    assert_matches(result.centers, after.astype(features.dtype), features, centers)
    if grad_centers is not None:
        assert_matches(result.grad_centers, grad_centers.astype(features.dtype), features, centers)
    scattered = centerkern.scatter_sub_update(centers, labels, updates, backend="numpy")
    assert_matches(scattered, naive.scatter_sub(centers, labels.reshape(-1), updates).astype(centers.dtype),
                   centers, updates)


@pytest.mark.skipif("numba" not in FAST_BACKENDS, reason="numba backend not available")
@settings(max_examples=20, deadline=None)
@given(data=batches(), rule=st.sampled_from(centerkern.RULES))
def test_numba_is_bitwise_identical_for_any_thread_count(data, rule):
    features, labels, centers, updates = data
    results = []
    for threads in THREAD_COUNTS:
        numba.set_num_threads(threads)
        step = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, backend="numba")
        scattered = centerkern.scatter_sub_update(centers, labels, updates, backend="numba")
        results.append((step.loss, step.grad, step.centers, step.grad_centers, scattered))
    first = results[0]
    for other in results[1:]:
        assert other[0] == first[0]
        for a, b in zip(first[1:], other[1:]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rule", centerkern.RULES)
def test_hot_class_spanning_many_chunks(fast_backend, rule):
    """One class holding most rows crosses many of the backends' work chunks and tiles."""
    rng = np.random.default_rng(7)
    batch, width = 10 * MAX_BATCH, MAX_WIDTH
    labels = np.where(rng.random(batch) < 0.9, 3, rng.integers(0, 20, batch))
    features = rng.standard_normal((batch, width)).astype(np.float32)
    centers = rng.standard_normal((20, width)).astype(np.float32)
    reference = centerkern.center_loss(features, labels, centers, 0.9, rule=rule, backend="numpy")
    result = centerkern.center_loss(features, labels, centers, 0.9, rule=rule, backend=fast_backend)
    assert result.loss == pytest.approx(reference.loss, rel=1e-9)
    assert_matches(result.centers, reference.centers, features, centers)
    assert_matches(result.grad, reference.grad, features, centers)
