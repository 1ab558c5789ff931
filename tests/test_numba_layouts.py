"""The numba backend's two layouts (``kernels_numba``): each gives the same bits at 1 and 2
threads, both agree with the reference, the per-call choice picks the one the plan calls for,
and the plain-NumPy path leaves the label check to the kernel without writing anything first."""

import numba
import numpy as np
import pytest

import centerkern
from centerkern._core import validation as _validation
from centerkern._backends.numba_cpu import driver as kernels_numba
from centerkern._core.rules import rule_coefficients

from conftest import assert_matches

LAYOUTS = ("batch order", "label order")


def _batch(batch_size, width, classes, seed=0):
    """Labels in which every role of the plan occurs: singletons, classes local to one block,
    classes spread over blocks with one row in some (re-read) and several in others (slots)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(10, classes, batch_size)
    labels[rng.random(batch_size) < 0.3] = 0  # spread, several rows per block
    labels[5:9] = 1  # local to the first block
    labels[70] = labels[batch_size - 10] = 2  # spread, one row per block
    labels[71] = 3  # a singleton: every other label is 0, 1, 2 or at least 10
    features = rng.standard_normal((batch_size, width)).astype(np.float32)
    centers = rng.standard_normal((classes, width)).astype(np.float32)
    return features, labels, centers


def _step(layout, rule, features, labels, centers, threads):
    coefficients = rule_coefficients(rule, 0.9, *features.shape)
    target = centers.copy()
    grad = np.empty_like(features)
    grad_centers = np.zeros_like(centers)
    written = target if coefficients.moves_centers else grad_centers
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        loss = kernels_numba.center_loss_step(features, labels, target, grad, written, coefficients, layout=layout)
    finally:
        numba.set_num_threads(previous)
    assert kernels_numba.last_layout() == layout
    return loss, grad, target, grad_centers


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs Numba to be allowed 2 threads")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rule", ["facenet", "wen", "pytorch"])
@pytest.mark.parametrize("shape", [(2048, 40, 3000), (200, 6, 50)], ids=["parallel", "serial"])
def test_each_layout_gives_the_same_bits_at_1_and_2_threads(layout, rule, shape):
    features, labels, centers = _batch(*shape)
    one = _step(layout, rule, features, labels, centers, threads=1)
    two = _step(layout, rule, features, labels, centers, threads=2)
    assert one[0] == two[0]
    for a, b in zip(one[1:], two[1:]):
        np.testing.assert_array_equal(a, b)
    expected = centerkern.center_loss(features, labels, centers, 0.9, rule=rule, backend="numpy")
    assert one[0] == pytest.approx(expected.loss, rel=1e-12)
    assert_matches(one[1], expected.grad, features, centers)
    if expected.grad_centers is None:
        assert_matches(one[2], expected.centers, features, centers)
    else:
        assert_matches(one[3], expected.grad_centers, features, centers)
        np.testing.assert_array_equal(one[2], centers)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs Numba to be allowed 2 threads")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_scatter_in_each_layout_gives_the_same_bits_at_1_and_2_threads(layout):
    features, labels, centers = _batch(2048, 40, 3000)
    results = []
    for threads in (1, 2):
        target = centers.copy()
        numba.set_num_threads(threads)
        try:
            kernels_numba.scatter_sub_update(target, labels, features, layout=layout)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        assert kernels_numba.last_layout() == layout
        results.append(target)
    np.testing.assert_array_equal(results[0], results[1])
    expected = centers.copy()
    np.subtract.at(expected, labels, features)
    assert_matches(results[0], expected, features, centers)


def test_the_layout_follows_the_plan():
    """Distinct classes leave pass B nothing: batch order. B well above K spreads most classes
    over many blocks: one pass in label order reads each row once."""
    rng = np.random.default_rng(1)
    features = rng.standard_normal((4096, 16)).astype(np.float32)
    distinct = rng.permutation(100_000)[:4096]
    centerkern.center_loss(features, distinct, np.zeros((100_000, 16), np.float32), 0.5, backend="numba")
    assert kernels_numba.last_layout() == "batch order"
    crowded = rng.integers(0, 2000, 4096)
    centerkern.center_loss(features, crowded, np.zeros((2000, 16), np.float32), 0.5, backend="numba")
    assert kernels_numba.last_layout() == "label order"


@pytest.mark.parametrize("bad", [-1, 7, 2**40])
def test_the_plain_path_checks_labels_in_the_kernel_before_writing(bad, monkeypatch):
    """Plain NumPy inputs skip the full validation (it is made to fail here to prove it), and
    a bad label still raises SPEC's IndexError with nothing written."""

    def never(*args, **kwargs):
        raise AssertionError("the full validation ran for plain inputs")

    monkeypatch.setattr(_validation, "validate_center_loss", never)
    monkeypatch.setattr(_validation, "validate_scatter", never)
    features, labels, centers = _batch(300, 4, 30)
    labels, centers = labels % 7, centers[:7].copy()
    result = centerkern.center_loss(features, labels, centers.copy(), 0.5, out=None)  # plain: runs
    assert result.grad.shape == features.shape
    labels[123] = bad
    kept, grad_out = centers.copy(), np.full_like(features, 3.0)
    with pytest.raises(IndexError, match=rf"label {bad} at position 123 is out of range: labels must lie in \[0, 7\)"):
        centerkern.center_loss(features, labels, kept, 0.5, out=kept, grad_out=grad_out)
    np.testing.assert_array_equal(kept, centers)
    np.testing.assert_array_equal(grad_out, 3.0)
    with pytest.raises(IndexError, match=rf"label {bad} at position 123"):
        centerkern.scatter_sub_update(kept, labels, features, out=kept)
    np.testing.assert_array_equal(kept, centers)


