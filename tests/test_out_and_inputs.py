"""What callers may rely on: out=None never writes, out=centers writes in place without a copy,
an empty batch is a no-op, and lists, __array__ and __dlpack__ objects are accepted."""

import tracemalloc

import numpy as np
import pytest

import centerkern

from conftest import BACKENDS, assert_matches


def _data(dtype=np.float32, batch=40, width=8, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, width)).astype(dtype), rng.integers(0, classes, batch),
            rng.standard_normal((classes, width)).astype(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", centerkern.RULES)
def test_out_none_leaves_every_input_alone(backend, rule):
    features, labels, centers = _data()
    copies = [features.copy(), labels.copy(), centers.copy()]
    result = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, backend=backend)
    for array, before in zip((features, labels, centers), copies):
        np.testing.assert_array_equal(array, before)
    assert result.centers is not centers and not np.shares_memory(result.centers, centers)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", centerkern.RULES)
def test_out_centers_updates_in_place_and_returns_it(backend, rule):
    features, labels, centers = _data()
    expected = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, backend="numpy")
    result = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, out=centers, backend=backend)
    assert result.centers is centers
    assert_matches(centers, expected.centers, features)


@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_out_receives_the_update(backend):
    features, labels, centers = _data()
    out = np.full_like(centers, np.nan)
    expected = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    before = centers.copy()
    result = centerkern.center_loss(features, labels, centers, 0.5, out=out, backend=backend)
    assert result.centers is out
    assert_matches(out, expected.centers, features)
    np.testing.assert_array_equal(centers, before)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
@pytest.mark.parametrize("function", ["loss", "scatter"])
def test_in_place_path_does_not_copy_the_centers(backend, function):
    classes, width, batch = 200_000, 16, 10  # centers: 12.8 MB, everything else: bytes
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((classes, width)).astype(np.float32)
    rows = rng.standard_normal((batch, width)).astype(np.float32)
    labels = rng.integers(0, classes, batch)
    call = {"loss": lambda: centerkern.center_loss(rows, labels, centers, 0.5, out=centers, backend=backend),
            "scatter": lambda: centerkern.scatter_sub_update(centers, labels, rows, out=centers, backend=backend)}
    call[function]()  # compile first
    tracemalloc.start()
    try:
        call[function]()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < centers.nbytes / 20, f"peak {peak} bytes traced for centers of {centers.nbytes} bytes"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", centerkern.RULES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batch(backend, rule, dtype):
    centers = np.arange(12, dtype=dtype).reshape(3, 4)
    result = centerkern.center_loss(np.empty((0, 4), dtype), np.empty(0, np.int64), centers, 0.5, rule=rule,
                                    out=centers, backend=backend)
    assert result.loss == 0.0 and isinstance(result.loss, float)
    assert result.grad.shape == (0, 4) and result.grad.dtype == dtype
    np.testing.assert_array_equal(centers, np.arange(12).reshape(3, 4))
    if rule == "pytorch":
        np.testing.assert_array_equal(result.grad_centers, np.zeros((3, 4)))
    scattered = centerkern.scatter_sub_update(centers, [], np.empty((0, 4), dtype), backend=backend)
    np.testing.assert_array_equal(scattered, centers)
    assert centerkern.gather_centers(centers, [], backend=backend).shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lists_are_accepted(backend):
    result = centerkern.center_loss([[1.0, 2.0], [3.0, 4.0]], [1, 1], [[0.0, 0.0], [1.0, 1.0]], 0.5, backend=backend)
    assert result.loss == pytest.approx(((0**2 + 1**2) + (2**2 + 3**2)) / 4)
    np.testing.assert_allclose(result.centers, [[0.0, 0.0], [2.0, 3.0]])


class ArrayLike:
    """Only __array__: what many array libraries offer."""

    def __init__(self, array):
        self._array = array

    def __array__(self, dtype=None, copy=None):
        return self._array


