"""Framework arrays in, the same framework out: torch, JAX, TensorFlow (CPU builds) and CuPy
(where a GPU is present), against the numpy backend on the same data."""

from contextlib import nullcontext

import numpy as np
import pytest

import centerkern
from conftest import assert_matches


def _data(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((23, 6)).astype(dtype)
    labels = np.array([0, 0, 0, 1, 1, 4, 4, 4, 4, 2] + [5] * 13)  # duplicates, hot class, absent class 3
    centers = rng.standard_normal((7, 6)).astype(dtype)
    return features, labels, centers


def _torch():
    torch = pytest.importorskip("torch")
    return torch, torch.from_numpy, lambda t: t.numpy(), torch.Tensor


def _jax():
    jax = pytest.importorskip("jax")
    return jax, jax.numpy.asarray, np.asarray, jax.Array


def _tensorflow():
    tf = pytest.importorskip("tensorflow")
    return tf, tf.constant, lambda t: t.numpy(), tf.Tensor


FRAMEWORKS = {"torch": _torch, "jax": _jax, "tensorflow": _tensorflow}


def _float64_allowed(framework):
    """JAX makes float64 arrays only in its x64 mode, switched on here for one test at a time."""
    return FRAMEWORKS[framework]()[0].enable_x64(True) if framework == "jax" else nullcontext()


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", centerkern.RULES)
def test_center_loss_returns_the_callers_framework(framework, dtype, rule):
    _, wrap, to_numpy, array_type = FRAMEWORKS[framework]()
    features, labels, centers = _data(dtype)
    expected = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, backend="numpy")
    with _float64_allowed(framework):
        result = centerkern.center_loss(wrap(features), wrap(labels), wrap(centers), 0.5, rule=rule)
    assert isinstance(result.loss, float)
    assert result.loss == pytest.approx(expected.loss, rel=1e-6)
    fields = ["grad", "centers"] + (["grad_centers"] if rule == "pytorch" else [])
    for field in fields:
        value = getattr(result, field)
        assert isinstance(value, array_type), (field, type(value))
        assert np.dtype(to_numpy(value).dtype) == np.dtype(dtype)
        assert_matches(to_numpy(value), getattr(expected, field), features, centers)
    assert result.grad_centers is None or rule == "pytorch"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_gather_and_scatter_return_the_framework_of_the_centers(framework):
    _, wrap, to_numpy, array_type = FRAMEWORKS[framework]()
    features, labels, centers = _data()
    gathered = centerkern.gather_centers(wrap(centers), wrap(labels))
    scattered = centerkern.scatter_sub_update(wrap(centers), wrap(labels), wrap(features))
    assert isinstance(gathered, array_type) and isinstance(scattered, array_type)
    np.testing.assert_array_equal(to_numpy(gathered), centers[labels])
    expected = centers.copy()
    np.subtract.at(expected, labels, features)
    assert_matches(to_numpy(scattered), expected, features, centers)
    # numpy features with framework centers: the centers decide for these two functions
    assert isinstance(centerkern.scatter_sub_update(wrap(centers), labels, features), array_type)


def test_torch_out_writes_into_the_tensors_own_storage():
    torch = pytest.importorskip("torch")
    features, labels, centers = _data()
    expected = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    out = torch.from_numpy(centers.copy())
    pointer = out.data_ptr()
    result = centerkern.center_loss(torch.from_numpy(features), torch.from_numpy(labels), out, 0.5, out=out)
    assert result.centers is out and out.data_ptr() == pointer
    assert_matches(out.numpy(), expected.centers, features, centers)

    scattered = torch.from_numpy(centers.copy())
    pointer = scattered.data_ptr()
    assert centerkern.scatter_sub_update(scattered, labels, torch.from_numpy(features), out=scattered) is scattered
    assert scattered.data_ptr() == pointer
    reference = centers.copy()
    np.subtract.at(reference, labels, features)
    assert_matches(scattered.numpy(), reference, features, centers)


def test_torch_tensors_that_require_grad_are_read_and_written_without_autograd():
    """A parameter as out= is updated as an optimizer would (no autograd record, same storage)."""
    torch = pytest.importorskip("torch")
    features, labels, centers = _data()
    expected = centerkern.center_loss(features, labels, centers, 0.5, rule="wen", backend="numpy")
    parameter = torch.nn.Parameter(torch.from_numpy(centers.copy()))
    tracked = torch.from_numpy(features).requires_grad_()
    result = centerkern.center_loss(tracked, labels, parameter, 0.5, rule="wen", out=parameter)
    assert result.centers is parameter and parameter.requires_grad
    assert not result.grad.requires_grad
    assert_matches(parameter.detach().numpy(), expected.centers, features, centers)


def test_torch_strided_and_integer_label_types():
    torch = pytest.importorskip("torch")
    features, labels, centers = _data(np.float64)
    wide = torch.from_numpy(np.repeat(features, 2, axis=1))[:, ::2]  # non-contiguous view
    expected = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    for label_dtype in (torch.int32, torch.int64, torch.uint8):
        result = centerkern.center_loss(wide, torch.from_numpy(labels).to(label_dtype), torch.from_numpy(centers), 0.5)
        assert_matches(result.centers.numpy(), expected.centers, features, centers)


@pytest.mark.parametrize("framework", ["jax", "tensorflow"])
def test_immutable_framework_out_is_a_clear_error_before_any_write(framework):
    _, wrap, _, _ = FRAMEWORKS[framework]()
    features, labels, centers = _data()
    snapshot = centers.copy()
    with pytest.raises(TypeError, match="out=None"):
        centerkern.center_loss(features, labels, centers, 0.5, out=wrap(centers))
    with pytest.raises(TypeError, match="cannot be updated in place"):
        centerkern.scatter_sub_update(wrap(centers), labels, wrap(features), out=wrap(centers))
    np.testing.assert_array_equal(centers, snapshot)


