"""The codebook functions on the cuda backend (``centerkern.cuda.codebooks``), against the NumPy
reference: collected where the backend can run (a GPU, or Numba's simulator in the separate
``NUMBA_ENABLE_CUDASIM=1`` process, where the launch shapes and tiles are shrunk so that these
small inputs span several tiles and blocks)."""

import numpy as np
import pytest

from conftest import BACKENDS, assert_matches, to_host

if "cuda" not in BACKENDS:
    pytest.skip("the cuda backend cannot run here (no GPU, and not Numba's simulator)", allow_module_level=True)

from numba import cuda  # noqa: E402

import centerkern.cuda  # noqa: E402
from centerkern import codebooks  # noqa: E402
from centerkern._backends import numpy_reference  # noqa: E402
from centerkern._core.codebooks import EMASettings  # noqa: E402

def _batch(seed, batch, width, num_codes, dtype, weighted, hot_share=0.7):
    """Rows, codes (most of them one hot code: heavy duplicates), a codebook and weights."""
    rng = np.random.default_rng(seed)
    codes = np.where(rng.random(batch) < hot_share, num_codes - 1, rng.integers(0, num_codes, batch))
    features = rng.standard_normal((batch, width)).astype(dtype)
    codebook = rng.standard_normal((num_codes, width)).astype(dtype)
    weights = np.where(rng.random(batch) < 0.2, 0.0, rng.uniform(0.5, 2.0, batch)) if weighted else None
    return features, codes, codebook, weights


def _state(codebook, seed=1):
    rng = np.random.default_rng(seed)
    cluster_size = rng.uniform(0.0, 3.0, codebook.shape[0]).astype(codebook.dtype)
    return cluster_size, (codebook * 2).astype(codebook.dtype), codebook.copy()


def _device(*arrays):
    return tuple(None if a is None else cuda.to_device(a) for a in arrays)


CASES = [  # (batch, width, num_codes, weighted, deterministic, dtype)
    (13, 5, 6, True, False, np.float32),
    (13, 5, 6, True, True, np.float64),
    (14, 3, 4, False, True, np.float32),
    (14, 3, 4, False, False, np.float64),
    (0, 4, 3, True, True, np.float32),  # an empty batch
    (9, 2, 1, False, False, np.float64),  # K = 1
]


@pytest.mark.parametrize("batch, width, num_codes, weighted, deterministic, dtype", CASES,
                         ids=lambda value: np.dtype(value).name if isinstance(value, type) else str(value))
def test_cuda_codebook_functions_equal_reference(batch, width, num_codes, weighted, deterministic, dtype):
    features, codes, codebook, weights = _batch(batch + width, batch, width, num_codes, dtype, weighted)
    device_features, device_codes, device_weights = _device(features, codes.astype(np.int32), weights)
    options = {"weights": weights}
    device_options = {"weights": device_weights, "deterministic": deterministic}

    assignment = codebooks.assign_codes(device_features, cuda.to_device(codebook))  # auto -> cuda
    expected = codebooks.assign_codes(features, codebook, backend="numpy")
    np.testing.assert_array_equal(to_host(assignment.codes), expected.codes)
    assert to_host(assignment.distances).dtype == dtype
    assert_matches(assignment.distances, expected.distances, features, codebook)

    sums = codebooks.class_sums(device_features, device_codes, num_codes, **device_options)
    expected_sums = codebooks.class_sums(features, codes, num_codes, backend="numpy", **options)
    for got, want in zip(sums, expected_sums):
        assert to_host(got).dtype == np.float64
        assert_matches(got, want, features)

    for smoothing in codebooks.SMOOTHINGS:
        reference_state, state = _state(codebook), _device(*_state(codebook))
        counts = codebooks.ema_update(device_features, device_codes, *state, decay=0.8, eps=1e-3,
                                      smoothing=smoothing, **device_options)
        expected_counts = codebooks.ema_update(features, codes, *reference_state, decay=0.8, eps=1e-3,
                                               smoothing=smoothing, backend="numpy", **options)
        np.testing.assert_array_equal(to_host(counts), expected_counts)
        for got, want in zip(state, reference_state):
            assert_matches(got, want, features, codebook)

    reference_state, state = _state(codebook), _device(*_state(codebook))
    codebooks.ema_apply(*_device(*expected_sums), *state, decay=0.5)
    codebooks.ema_apply(*expected_sums, *reference_state, decay=0.5, backend="numpy")
    for got, want in zip(state, reference_state):
        assert_matches(got, want, features, codebook)

    weight_sums = np.where(np.arange(num_codes) % 2 == 0, 0.0, 2.5).astype(dtype)
    reference_state, state = (codebook.copy(), weight_sums.copy()), _device(codebook, weight_sums)
    counts = codebooks.kmeans_update(device_features, device_codes, *state, **device_options)
    expected_counts = codebooks.kmeans_update(features, codes, *reference_state, backend="numpy", **options)
    np.testing.assert_array_equal(to_host(counts), expected_counts)
    for got, want in zip(state, reference_state):
        assert_matches(got, want, features, codebook)

    reference_state, state = _state(codebook), _device(*_state(codebook))
    quantized = codebooks.quantize(device_features, *state, **device_options)
    expected = codebooks.quantize(features, *reference_state, backend="numpy", **options)
    np.testing.assert_array_equal(to_host(quantized.codes), expected.codes)
    np.testing.assert_array_equal(to_host(quantized.quantized), expected.quantized)
    np.testing.assert_array_equal(to_host(quantized.counts), expected.counts)
    for got, want in zip(state, reference_state):
        assert_matches(got, want, features, codebook)