class DLPackOnly:
    """Only __dlpack__: a framework tensor seen through the array-API exchange protocol."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
@pytest.mark.parametrize("wrapper", [ArrayLike, DLPackOnly])
def test_array_protocol_objects_are_accepted_and_out_writes_through(backend, wrapper):
    features, labels, centers = _data()
    expected = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    storage = centers.copy()
    out = wrapper(storage)
    if wrapper is DLPackOnly and not np.from_dlpack(out).flags.writeable:
        # NumPy before 2.1 imports DLPack read-only: out= cannot write through it, and says so
        with pytest.raises(ValueError, match="out is read-only"):
            centerkern.center_loss(wrapper(features), wrapper(labels), out, 0.5, out=out, backend=backend)
        assert np.array_equal(storage, centers)
        return
    result = centerkern.center_loss(wrapper(features), wrapper(labels), out, 0.5, out=out, backend=backend)
    assert result.centers is out  # the caller's own object back
    assert_matches(storage, expected.centers, features)  # written into its memory


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_overlapping_out_are_read_before_any_write(backend):
    """features that are a view of the centers being updated: as if every input was read first."""
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((30, 6))
    labels = np.repeat(np.arange(10), 2)
    expected = centerkern.center_loss(centers[:20].copy(), labels, centers, 0.5, backend="numpy")
    result = centerkern.center_loss(centers[:20], labels, centers, 0.5, out=centers, backend=backend)
    assert_matches(result.centers, expected.centers)
    assert_matches(result.grad, expected.grad)
    updates = centers[5:25]
    expected = centerkern.scatter_sub_update(centers, labels, updates.copy(), backend="numpy")
    assert_matches(centerkern.scatter_sub_update(centers, labels, updates, out=centers, backend=backend), expected)


def test_backends_lists_the_cpu_backends():
    assert centerkern.backends()[:2] == ("numpy", "numba")


def test_auto_runs_numba_for_host_arrays(monkeypatch):
    from centerkern._backends import numba_cpu as kernels_numba

    calls = []
    original = kernels_numba.center_loss_step
    monkeypatch.setattr(kernels_numba, "center_loss_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    features, labels, centers = _data()
    centerkern.center_loss(features, labels, centers, 0.5)
    assert calls == [1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", centerkern.RULES)
def test_grad_out_receives_the_grad_and_is_returned(backend, rule):
    features, labels, centers = _data()
    expected = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, backend="numpy")
    grad_out = np.full_like(features, np.nan)
    result = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, grad_out=grad_out, backend=backend)
    assert result.grad is grad_out
    assert_matches(grad_out, expected.grad, features, centers)
    assert_matches(result.centers, expected.centers, features, centers)


def test_grad_out_is_checked_before_anything_is_written():
    features, labels, centers = _data()
    before = centers.copy()
    cases = [
        (np.empty((40, 7), np.float32), ValueError, "grad_out must have the shape of features"),
        (np.empty((40, 8), np.float64), TypeError, "grad_out must have the dtype of features"),
        (np.lib.stride_tricks.as_strided(np.empty(8, np.float32), (40, 8), (0, 4), writeable=True), ValueError,
         "grad_out overlaps itself"),
        (features, ValueError, "grad_out overlaps features"),
    ]
    read_only = np.empty((40, 8), np.float32)
    read_only.flags.writeable = False
    cases.append((read_only, ValueError, "grad_out is read-only"))
    for grad_out, error, message in cases:
        with pytest.raises(error, match=message):
            centerkern.center_loss(features, labels, centers, 0.5, out=centers, grad_out=grad_out)
    np.testing.assert_array_equal(centers, before)
    shared = np.empty((45, 8), np.float32)
    with pytest.raises(ValueError, match="grad_out overlaps out"):
        centerkern.center_loss(features, labels, centers, 0.5, out=shared[:5], grad_out=shared[4:44])
