"""The cuda backend's real host path with the CUDA driver stubbed (``benchmarks/stubbed_driver.py``):
what a call asks of the driver, in which order, with which parameters. No GPU and no simulator.

The stub patches torch, Numba and the driver bindings for good, so this file runs in a pytest
process of its own (``tests/test_cuda_host.py`` starts it); it is not collected with the rest.
"""

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import stubbed_driver  # noqa: E402

stubbed_driver.install()

import torch  # noqa: E402

import centerkern  # noqa: E402
from centerkern.cuda import kernels, launcher  # noqa: E402
from centerkern.cuda.views import DeviceView  # noqa: E402

B, D, K = 40, 6, 9


def _torch_batch(seed=0):
    rng = np.random.default_rng(seed)
    return (torch.from_numpy(rng.standard_normal((B, D)).astype(np.float32)),
            torch.from_numpy(rng.integers(0, K, B)), torch.from_numpy(rng.standard_normal((K, D)).astype(np.float32)))


@pytest.fixture
def driver_calls(monkeypatch):
    """Every driver call in order, as (name, capture mode relaxed at the time)."""
    from cuda.bindings import driver

    calls, relaxed = [], {"on": False}
    for name in stubbed_driver.RECORDED:
        real = getattr(driver, name)

        def recorded(*args, name=name, real=real):
            if name == "cuThreadExchangeStreamCaptureMode":
                relaxed["on"] = args[0] == driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
            calls.append((name, relaxed["on"]))
            return real(*args)

        monkeypatch.setattr(driver, name, recorded)
    return calls


def _names(calls):
    return [name for name, _ in calls]


def test_a_torch_step_is_one_memset_and_three_launches_on_the_plan(driver_calls):
    features, labels, centers = _torch_batch()
    for rule in ("facenet", "wen", "pytorch"):
        centerkern.center_loss(features, labels, centers, 0.5, rule=rule, out=centers, sync=False)  # plan made
        driver_calls.clear()
        result = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, out=centers, sync=False)
        names = _names(driver_calls)
        clears = 2 if rule == "pytorch" else 1  # the temporary's counters; rule pytorch's fresh grad_centers
        assert names.count("cuLaunchKernel") == 3 and names.count("cuMemsetD32Async") == clears
        assert names.index("cuMemsetD32Async") < names.index("cuLaunchKernel")  # cleared before the first kernel
        assert "cuStreamSynchronize" not in names and "cuMemcpyDtoHAsync" not in names  # no host wait
        assert isinstance(result.loss, torch.Tensor) and result.loss.shape == ()
        assert result.centers is centers and result.grad.shape == (B, D)


def test_sync_true_waits_once_for_its_own_verdict(driver_calls):
    features, labels, centers = _torch_batch()
    centerkern.center_loss(features, labels, centers, 0.5, out=centers)
    driver_calls.clear()
    centerkern.center_loss(features, labels, centers, 0.5, out=centers)
    names = _names(driver_calls)
    assert names[-2:] == ["cuMemcpyDtoHAsync", "cuStreamSynchronize"]
    assert names.count("cuStreamSynchronize") == 1


def test_out_none_copies_the_centers_in_a_fourth_launch(driver_calls):
    features, labels, centers = _torch_batch()
    centerkern.center_loss(features, labels, centers, 0.5, sync=False)
    driver_calls.clear()
    result = centerkern.center_loss(features, labels, centers, 0.5, sync=False)
    assert _names(driver_calls).count("cuLaunchKernel") == 4 and result.centers is not centers


def test_plan_cells_hold_numbas_parameters_with_each_calls_pointers(monkeypatch):
    """A plan made for one call, run with another call's pointers, hands the driver exactly the
    parameters Numba's calling convention gives those arrays: the plan only patches pointers."""
    launched = []
    from cuda.bindings import driver

    def launch(handle, gx, gy, gz, bx, by, bz, shared, stream, parameters, extra):
        launched.append(parameters)
        return (driver.CUresult.CUDA_SUCCESS,)

    monkeypatch.setattr(driver, "cuLaunchKernel", launch)
    float32, int64 = np.dtype(np.float32), np.dtype(np.int64)
    temporary = DeviceView(None, 1 << 20, (4096,), (1,), np.dtype(np.uint8), False, None)
    matrix = DeviceView(None, 1 << 30, (5, 3), (12, 4), float32, False, None)
    vector = DeviceView(None, 1 << 31, (5,), (8,), int64, False, None)
    part = temporary.part(64, (5,), int64)
    launches = [launcher.Launch(kernels.classify, 2, 64, (vector, 7, part)),
                launcher.Launch(kernels.fill_rows, (3, 2), 32, (matrix, 0.25))]
    plan = launcher.LaunchPlan(launches, {"vector": vector, "matrix": matrix, "temporary": temporary}, [11, 12])
    moved = {"vector": 5000, "matrix": 9000, "temporary": 7000}
    plan.run(0, (moved["vector"], moved["matrix"], moved["temporary"]))

    def at(view, pointer):
        return DeviceView(None, pointer, view.shape, view.strides, view.dtype, False, None)

    expected = [launcher.kernel_parameters((at(vector, 5000), 7, at(part, 7064))),
                launcher.kernel_parameters((at(matrix, 9000), 0.25))]
    for parameters, wanted in zip(launched, expected):
        pointers = (ctypes.c_void_p * len(wanted)).from_address(parameters)
        got = [ctypes.c_double.from_address(pointers[i]).value if format_ == "d"
               else ctypes.c_int64.from_address(pointers[i]).value for i, (format_, _) in enumerate(wanted)]
        assert got == [value for _, value in wanted]