def test_inputs_that_are_not_plain_take_the_full_validation(monkeypatch):
    features, labels, centers = _batch(100, 4, 30)
    variants = [dict(labels=labels.astype(np.int32)), dict(features=np.asfortranarray(features)),
                dict(labels=labels.tolist()), dict(alpha=1)]
    arguments = [dict(features=features, labels=labels, centers=centers, alpha=0.5) | variant for variant in variants]
    expected = [centerkern.center_loss(backend="numpy", **each) for each in arguments]
    calls = []
    original = _validation.validate_center_loss
    monkeypatch.setattr(_validation, "validate_center_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    for each, reference in zip(arguments, expected):
        result = centerkern.center_loss(backend="numba", **each)
        assert_matches(result.centers, reference.centers, features, centers)
    assert len(calls) == len(variants)


def test_the_scratch_grows_and_is_kept_per_thread():
    """A call that needs more float scratch than the thread holds grows it, runs, and gives the
    reference's result; the next call of that size reuses it."""
    kernels_numba._scratch.floats = np.empty(0)
    features, labels, centers = _batch(2048, 40, 3000)
    expected = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    result = centerkern.center_loss(features, labels, centers, 0.5, backend="numba")
    assert_matches(result.centers, expected.centers, features, centers)
    kept = kernels_numba._scratch.floats
    assert kept.size > 0
    centerkern.center_loss(features, labels, centers, 0.5, backend="numba")
    assert kernels_numba._scratch.floats is kept


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_only_inputs_are_only_read(layout):
    """Features, labels and updates the caller made read-only: the kernels write none of them."""
    features, labels, centers = _batch(2048, 40, 3000)
    for array in (features, labels):
        array.flags.writeable = False
    target = centers.copy()
    kernels_numba.scatter_sub_update(target, labels, features, layout=layout)
    expected = centers.copy()
    np.subtract.at(expected, labels, features)
    assert_matches(target, expected, features, centers)
    result = centerkern.scatter_sub_update(centers, labels, features, backend="numba")
    assert_matches(result, expected, features, centers)
    reference = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    step = centerkern.center_loss(features, labels, centers, 0.5, backend="numba")
    assert_matches(step.centers, reference.centers, features, centers)


def test_torch_cpu_tensors_take_the_plain_path(monkeypatch):
    """torch CPU tensors are read through NumPy views, without the full validation, and come
    back as torch tensors; the in-place update bumps the centers' version counter for autograd."""
    torch = pytest.importorskip("torch")
    features, labels, centers = _batch(300, 8, 40)
    expected = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    expected_scatter = centerkern.scatter_sub_update(centers, labels, features, backend="numpy")

    def never(*args, **kwargs):
        raise AssertionError("the full validation ran for torch CPU tensors")

    monkeypatch.setattr(_validation, "validate_center_loss", never)
    monkeypatch.setattr(_validation, "validate_scatter", never)
    tensor = torch.tensor(centers)
    version = tensor._version
    x = torch.tensor(features, requires_grad=True)
    result = centerkern.center_loss(x, torch.tensor(labels), tensor, 0.5, out=tensor)
    assert result.centers is tensor and tensor._version > version
    assert isinstance(result.grad, torch.Tensor) and isinstance(result.loss, float)
    assert result.loss == pytest.approx(expected.loss, rel=1e-9)
    assert_matches(result.grad.numpy(), expected.grad, features, centers)
    assert_matches(tensor.numpy(), expected.centers, features, centers)
    scattered = centerkern.scatter_sub_update(torch.tensor(centers), torch.tensor(labels), torch.tensor(features))
    assert isinstance(scattered, torch.Tensor)
    assert_matches(scattered.numpy(), expected_scatter, features, centers)


def test_a_large_grad_centers_is_zero_where_no_sample_fell():
    """rule pytorch's K x D grad_centers is zeroed by every thread from 4 MB on; fresh pages or
    reused ones, the classes absent from the batch must read zero."""
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((20_000, 64)).astype(np.float32)  # 5 MB
    features = rng.standard_normal((500, 64)).astype(np.float32)
    labels = rng.integers(0, 20_000, 500)
    expected = centerkern.center_loss(features, labels, centers, 0.5, rule="pytorch", backend="numpy")
    for _ in range(3):  # the allocator may hand back the previous call's memory, unzeroed
        kept = centerkern.center_loss(features, labels, centers, 0.5, rule="pytorch", backend="numba")
        kept.grad_centers[...] = 7.0
        del kept
        result = centerkern.center_loss(features, labels, centers, 0.5, rule="pytorch", backend="numba")
        untouched = np.setdiff1d(np.arange(20_000), labels)
        np.testing.assert_array_equal(result.grad_centers[untouched], 0.0)
        assert_matches(result.grad_centers, expected.grad_centers, features, centers)