def test_errors_name_the_problem_for_framework_inputs():
    torch = pytest.importorskip("torch")
    features, labels, centers = _data()
    with pytest.raises(IndexError, match="label 7 at position 0"):
        centerkern.center_loss(torch.from_numpy(features), torch.tensor([7] + [0] * 22), torch.from_numpy(centers), 0.5)
    with pytest.raises(TypeError, match="dtypes must match"):
        centerkern.center_loss(torch.from_numpy(features).double(), torch.from_numpy(labels), torch.from_numpy(centers), 0.5)


def _cupy_on_device():
    cupy = pytest.importorskip("cupy")
    if "cuda" not in centerkern.backends() or not cupy.cuda.is_available():
        pytest.skip("CuPy arrays need a CUDA GPU")
    return cupy.asarray, cupy.asnumpy, lambda array: array.data.ptr, lambda array: isinstance(array, cupy.ndarray)


def _torch_on_device():
    torch = pytest.importorskip("torch")
    if "cuda" not in centerkern.backends() or not torch.cuda.is_available():
        pytest.skip("torch CUDA tensors need a CUDA GPU and a CUDA build of torch")
    return (lambda array: torch.from_numpy(array).cuda()), (lambda tensor: tensor.cpu().numpy()), \
        (lambda tensor: tensor.data_ptr()), (lambda tensor: isinstance(tensor, torch.Tensor) and tensor.is_cuda)


@pytest.mark.parametrize("make", [_cupy_on_device, _torch_on_device], ids=["cupy", "torch"])
def test_cuda_arrays_stay_on_the_device_and_out_writes_in_place(make):
    to_device, to_numpy, pointer_of, on_device = make()
    features, labels, centers = _data()
    expected = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    out = to_device(centers.copy())
    pointer = pointer_of(out)
    result = centerkern.center_loss(to_device(features), to_device(labels), out, 0.5, out=out)
    assert on_device(result.grad) and result.centers is out and pointer_of(out) == pointer
    assert on_device(result.loss) and to_numpy(result.loss).shape == () and to_numpy(result.loss).dtype == np.float64
    assert float(to_numpy(result.loss)) == pytest.approx(expected.loss, rel=1e-9)
    assert_matches(to_numpy(out), expected.centers, features, centers)
    assert_matches(to_numpy(result.grad), expected.grad, features, centers)


def test_cuda_cupy_arrays_run_on_cupys_current_stream():
    cupy = pytest.importorskip("cupy")
    to_device, to_numpy, _, _ = _cupy_on_device()
    features, labels, centers = _data()
    expected = centerkern.center_loss(features, labels, centers, 0.5, rule="wen", backend="numpy")
    out = to_device(centers)
    with cupy.cuda.Stream(non_blocking=True) as stream:
        late = to_device(features) * 1.0  # queued on the stream, as the step must be
        result = centerkern.center_loss(late, to_device(labels), out, 0.5, rule="wen", out=out, sync=False)
    stream.synchronize()
    assert float(to_numpy(result.loss)) == pytest.approx(expected.loss, rel=1e-9)
    assert_matches(to_numpy(out), expected.centers, features, centers)


def test_tensorflow_results_are_usable_by_tensorflow_ops():
    """Results shared with TensorFlow must meet its alignment, or its first op aborts the process:
    run ops on many results, whatever alignment NumPy happened to give them."""
    tf = pytest.importorskip("tensorflow")
    features, labels, centers = _data()
    expected = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    for rows in range(1, 24):
        result = centerkern.center_loss(tf.constant(features[:rows]), tf.constant(labels[:rows]), tf.constant(centers), 0.5)
        assert float(tf.reduce_sum(result.grad * 2.0)) == pytest.approx(2 * float(np.sum(
            centerkern.center_loss(features[:rows], labels[:rows], centers, 0.5, backend="numpy").grad)), rel=1e-4, abs=1e-5)
        tf.matmul(result.centers, result.centers, transpose_b=True)
    np.testing.assert_allclose(result.centers.numpy(), expected.centers, rtol=1e-5, atol=1e-6)


def test_tensorflow_gets_a_copy_of_a_misaligned_result_and_shares_an_aligned_one():
    tf = pytest.importorskip("tensorflow")
    from centerkern._core import interop as _interop

    convert = _interop.converter_like(tf.constant([1.0]))
    storage = np.zeros(64 + 8, np.float32)
    offset = (-storage.ctypes.data % 64) // 4  # elements up to the next 64-byte boundary
    aligned = storage[offset : offset + 8]
    misaligned = storage[offset + 1 : offset + 9]
    assert aligned.ctypes.data % 64 == 0 and misaligned.ctypes.data % 64 == 4
    misaligned[:] = np.arange(8, dtype=np.float32)  # aligned, one element behind, holds 0, 0, 1, ..., 6
    shared, copied = convert(aligned), convert(misaligned)
    assert float(tf.reduce_sum(copied * 2.0)) == 56.0  # a TensorFlow op on it runs (no abort)
    assert float(tf.reduce_sum(shared * 2.0)) == 42.0
    storage[:] = -1.0  # later writes: the shared tensor sees them, the copy does not
    assert float(tf.reduce_sum(shared)) == -8.0
    np.testing.assert_array_equal(copied.numpy(), np.arange(8, dtype=np.float32))
