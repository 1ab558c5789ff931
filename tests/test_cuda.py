"""The cuda backend on device arrays: collected only where it can run (a GPU, or Numba's
simulator in the separate ``make test-cudasim`` process). The host-array cases of the shared
suites (seed example, properties, errors) run for ``cuda`` there too."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

import centerkern
from centerkern import kernels_cuda

from conftest import MAX_BATCH, MAX_WIDTH, SIMULATED, assert_matches, to_host


def _batch(seed, batch, width, classes, hot_share=0.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(batch) < hot_share, rng.integers(0, min(2, classes), batch),
                      rng.integers(0, classes, batch))
    return (rng.standard_normal((batch, width)).astype(dtype), labels,
            rng.standard_normal((classes, width)).astype(dtype), rng.standard_normal((batch, width)).astype(dtype))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(0, MAX_BATCH), width=st.integers(1, MAX_WIDTH),
       classes=st.integers(1, 12), hot_share=st.sampled_from([0.0, 0.9]), rule=st.sampled_from(centerkern.RULES),
       dtype=st.sampled_from([np.float32, np.float64]), label_dtype=st.sampled_from([np.int32, np.int64]),
       deterministic=st.booleans())
def test_cuda_device_arrays_equal_reference(seed, batch, width, classes, hot_share, rule, dtype, label_dtype,
                                            deterministic):
    features, labels, centers, updates = _batch(seed, batch, width, classes, hot_share, dtype)
    labels = labels.astype(label_dtype)
    reference = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, backend="numpy")
    device_centers = cuda.to_device(centers)
    result = centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), device_centers, 0.5,
                                    rule=rule, out=device_centers, deterministic=deterministic)  # auto -> cuda
    assert result.centers is device_centers
    assert result.loss == pytest.approx(reference.loss, rel=1e-9, abs=1e-300)
    assert_matches(result.grad, reference.grad, features, centers)
    assert_matches(device_centers, reference.centers, features, centers)
    if rule == "pytorch":
        assert_matches(result.grad_centers, reference.grad_centers, features, centers)

    expected = centerkern.scatter_sub_update(centers, labels, updates, backend="numpy")
    device_centers = cuda.to_device(centers)
    scattered = centerkern.scatter_sub_update(device_centers, cuda.to_device(labels), cuda.to_device(updates),
                                              out=device_centers, deterministic=deterministic)
    assert scattered is device_centers
    assert_matches(scattered, expected, centers, updates)
    gathered = centerkern.gather_centers(cuda.to_device(centers), cuda.to_device(labels))
    np.testing.assert_array_equal(to_host(gathered), centers[labels])


@pytest.mark.parametrize("rule", centerkern.RULES)
def test_cuda_deterministic_mode_is_bitwise_identical_across_runs(rule):
    # a hot class spanning every tile, with awkward magnitudes so that summation order shows
    features, labels, centers, updates = _batch(11, 3 * MAX_BATCH, MAX_WIDTH, 7, hot_share=0.9)
    features *= np.float32(1e4) ** np.random.default_rng(1).uniform(-1, 1, features.shape).astype(np.float32)
    runs = []
    for _ in range(3):
        step = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, backend="cuda", deterministic=True)
        scattered = centerkern.scatter_sub_update(centers, labels, updates, backend="cuda", deterministic=True)
        runs.append((step.loss, step.grad, step.centers, step.grad_centers, scattered))
    for run in runs[1:]:
        assert run[0] == runs[0][0]
        for a, b in zip(run[1:], runs[0][1:]):
            np.testing.assert_array_equal(a, b)
    reference = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, backend="numpy")
    assert_matches(runs[0][2], reference.centers, features, centers)


def test_cuda_out_of_range_device_label_leaves_device_centers_alone():
    features, labels, centers, _ = _batch(3, 20, 5, 4)
    labels[13] = 4
    device_centers = cuda.to_device(centers)
    with pytest.raises(IndexError, match=r"label 4 at position 13.*\[0, 4\)"):
        centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), device_centers, 0.5,
                               out=device_centers)
    np.testing.assert_array_equal(to_host(device_centers), centers)


def test_cuda_bookkeeping_is_clean_between_calls_of_other_sizes():
    """The per-class scratch kept between calls must not leak one call's classes into the next."""
    for seed, (batch, classes) in enumerate([(30, 3), (7, 40), (33, 40), (1, 1), (25, 90), (30, 3)]):
        features, labels, centers, _ = _batch(seed, batch, 3, classes, hot_share=0.5)
        reference = centerkern.center_loss(features, labels, centers, 0.3, rule="wen", backend="numpy")
        result = centerkern.center_loss(features, labels, centers, 0.3, rule="wen", backend="cuda")
        assert_matches(result.centers, reference.centers, features, centers)


def test_cuda_strided_device_views_and_separate_out():
    features, labels, centers, _ = _batch(5, 24, 6, 5, hot_share=0.5, dtype=np.float64)
    wide = cuda.to_device(np.repeat(features, 2, axis=1))
    strided_features = wide[:, ::2]
    reference = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    out = cuda.to_device(np.full_like(centers, np.nan))
    device_centers = cuda.to_device(centers)
    result = centerkern.center_loss(strided_features, cuda.to_device(labels.reshape(-1, 1)), device_centers, 0.5,
                                    out=out)
    assert result.centers is out
    assert_matches(out, reference.centers, features, centers)
    np.testing.assert_array_equal(to_host(device_centers), centers)  # out=None semantics for the input


def test_cuda_listed_by_backends():
    assert "cuda" in centerkern.backends()
    assert kernels_cuda.is_available()


@pytest.mark.skipif(SIMULATED, reason="the simulator's device arrays are NumPy arrays")
def test_cuda_results_of_device_inputs_stay_on_the_device():
    features, labels, centers, _ = _batch(2, 16, 4, 3)
    result = centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), cuda.to_device(centers), 0.5)
    assert cuda.is_cuda_array(result.grad) and cuda.is_cuda_array(result.centers)


def test_cuda_gpu_check_script_runs(tmp_path):
    """benchmarks/gpu_check.py (the real-GPU check) at tiny sizes: its checks pass, its JSON is written."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    output = tmp_path / "gpu.json"
    assert gpu_check.main([str(output), "--small"]) == 0
    report = json.loads(output.read_text())
    assert report["property_checks"]["cases"] == 12 and report["property_checks"]["failures"] == []
    assert report["deterministic_check"]["deterministic"]["bitwise_identical_over_3_runs"]
    assert {"centerkern step", "device-to-device copy, floor bytes"} <= set(report["timings"][0]["median_ms"])