def test_numba_array_results_come_from_the_pool_and_go_back_in_stream_order(driver_calls):
    """Results of calls on Numba arrays are the pool's (cuMemAllocFromPoolAsync), freed with
    cuMemFreeAsync when dropped; the temporary goes back once the kernels are queued. Nothing
    through Numba's own synchronous allocations (which the stub does not answer)."""
    rng = np.random.default_rng(1)
    features, labels, centers = (stubbed_driver.numba_array(a) for a in (
        rng.standard_normal((B, D)).astype(np.float32), rng.integers(0, K, B),
        rng.standard_normal((K, D)).astype(np.float32)))
    centerkern.center_loss(features, labels, centers, 0.5, out=centers, sync=False)
    driver_calls.clear()
    result = centerkern.center_loss(features, labels, centers, 0.5, out=centers, sync=False)
    names = _names(driver_calls)
    assert names.count("cuMemAllocFromPoolAsync") == 3  # the grad, the loss, the temporary
    assert names.count("cuMemFreeAsync") == 1  # the temporary, after the launches
    assert names.index("cuMemFreeAsync") > max(i for i, n in enumerate(names) if n == "cuLaunchKernel")
    assert type(result.grad).__name__ == "DeviceNDArray" and result.grad.shape == (B, D)
    driver_calls.clear()
    del result
    import gc

    gc.collect()
    assert _names(driver_calls).count("cuMemFreeAsync") == 2  # the grad and the loss, when dropped


def test_a_captured_first_call_asks_about_capture_first_and_sets_up_relaxed(driver_calls, monkeypatch):
    """Under capture, a call's first driver question is whether its stream captures (of the
    framework's stream, before anything of Numba's), and every one-time setup (the error record's
    pinned memory, loading kernels) runs with this thread's capture mode relaxed."""
    from centerkern.cuda import record

    monkeypatch.setattr(record, "_records", {})  # as in a fresh process: no record yet
    monkeypatch.setitem(stubbed_driver.capturing, "on", True)
    numba_setup = []
    from numba import cuda

    real_device = cuda.get_current_device
    monkeypatch.setattr(cuda, "get_current_device", lambda: numba_setup.append(len(driver_calls)) or real_device())
    features, labels, centers = _torch_batch(2)
    centerkern.center_loss(features, labels, centers, 0.5, out=centers, sync=False)
    assert driver_calls[0][0] == "cuStreamIsCapturing"
    setup = [(name, relaxed) for name, relaxed in driver_calls if name in ("cuMemHostAlloc", "cuMemPoolCreate")]
    assert setup == [("cuMemHostAlloc", True)]
    assert not any(relaxed for name, relaxed in driver_calls if name in ("cuLaunchKernel", "cuMemsetD32Async"))
    with pytest.raises(ValueError, match="pass sync=False to capture"):
        centerkern.center_loss(features, labels, centers, 0.5, out=centers)


def test_a_failing_driver_call_is_raised_in_words(monkeypatch):
    from cuda.bindings import driver

    features, labels, centers = _torch_batch()
    monkeypatch.setattr(driver, "cuLaunchKernel",
                        lambda *args: (driver.CUresult.CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,))
    with pytest.raises(RuntimeError, match="cuLaunchKernel failed: CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"):
        centerkern.center_loss(features, labels, centers, 0.5, out=centers, sync=False)


def test_a_failed_stream_ordered_free_warns_instead_of_passing_silently(monkeypatch):
    from cuda.bindings import driver

    from centerkern.cuda import pool

    monkeypatch.setattr(driver, "cuMemFreeAsync", lambda pointer, stream: (driver.CUresult.CUDA_ERROR_INVALID_VALUE,))
    with pytest.warns(RuntimeWarning, match="cuMemFreeAsync of device memory at 0x1000 failed"):
        pool.free_later(0x1000, 5)()


def test_the_plain_path_and_the_full_path_launch_the_same(driver_calls):
    """Inputs the plain path refuses (a strided out) take the full validation, which ends in the
    same launches."""
    features, labels, centers = _torch_batch(3)
    wide = torch.zeros((K, 2 * D))
    strided = wide[:, ::2]
    strided.copy_(centers)
    centerkern.center_loss(features, labels, strided, 0.5, out=strided, sync=False)
    driver_calls.clear()
    centerkern.center_loss(features, labels, strided, 0.5, out=strided, sync=False)
    assert _names(driver_calls).count("cuLaunchKernel") == 3
