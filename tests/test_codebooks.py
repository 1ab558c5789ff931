"""centerkern.codebooks on the host: the numba kernels against the NumPy reference on inputs
built to break them (heavy duplicates, dead codes, weights, one code, empty batches, strided
state), the assignment against a brute-force argmin, and the input checks (nothing written)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from centerkern import codebooks

DTYPES = [np.float32, np.float64]
TOLERANCE = {np.float32: 2e-5, np.float64: 1e-12}


def _batch(seed, rows, num_codes, width, dtype, hot=None):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(rows, width)).astype(dtype)
    codes = rng.integers(0, num_codes if hot is None else hot, size=rows)
    state = (rng.uniform(0.0, 3.0, size=num_codes).astype(dtype), rng.normal(size=(num_codes, width)).astype(dtype),
             rng.normal(size=(num_codes, width)).astype(dtype))
    return features, codes, state


def _close(got, expected, dtype):
    np.testing.assert_allclose(got, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", codebooks.SMOOTHINGS)
@pytest.mark.parametrize("rows, num_codes, hot", [(300, 50, None), (300, 50, 3), (5, 1, None), (0, 7, None),
                                                   (2000, 700, 40)])
def test_ema_update_equals_the_reference(dtype, smoothing, rows, num_codes, hot):
    features, codes, state = _batch(1, rows, num_codes, 6, dtype, hot)
    weights = np.random.default_rng(2).uniform(0, 2, size=rows)
    for use_weights in (False, True):
        expected, got = [s.copy() for s in state], [s.copy() for s in state]
        options = dict(decay=0.9, eps=1e-3, smoothing=smoothing, weights=weights if use_weights else None)
        counts_reference = codebooks.ema_update(features, codes, *expected, backend="numpy", **options)
        counts = codebooks.ema_update(features, codes, *got, **options)
        np.testing.assert_array_equal(counts, counts_reference)
        np.testing.assert_array_equal(counts, np.bincount(codes, minlength=num_codes))
        for g, e in zip(got, expected):
            _close(g, e, dtype)


def test_ema_update_follows_the_formulas_by_hand():
    # two rows of code 1, none of code 0: N = (0.5, 0.5 + 0.5*2), m_1 = 0.5*1 + 0.5*(2+4)
    embed = np.array([[0.0, 0.0], [1.0, 1.0]])
    for smoothing, code_1 in [("laplace", 3.5 / ((1.5 + 0.1) / (2.0 + 0.2) * 2.0)), ("current_code", (3.5 + 0.1) / 1.6)]:
        cluster_size, embed_avg, state_embed = np.ones(2), embed.copy(), embed.copy()
        codebooks.ema_update([[2.0, 2.0], [4.0, 4.0]], [1, 1], cluster_size, embed_avg, state_embed, decay=0.5,
                             eps=0.1, smoothing=smoothing)
        np.testing.assert_allclose(cluster_size, [0.5, 1.5])
        np.testing.assert_allclose(embed_avg, [[0.0, 0.0], [3.5, 3.5]])
        np.testing.assert_allclose(state_embed[1], [code_1, code_1])


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 80), num_codes=st.integers(1, 12), width=st.integers(1, 5), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES))
def test_class_sums_and_kmeans_equal_the_reference_with_heavy_duplicates(rows, num_codes, width, seed, dtype):
    rng = np.random.default_rng(seed)
    # integer-valued features: float sums are exact, so every order of summation gives the same bits
    features = rng.integers(-4, 5, size=(rows, width)).astype(dtype)
    codes = rng.integers(0, min(num_codes, 3), size=rows)
    weights = rng.integers(0, 3, size=rows).astype(np.float64)
    expected, got = codebooks.class_sums(features, codes, num_codes, weights=weights, backend="numpy"), \
        codebooks.class_sums(features, codes, num_codes, weights=weights)
    np.testing.assert_array_equal(got.counts, expected.counts)
    np.testing.assert_array_equal(got.sums, expected.sums)
    naive = np.zeros((num_codes, width))
    for row, code in enumerate(codes):
        naive[code] += weights[row] * features[row]
    np.testing.assert_array_equal(got.sums, naive)

    centers = rng.normal(size=(num_codes, width)).astype(dtype)
    weight_sums = rng.integers(0, 4, size=num_codes).astype(dtype)
    reference_state, state = (centers.copy(), weight_sums.copy()), (centers.copy(), weight_sums.copy())
    codebooks.kmeans_update(features, codes, *reference_state, weights=weights, backend="numpy")
    codebooks.kmeans_update(features, codes, *state, weights=weights)
    for g, e in zip(state, reference_state):
        _close(g, e, dtype)
    untouched = np.bincount(codes, weights=weights, minlength=num_codes) == 0
    np.testing.assert_array_equal(state[0][untouched], centers[untouched])  # scikit-learn leaves them as they are


def test_ema_apply_of_class_sums_is_ema_update():
    features, codes, state = _batch(3, 500, 60, 8, np.float64, hot=20)
    fused, split = [s.copy() for s in state], [s.copy() for s in state]
    codebooks.ema_update(features, codes, *fused, decay=0.7, eps=1e-4, smoothing="laplace")
    counts, sums = codebooks.class_sums(features, codes, 60)
    codebooks.ema_apply(counts, sums, *split, decay=0.7, eps=1e-4, smoothing="laplace")
    for f, s in zip(fused, split):
        np.testing.assert_allclose(f, s, rtol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_fortran_state_is_updated_in_place(dtype):
    features, codes, (cluster_size, embed_avg, embed) = _batch(4, 200, 30, 5, dtype, hot=10)
    expected = [s.copy() for s in (cluster_size, embed_avg, embed)]
    codebooks.ema_update(features, codes, *expected, backend="numpy")
    wide_sizes = np.zeros((30, 2), dtype)
    wide_sizes[:, 0] = cluster_size
    fortran_avg, fortran_embed = np.asfortranarray(embed_avg), np.asfortranarray(embed)
    codebooks.ema_update(np.asfortranarray(features), codes, wide_sizes[:, 0], fortran_avg, fortran_embed)
    for got, e in zip((wide_sizes[:, 0], fortran_avg, fortran_embed), expected):
        _close(got, e, dtype)
    assert not wide_sizes[:, 1].any()


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_assignment_is_the_brute_force_argmin(backend, dtype):
    rng = np.random.default_rng(5)
    features = rng.normal(size=(3000, 7)).astype(dtype)
    codebook = rng.normal(size=(600, 7)).astype(dtype)  # rows x codes > one tile: several tiles
    codes, distances = codebooks.assign_codes(features, codebook, backend=backend)
    exact = ((features.astype(np.float64)[:, None, :] - codebook.astype(np.float64)[None]) ** 2).sum(-1)
    nearest = exact.argmin(1)
    differs = codes != nearest
    # where the codes differ, the two distances are equal to within the product's rounding
    gap = exact[np.arange(len(codes)), codes] - exact[np.arange(len(codes)), nearest]
    assert differs.mean() < 0.01 and np.all(gap[differs] <= 1e-5 * exact.max())
    np.testing.assert_allclose(distances, exact[np.arange(len(codes)), codes], rtol=TOLERANCE[dtype])
    assert distances.dtype == dtype and codes.dtype == np.int64


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_assignment_breaks_ties_as_argmin(backend):
    codebook = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    features = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    codes, distances = codebooks.assign_codes(features, codebook, backend=backend)
    np.testing.assert_array_equal(codes, [0, 0, 0, 0])
    np.testing.assert_array_equal(distances, [1.0, 0.0, 0.5, 1.0])


def test_quantize_gathers_the_codes_before_the_update():
    features, _, state = _batch(6, 400, 32, 4, np.float32)
    before = state[2].copy()
    expected = [s.copy() for s in state]
    result = codebooks.quantize(features, *state, decay=0.8, smoothing="current_code")
    codes, distances = codebooks.assign_codes(features, before)
    np.testing.assert_array_equal(result.codes, codes)
    np.testing.assert_array_equal(result.quantized, before[codes])
    np.testing.assert_array_equal(result.counts, np.bincount(codes, minlength=32))
    codebooks.ema_update(features, codes, *expected, decay=0.8, smoothing="current_code")
    for got, e in zip(state, expected):
        np.testing.assert_array_equal(got, e)
    frozen = [s.copy() for s in state]
    codebooks.quantize(features, *state, update=False)
    for got, e in zip(state, frozen):
        np.testing.assert_array_equal(got, e)


def test_torch_tensors_are_updated_in_place_and_results_are_tensors():
    torch = pytest.importorskip("torch")
    features, codes, state = _batch(7, 100, 16, 4, np.float32)
    tensors = [torch.from_numpy(s.copy()) for s in state]
    expected = [s.copy() for s in state]
    counts = codebooks.ema_update(torch.from_numpy(features), torch.from_numpy(codes), *tensors)
    codebooks.ema_update(features, codes, *expected, backend="numpy")
    assert isinstance(counts, torch.Tensor)
    for got, e in zip(tensors, expected):
        _close(got.numpy(), e, np.float32)


def _bad_inputs(features, codes, state):
    cluster_size, embed_avg, embed = state
    bad_codes = codes.copy()
    bad_codes[7] = 16
    yield IndexError, "label 16 at position 7", (features, bad_codes, *state), {}
    yield IndexError, "label -1", (features, np.full_like(codes, -1), *state), {}
    yield TypeError, "dtypes must match", (features.astype(np.float64), codes, *state), {}
    yield TypeError, "cluster_size must have dtype", (features, codes, cluster_size.astype(np.float64), embed_avg, embed), {}
    yield ValueError, "embed_avg must have shape", (features, codes, cluster_size, embed_avg[:-1], embed), {}
    yield ValueError, "shares memory with features", (embed_avg, codes[:16], cluster_size, embed_avg, embed), {}
    yield ValueError, "embed_avg and embed share memory", (features, codes, cluster_size, embed, embed), {}
    yield ValueError, "weights must be finite", (features, codes, *state), {"weights": np.full(len(codes), -1.0)}
    yield ValueError, "weights must have one value per row", (features, codes, *state), {"weights": np.ones(3)}
    yield ValueError, "decay must lie in", (features, codes, *state), {"decay": 1.5}
    yield ValueError, "unknown smoothing", (features, codes, *state), {"smoothing": "none"}
    yield ValueError, "labels of shape", (features, codes[:-1], *state), {}


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_bad_input_raises_naming_it_and_writes_nothing(backend):
    features, codes, state = _batch(8, 40, 16, 3, np.float32)
    for error, words, args, options in _bad_inputs(features, codes, state):
        snapshot = [np.array(a, copy=True) for a in args]
        with pytest.raises(error, match=words):
            codebooks.ema_update(*args, backend=backend, **options)
        for before, after in zip(snapshot, args):
            np.testing.assert_array_equal(before, after)


def test_kmeans_update_refuses_bad_state_before_writing():
    centers, weight_sums = np.zeros((4, 2)), np.zeros(4)
    with pytest.raises(ValueError, match="weight_sums must have shape"):
        codebooks.kmeans_update(np.ones((3, 2)), [0, 1, 2], centers, np.zeros(5))
    with pytest.raises(IndexError, match="label 4 at position 2"):
        codebooks.kmeans_update(np.ones((3, 2)), [0, 1, 4], centers, weight_sums)
    assert not centers.any() and not weight_sums.any()
    with pytest.raises(ValueError, match="unknown backend"):
        codebooks.kmeans_update(np.ones((3, 2)), [0, 1, 2], centers, weight_sums, backend="gpu")


def test_quantize_and_ema_apply_refuse_bad_state_before_writing():
    features, codes, (cluster_size, embed_avg, embed) = _batch(9, 50, 16, 3, np.float32)
    snapshot = [s.copy() for s in (cluster_size, embed_avg, embed)]
    with pytest.raises(ValueError, match="embed_avg must have shape"):
        codebooks.quantize(features, cluster_size, embed_avg[:-1], embed)
    with pytest.raises(ValueError, match="weights must be finite"):
        codebooks.quantize(features, cluster_size, embed_avg, embed, weights=np.full(50, np.nan))
    counts, sums = codebooks.class_sums(features, codes, 16)
    with pytest.raises(ValueError, match="sums must have shape"):
        codebooks.ema_apply(counts, sums[:, :2], cluster_size, embed_avg, embed)
    with pytest.raises(TypeError, match="cluster_size must have dtype"):
        codebooks.ema_apply(counts, sums, cluster_size.astype(np.float64), embed_avg, embed)
    for got, before in zip((cluster_size, embed_avg, embed), snapshot):
        np.testing.assert_array_equal(got, before)


def test_a_state_array_whose_elements_share_memory_is_refused():
    features, codes, (cluster_size, embed_avg, embed) = _batch(10, 20, 4, 3, np.float64)
    one_row_four_times = np.lib.stride_tricks.as_strided(embed_avg[:1], shape=(4, 3), strides=(0, 8), writeable=True)
    with pytest.raises(ValueError, match="embed_avg overlaps itself"):
        codebooks.ema_update(features, codes, cluster_size, one_row_four_times, embed)


def test_minibatch_kmeans_checks_its_settings_when_made():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        codebooks.MiniBatchKMeans(np.zeros((2, 2)), backend="gpu")
    with pytest.raises(TypeError, match="init must be float32 or float64"):
        codebooks.MiniBatchKMeans(np.zeros((2, 2), np.int64))
    kmeans = codebooks.MiniBatchKMeans([[0, 0], [4, 4]])  # a list of ints is numbers, read as float64
    assert kmeans.cluster_centers_.dtype == np.float64