@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_backend_functions_take_the_reference_signatures(deterministic):
    """``centerkern.cuda``'s five codebook functions on Numba arrays, as the reference's on NumPy's."""
    features, codes, codebook, weights = _batch(5, 17, 3, 4, np.float64, weighted=True)
    settings = EMASettings(0.9, 1e-5, laplace=True)
    codes_out, distances = cuda.device_array(17, np.int64), cuda.device_array(17, np.float64)
    centerkern.cuda.assign_codes(cuda.to_device(features), cuda.to_device(codebook), codes_out, distances)
    expected_codes, expected_distances = np.empty(17, np.int64), np.empty(17)
    numpy_reference.assign_codes(features, codebook, expected_codes, expected_distances)
    np.testing.assert_array_equal(codes_out.copy_to_host(), expected_codes)
    assert_matches(distances, expected_distances, features, codebook)

    counts, sums = cuda.device_array(4, np.float64), cuda.device_array((4, 3), np.float64)
    centerkern.cuda.class_sums(*_device(features, codes, weights), counts, sums, deterministic=deterministic)
    expected_counts, expected_sums = np.empty(4), np.empty((4, 3))
    numpy_reference.class_sums(features, codes, weights, expected_counts, expected_sums)
    assert_matches(counts, expected_counts, features)
    assert_matches(sums, expected_sums, features)

    state, reference_state = _device(*_state(codebook)), _state(codebook)
    centerkern.cuda.ema_step(*_device(features, codes, weights), *state, settings, deterministic=deterministic)
    numpy_reference.ema_step(features, codes, weights, *reference_state, settings)
    for got, want in zip(state, reference_state):
        assert_matches(got, want, features, codebook)

    state, reference_state = _device(*_state(codebook)), _state(codebook)
    centerkern.cuda.ema_apply(*_device(expected_counts, expected_sums), *state, settings)
    numpy_reference.ema_apply(expected_counts, expected_sums, *reference_state, settings)
    for got, want in zip(state, reference_state):
        assert_matches(got, want, features, codebook)

    weight_sums = np.array([0.0, 1.0, 0.0, 3.0])
    state, reference_state = _device(codebook, weight_sums), (codebook.copy(), weight_sums.copy())
    centerkern.cuda.kmeans_update(*_device(features, codes, weights), *state, deterministic=deterministic)
    numpy_reference.kmeans_update(features, codes, weights, *reference_state)
    for got, want in zip(state, reference_state):
        assert_matches(got, want, features, codebook)


def test_cuda_deterministic_sums_are_the_same_bits_every_run():
    """Each code's rows added in batch order: the reference's ``np.add.at`` bits (unweighted,
    no product to fuse), on every run, for a hot code holding most of the batch."""
    features, codes, _, _ = _batch(3, 31, 3, 4, np.float32, weighted=False, hot_share=0.9)
    features *= np.float32(1e4) ** np.random.default_rng(2).uniform(-1, 1, features.shape).astype(np.float32)
    expected = codebooks.class_sums(features, codes, 4, backend="numpy")
    device_features, device_codes = _device(features, codes)
    for _ in range(2):
        got = codebooks.class_sums(device_features, device_codes, 4, deterministic=True)
        np.testing.assert_array_equal(to_host(got.counts), expected.counts)
        np.testing.assert_array_equal(to_host(got.sums), expected.sums)


def test_cuda_assignment_breaks_ties_to_the_lowest_index():
    codebook = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    features = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [4.0, 4.0], [0.0, 1.0]])
    codes, distances = codebooks.assign_codes(cuda.to_device(features), cuda.to_device(codebook))
    np.testing.assert_array_equal(to_host(codes), [0, 1, 0, 4, 1])
    np.testing.assert_array_equal(to_host(distances), [0.0, 0.0, 0.5, 2.0, 0.0])


@pytest.mark.parametrize("bad", [-1, 4, 2**63 + 3], ids=["negative", "K", "past-int64"])
def test_cuda_bad_code_raises_and_nothing_is_written(bad):
    features, codes, codebook, weights = _batch(4, 12, 3, 4, np.float32, weighted=True)
    codes = codes.astype(np.uint64 if bad > 2**62 else np.int64)
    codes[5], codes[9] = np.array(bad).astype(codes.dtype), 1
    codes[10] = np.array(bad).astype(codes.dtype)
    device_features, device_codes, device_weights = _device(features, codes, weights)
    message = f"label {bad} at position 5 is out of range"
    state = _device(*_state(codebook))
    for deterministic in (False, True):
        with pytest.raises(IndexError, match=message):
            codebooks.ema_update(device_features, device_codes, *state, weights=device_weights,
                                 deterministic=deterministic)
        with pytest.raises(IndexError, match=message):
            codebooks.class_sums(device_features, device_codes, 4, deterministic=deterministic)
    for got, want in zip(state, _state(codebook)):
        np.testing.assert_array_equal(to_host(got), want)
    centers, weight_sums = _device(codebook, np.ones(4, np.float32))
    with pytest.raises(IndexError, match=message):
        codebooks.kmeans_update(device_features, device_codes, centers, weight_sums)
    np.testing.assert_array_equal(to_host(centers), codebook)
    np.testing.assert_array_equal(to_host(weight_sums), np.ones(4))


