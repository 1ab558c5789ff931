"""The cuda backend on device arrays: collected only where it can run (a GPU, or Numba's
simulator in the separate ``make test-cudasim`` process). The host-array cases of the shared
suites (seed example, properties, errors) run for ``cuda`` there too."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

import centerkern
import centerkern.cuda

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
    assert to_host(result.loss).shape == () and to_host(result.loss).dtype == np.float64  # on the device, 0-d
    assert float(to_host(result.loss)) == pytest.approx(reference.loss, rel=1e-9, abs=1e-300)
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


@pytest.mark.parametrize("rule", centerkern.RULES)
@pytest.mark.parametrize("separate_out", [False, True])
def test_cuda_bad_device_label_raises_and_nothing_is_written(rule, separate_out):
    features, labels, centers, updates = _batch(3, 20, 5, 4)
    labels[13], labels[17] = 4, -1
    device_centers = cuda.to_device(centers)
    out = cuda.to_device(np.full_like(centers, 7.0)) if separate_out else device_centers
    before = to_host(out)
    with pytest.raises(IndexError, match=r"label 4 at position 13.*\[0, 4\)"):
        centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), device_centers, 0.5, rule=rule,
                               out=out)
    with pytest.raises(IndexError, match=r"label 4 at position 13"):
        centerkern.scatter_sub_update(device_centers, cuda.to_device(labels), cuda.to_device(updates), out=out)
    with pytest.raises(IndexError, match=r"label 4 at position 13"):
        centerkern.gather_centers(device_centers, cuda.to_device(labels))
    np.testing.assert_array_equal(to_host(device_centers), centers)
    np.testing.assert_array_equal(to_host(out), before)
    centerkern.cuda.check_errors()  # each error was raised once, and is gone


def test_cuda_sync_false_defers_the_error_to_the_next_call_or_check_errors():
    features, labels, centers, _ = _batch(4, 20, 5, 4)
    bad = labels.copy()
    bad[6] = 9
    device_centers = cuda.to_device(centers)
    result = centerkern.center_loss(cuda.to_device(features), cuda.to_device(bad), device_centers, 0.5,
                                    out=device_centers, sync=False)
    assert np.isnan(to_host(result.loss))  # the call returned; its loss says it computed nothing
    np.testing.assert_array_equal(to_host(device_centers), centers)
    with pytest.raises(IndexError, match=r"label 9 at position 6 .*\[0, 4\)"):
        centerkern.cuda.check_errors()
    centerkern.cuda.check_errors()  # raised once

    huge = labels.astype(np.uint64)
    huge[11] = 2**64 - 1
    centerkern.scatter_sub_update(cuda.to_device(centers), cuda.to_device(huge), cuda.to_device(features),
                                  sync=False)
    with pytest.raises(IndexError, match=rf"label {2**64 - 1} at position 11 "):  # as written, never wrapped
        centerkern.cuda.check_errors()

    gathered = centerkern.gather_centers(cuda.to_device(centers), cuda.to_device(bad), sync=False)
    assert np.isnan(to_host(gathered)).all()
    with pytest.raises(IndexError, match=r"label 9 at position 6"):  # the next call raises it
        centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), device_centers, 0.5,
                               out=device_centers)
    np.testing.assert_array_equal(to_host(device_centers), centers)  # ... before it writes anything
    reference = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    result = centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), device_centers, 0.5,
                                    out=device_centers, sync=False)
    centerkern.cuda.check_errors()
    assert float(to_host(result.loss)) == pytest.approx(reference.loss, rel=1e-9)
    assert_matches(device_centers, reference.centers, features, centers)


@pytest.mark.parametrize("rule", centerkern.RULES)
def test_cuda_bad_batch_under_sync_false_leaves_no_uninitialised_result(rule):
    """A caller that does not wait for the verdict must not train on memory nobody wrote: the
    backend's own fresh results of a bad call are NaN (the caller's own arrays are untouched)."""
    features, labels, centers, updates = _batch(12, 20, 5, 4)
    labels[9] = 4
    result = centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), cuda.to_device(centers), 0.5,
                                    rule=rule, sync=False)
    for fresh in (result.loss, result.grad, result.centers, result.grad_centers):
        if fresh is not None:
            assert np.isnan(to_host(fresh)).all()
    with pytest.raises(IndexError, match="label 4 at position 9"):
        centerkern.cuda.check_errors()
    scattered = centerkern.scatter_sub_update(cuda.to_device(centers), cuda.to_device(labels),
                                              cuda.to_device(updates), sync=False)
    assert np.isnan(to_host(scattered)).all()
    with pytest.raises(IndexError, match="label 4 at position 9"):
        centerkern.cuda.check_errors()


def test_cuda_strided_labels_of_any_shape_on_the_device():
    features, labels, centers, _ = _batch(13, 24, 3, 5)
    reference = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    wide = np.zeros((2, 3, 2, 4), labels.dtype)
    wide[:, :, :, ::2] = labels.reshape(2, 3, 2, 2)
    strided = cuda.to_device(wide)[:, :, :, ::2]  # 24 labels in a 4-D non-contiguous view
    result = centerkern.center_loss(cuda.to_device(features), strided, cuda.to_device(centers), 0.5)
    assert_matches(result.centers, reference.centers, features, centers)


def test_cuda_host_inputs_keep_a_float_loss_and_ignore_sync():
    features, labels, centers, _ = _batch(5, 12, 3, 4)
    reference = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    result = centerkern.center_loss(features, labels, centers, 0.5, backend="cuda", sync=False)
    assert isinstance(result.loss, float) and result.loss == pytest.approx(reference.loss, rel=1e-9)
    assert isinstance(result.centers, np.ndarray)
    assert_matches(result.centers, reference.centers, features, centers)


def test_cuda_stream_keyword():
    features, labels, centers, updates = _batch(6, 30, 5, 6, hot_share=0.5)
    reference = centerkern.center_loss(features, labels, centers, 0.5, rule="wen", backend="numpy")
    stream = cuda.stream()
    device_centers = cuda.to_device(centers)
    result = centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), device_centers, 0.5,
                                    rule="wen", out=device_centers, stream=stream, sync=False)
    stream.synchronize()
    assert float(to_host(result.loss)) == pytest.approx(reference.loss, rel=1e-9)
    assert_matches(device_centers, reference.centers, features, centers)
    expected = centerkern.scatter_sub_update(centers, labels, updates, backend="numpy")
    scattered = centerkern.scatter_sub_update(cuda.to_device(centers), cuda.to_device(labels),
                                              cuda.to_device(updates), stream=0)
    assert_matches(scattered, expected, centers, updates)
    with pytest.raises(TypeError, match="stream must be"):
        centerkern.gather_centers(cuda.to_device(centers), cuda.to_device(labels), stream="default")


def test_cuda_spanning_sums_are_float64_in_both_modes():
    """A class spanning tiles adds its tiles' partial sums in float64, as SPEC promises: with
    float32 partials, 2**24 + 1 rounds to 2**24 in the first tile and the 1 is lost."""
    tile_rows = centerkern.cuda.kernels.TILE_ROWS
    updates = np.zeros((2 * tile_rows, 1), np.float32)
    updates[0], updates[1], updates[tile_rows] = 2.0**24, 1.0, -(2.0**24)
    labels = np.zeros(2 * tile_rows, np.int64)
    expected = centerkern.scatter_sub_update(np.zeros((1, 1), np.float32), labels, updates, backend="numpy")
    assert expected[0, 0] == -1.0
    for deterministic in (False, True):
        got = centerkern.scatter_sub_update(np.zeros((1, 1), np.float32), labels, updates, backend="cuda",
                                            deterministic=deterministic)
        assert got[0, 0] == -1.0, deterministic


def _device_broadcast_rows(row):
    """A writable (4, D) device array whose four rows are one row of memory (row stride 0)."""
    if SIMULATED:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(np.lib.stride_tricks.as_strided(row, (4, row.size), (0, row.itemsize), writeable=True))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    device_row = cuda.to_device(row)
    return DeviceNDArray((4, row.size), (0, row.itemsize), row.dtype, gpu_data=device_row.gpu_data)


def test_cuda_out_that_overlaps_itself_is_refused():
    features, labels, centers, _ = _batch(7, 8, 3, 4)
    storage = np.zeros(3, np.float32)
    broadcast = np.lib.stride_tricks.as_strided(storage, shape=(4, 3), strides=(0, 4), writeable=True)
    device_broadcast = _device_broadcast_rows(np.zeros(3, np.float32))
    for out in (broadcast, device_broadcast):
        with pytest.raises(ValueError, match="out overlaps itself"):
            centerkern.center_loss(features, labels, centers, 0.5, out=out, backend="cuda")
    np.testing.assert_array_equal(storage, 0)
    np.testing.assert_array_equal(to_host(device_broadcast), 0)


def test_cuda_no_kernel_runs_before_every_kernel_of_the_call_is_ready(monkeypatch):
    """A failure while a call's kernels are prepared (a compile error, an interrupt) comes before
    the first launch that writes: out is left as it was."""
    from centerkern.cuda import driver
    from centerkern.cuda import kernels

    features, labels, centers, _ = _batch(8, 16, 3, 4)
    out = cuda.to_device(np.full_like(centers, 5.0))

    def failing_on_the_tile_kernel(real):
        def prepare(launches, *args):
            if any(launch.kernel is kernels.tile_step for launch in launches):
                raise KeyboardInterrupt
            return real(launches, *args)

        return prepare

    # the preparation of either launch path: a plan (the direct path), or Numba's compilation
    real_make_plan = driver.make_plan
    monkeypatch.setattr(driver, "make_plan", lambda key, launches, *args: failing_on_the_tile_kernel(
        lambda launches, *args: real_make_plan(key, launches, *args))(launches, *args))
    monkeypatch.setattr(driver, "compile_all", failing_on_the_tile_kernel(driver.compile_all))
    with pytest.raises(KeyboardInterrupt):
        centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), cuda.to_device(centers), 0.5,
                               out=out)
    np.testing.assert_array_equal(to_host(out), 5.0)  # the copy of the centers into out never ran
    monkeypatch.undo()
    reference = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), cuda.to_device(centers), 0.5, out=out)
    assert_matches(out, reference.centers, features, centers)


def test_cuda_launch_shape_is_one_compile_time_fact():
    from centerkern.cuda import kernels

    if SIMULATED:
        assert (kernels.TILE_ROWS, kernels.COLUMNS_PER_BLOCK) == (4, 4)  # CENTERKERN_CUDA_TILE, set by conftest
        assert not kernels._CACHE  # kernels of a shrunk shape never reach the disk cache
    else:
        assert (kernels.TILE_ROWS, kernels.COLUMNS_PER_BLOCK) == (64, 128) and kernels._CACHE


def test_cuda_launch_path_and_kernel_parameters():
    from centerkern.cuda import launcher
    from centerkern.cuda.views import DeviceView

    # the simulator has no driver to launch with; a GPU takes the direct path
    assert launcher.launch_path().startswith("numba dispatcher" if SIMULATED else "direct")
    view = DeviceView(None, 4096, (3, 5), (40, 8), np.dtype(np.float64), False, None)
    parameters = launcher.kernel_parameters((view, 7, 0.5, True))
    # Numba's calling convention for an array: meminfo, parent, nitems, itemsize, data, shape, strides;
    # each parameter in an 8-byte cell, as an int64 ("q") or a float64 ("d"), a bool as int 0 or 1
    assert parameters[:9] == [("q", v) for v in (0, 0, 15, 8, 4096, 3, 5, 40, 8)]
    assert parameters[9:] == [("q", 7), ("d", 0.5), ("q", 1)]
    # a named tuple (the rule's coefficients, the step's settings): its members, in order
    from centerkern._core.rules import SCATTER_SUB

    parameters = launcher.kernel_parameters((SCATTER_SUB, 3))
    assert parameters == [("d", 0.0), ("d", 0.0), ("d", -1.0), ("d", 0.0), ("q", 1), ("q", 3)]


def test_cuda_calls_of_other_sizes_one_after_another():
    """Each call's bookkeeping is its own: one call's classes never leak into the next."""
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


@pytest.mark.parametrize("rule", centerkern.RULES)
def test_cuda_grad_out_on_the_device(rule):
    features, labels, centers, _ = _batch(9, 18, 4, 5, hot_share=0.5)
    reference = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, backend="numpy")
    grad_out = cuda.to_device(np.full_like(features, np.nan))
    result = centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), cuda.to_device(centers), 0.5,
                                    rule=rule, grad_out=grad_out)
    assert result.grad is grad_out
    assert_matches(grad_out, reference.grad, features, centers)
    bad = labels.copy()
    bad[3] = 5
    grad_out = cuda.to_device(np.full_like(features, 3.0))
    with pytest.raises(IndexError, match="label 5 at position 3"):
        centerkern.center_loss(cuda.to_device(features), cuda.to_device(bad), cuda.to_device(centers), 0.5,
                               rule=rule, grad_out=grad_out)
    np.testing.assert_array_equal(to_host(grad_out), 3.0)  # not written on a bad batch
    with pytest.raises(ValueError, match="grad_out must live in device memory"):
        centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), cuda.to_device(centers), 0.5,
                               grad_out=np.empty_like(features))


def test_cuda_empty_batch_on_the_device():
    centers = np.arange(6, dtype=np.float32).reshape(3, 2)
    device_centers = cuda.to_device(centers)
    result = centerkern.center_loss(cuda.to_device(np.zeros((0, 2), np.float32)), cuda.to_device(np.zeros(0, np.int64)),
                                    device_centers, 0.5, out=device_centers)
    assert float(to_host(result.loss)) == 0.0 and to_host(result.grad).shape == (0, 2)
    np.testing.assert_array_equal(to_host(device_centers), centers)


def test_cuda_listed_by_backends():
    assert "cuda" in centerkern.backends()
    assert centerkern.cuda.is_available()


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
    assert report["simulator"] is SIMULATED and report["small"] is True and "errors" not in report
    assert report["launch_path"] == centerkern.cuda.launch_path()
    assert {"numpy", "numba", "centerkern", "numba-cuda"} <= set(report["versions"])
    assert report["first_call_seconds"] > 0
    assert report["property_checks"] == {"cases": 12, "failures": []}
    assert report["bad_label_check"] and all(problems == [] for problems in report["bad_label_check"].values())
    assert report["deterministic_check"]["deterministic"] == {"bitwise_identical_over_3_runs": True,
                                                              "equals_reference": True}
    assert set(report["timings"]) == {"B8192", "B65536", "B65536_hot"}
    for figures in report["timings"].values():
        assert figures["floor_bytes"]["step"] > figures["floor_bytes"]["scatter"] > 0
        assert {"centerkern step", "centerkern step, deterministic", "centerkern scatter",
                "centerkern scatter, deterministic"} <= set(figures["loops"])
        assert set(figures["loops"]) | set(figures["skipped"]) >= {
            "torch eager step", "torch eager scatter (index_add_)", "centerkern step, CUDA graph"}
        for loop in figures["loops"].values():
            assert loop["host_us_per_call"] > 0 and len(loop["runs_ms_per_call"]) == figures["repeats"]
    assert report["timings"]["B65536_hot"]["touched_classes"] < report["timings"]["B65536"]["touched_classes"]
    assert set(report["goals"]) == {"step_vs_torch_eager_B8192", "graph_step_over_floor_B8192", "step_over_floor_B65536",
                                    "hot_over_uniform_B65536", "deterministic_over_default", "host_overhead_us_per_call",
                                    "memory_outside_allocator_MB", "host_time_real_over_stubbed"}
    if SIMULATED:
        assert report["host_time"]["why"] == "the simulator has no driver to time"
    for goal in report["goals"].values():
        assert {"goal", "value", "target", "met"} <= set(goal) and isinstance(goal["met"], bool)
        assert goal["value"] is not None or goal["why"]
    if SIMULATED:
        assert report["bandwidth"]["TBps"] is None and report["bandwidth"]["why"]
        assert report["timings"]["B8192"]["loops"]["centerkern step"]["ms_per_call"] is None
        assert "torch eager step" in report["timings"]["B8192"]["skipped"]
    else:
        assert report["bandwidth"]["TBps"] > 0
        assert all(goal["value"] is not None for goal in report["goals"].values())