@pytest.mark.parametrize("bad_weight", [-1.0, np.nan, np.inf])
def test_cuda_bad_weight_raises_and_nothing_is_written(bad_weight):
    features, codes, codebook, weights = _batch(6, 10, 3, 4, np.float64, weighted=True)
    weights[7] = bad_weight
    state = _device(*_state(codebook))
    for function in (codebooks.ema_update, codebooks.quantize):
        arguments = (cuda.to_device(features), cuda.to_device(codes)) if function is codebooks.ema_update \
            else (cuda.to_device(features),)
        with pytest.raises(ValueError, match="weights must be finite and >= 0"):
            function(*arguments, *state, weights=cuda.to_device(weights))
    for got, want in zip(state, _state(codebook)):
        np.testing.assert_array_equal(to_host(got), want)


def test_cuda_state_arrays_are_checked():
    features, codes, codebook, _ = _batch(8, 6, 2, 3, np.float64, weighted=False)
    cluster_size, embed_avg, embed = _device(*_state(codebook))
    device_features, device_codes = _device(features, codes)
    with pytest.raises(ValueError, match="embed_avg and embed share memory"):
        codebooks.ema_update(device_features, device_codes, cluster_size, embed, embed)
    with pytest.raises(ValueError, match="must live in device memory"):
        codebooks.ema_update(device_features, device_codes, cluster_size, embed_avg, codebook.copy())
    with pytest.raises(TypeError, match="cluster_size must have dtype float64"):
        codebooks.ema_update(device_features, device_codes, cuda.to_device(np.ones(3, np.float32)), embed_avg, embed)
    with pytest.raises(ValueError, match="computes in host memory but got a device array"):
        codebooks.class_sums(device_features, device_codes, 3, backend="numba")
    np.testing.assert_array_equal(to_host(embed), codebook)


def test_cuda_backend_on_host_arrays_returns_host_arrays():
    features, codes, codebook, weights = _batch(9, 11, 3, 5, np.float32, weighted=True)
    got = codebooks.class_sums(features, codes.tolist(), 5, weights=weights, backend="cuda")
    expected = codebooks.class_sums(features, codes, 5, weights=weights, backend="numpy")
    assert isinstance(got.sums, np.ndarray) and isinstance(got.counts, np.ndarray)
    assert_matches(got.sums, expected.sums, features)
    assignment = codebooks.assign_codes(features, codebook, backend="cuda")
    assert isinstance(assignment.codes, np.ndarray)
    np.testing.assert_array_equal(assignment.codes, codebooks.assign_codes(features, codebook, backend="numpy").codes)


def test_cuda_ema_codebook_on_torch_cuda_tensors_equals_the_cpu_module():
    """EMACodebook's buffers on a GPU (torch CUDA tensors, the cuda kernels on torch's stream)
    move as on the CPU, step after step, and vector-quantize-pytorch's Codebook on the GPU agrees."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA and a GPU")
    from centerkern.torch import EMACodebook

    torch.manual_seed(0)
    on_cpu = EMACodebook(16, 256, decay=0.9)
    on_gpu = EMACodebook(16, 256, decay=0.9).cuda()
    on_gpu.load_state_dict(on_cpu.state_dict())
    vector_quantize = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    peer = vector_quantize.Codebook(16, 256, decay=0.9, dead_code_threshold_ratio=0.0).cuda()
    peer.load_state_dict({name: value.cuda() for name, value in on_cpu.state_dict().items()}, strict=False)
    for _ in range(3):
        x = torch.randn(4, 128, 16)
        quantize, codes, counts = on_gpu(x.cuda())
        expected_quantize, expected_codes, expected_counts = on_cpu(x)
        peer_quantize, peer_codes, _ = peer(x.cuda())
        assert quantize.is_cuda and torch.equal(codes.cpu(), expected_codes) and torch.equal(counts.cpu(), expected_counts)
        assert torch.equal(peer_codes.cpu(), expected_codes)
        torch.testing.assert_close(quantize.cpu(), expected_quantize)
        torch.testing.assert_close(peer_quantize.cpu(), expected_quantize)
        for name in ("cluster_size", "embed_avg", "embed"):
            torch.testing.assert_close(getattr(on_gpu, name).cpu(), getattr(on_cpu, name), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(getattr(peer, name).cpu(), getattr(on_cpu, name), rtol=1e-5, atol=1e-5)
