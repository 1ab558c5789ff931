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
    """Results of calls on Numba arrays are the pool's (cuMemAllocFromPoolAsync), each given back
    with cuMemFreeAsync when it is dropped, in the context it was made in (whatever is current
    then); the temporary goes back once the kernels are queued. Nothing through Numba's own
    synchronous allocations (which the stub does not answer)."""
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
    assert result.loss.shape == () and result.loss.dtype == np.float64
    import gc

    driver_calls.clear()
    losses = [result.loss]  # a loop that keeps its losses keeps nothing else
    del result
    gc.collect()
    assert _names(driver_calls) == ["cuCtxGetCurrent", "cuMemFreeAsync"]  # the grad, in its context already
    driver_calls.clear()
    from cuda.bindings import driver

    real = driver.cuCtxGetCurrent
    driver.cuCtxGetCurrent = lambda: (driver.CUresult.CUDA_SUCCESS, driver.CUcontext(0))  # dropped in a thread
    try:                                                                            # with no context current
        del losses
        gc.collect()
    finally:
        driver.cuCtxGetCurrent = real
    assert _names(driver_calls) == ["cuCtxPushCurrent", "cuMemFreeAsync", "cuCtxPopCurrent"]


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
        block = object.__new__(pool.ResultBlock)
        block.pointer, block.stream_handle, block.context = 0x1000, 5, driver.CUcontext(1)
        block.free()


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


@pytest.fixture
def launched(monkeypatch):
    """The parameters of every launch, read from the cells the driver was handed: a list per launch."""
    from cuda.bindings import driver

    from centerkern.cuda import launcher as cuda_launcher

    calls = []
    real_run = cuda_launcher.LaunchPlan.run

    def run(plan, stream, pointers):
        real_run(plan, stream, pointers)
        for _, cells, _ in plan.launches:
            calls.append([ctypes.c_int64.from_address(address).value for address in cells])

    monkeypatch.setattr(cuda_launcher.LaunchPlan, "run", run)
    monkeypatch.setattr(driver, "cuLaunchKernel", lambda *args: (driver.CUresult.CUDA_SUCCESS,))
    return calls


@pytest.fixture
def temporaries(monkeypatch):
    from centerkern.cuda import memory

    made = []
    real = memory._TorchMemory.temporary

    def temporary(self, size):
        block = real(self, size)
        made.append((block.data_ptr(), size))
        return block

    monkeypatch.setattr(memory._TorchMemory, "temporary", temporary)
    return made


def _substituted(parameters, moves, temporary_moves):
    """``parameters`` with every pointer of ``moves`` ({old: new}) and every address inside an
    old temporary ([(old, new, size)]) replaced by its new place."""
    def move(value):
        if value in moves:
            return moves[value]
        for old, new, size in temporary_moves:
            if old <= value < old + size:
                return new + (value - old)
        return value
    return [[move(v) for v in launch] for launch in parameters]


@pytest.mark.parametrize("rule, out_given, sync", [("facenet", True, False), ("wen", True, True),
                                                   ("pytorch", True, False), ("facenet", False, False)])
def test_a_repeated_call_launches_what_the_whole_path_would_with_its_own_arrays(launched, temporaries, rule,
                                                                                  out_given, sync):
    """The second call of a signature (the repeat path) hands the driver the parameters the first
    call's plan was made with, every array moved to the second call's own: its inputs, its fresh
    results, its temporary. Nothing of the first call's is left in them."""
    from centerkern.cuda import repeat

    repeat._repeats.by_key = {}
    calls = []
    for seed in (4, 5):
        features, labels, centers = _torch_batch(seed)
        launched.clear()
        result = centerkern.center_loss(features, labels, centers, 0.5, rule=rule,
                                        out=centers if out_given else None, sync=sync)
        calls.append(((features, labels, centers), result, list(launched), temporaries[-1]))
    assert len(repeat._repeats.by_key) == 1  # the first call was remembered, the second repeated it
    (first_inputs, first, first_parameters, first_temporary), (second_inputs, second, second_parameters,
                                                                second_temporary) = calls
    moves = {a.data_ptr(): b.data_ptr() for a, b in zip(first_inputs, second_inputs)}
    for name in ("loss", "grad", "centers", "grad_centers"):
        if getattr(first, name) is not None and (name != "centers" or not out_given):  # the fresh results
            moves[getattr(first, name).data_ptr()] = getattr(second, name).data_ptr()
    expected = _substituted(first_parameters, moves, [(first_temporary[0], second_temporary[0], first_temporary[1])])
    assert second_parameters == expected
    stale = set(moves) - set(moves.values())
    assert not stale & {v for launch in second_parameters for v in launch}
    assert second.centers is (second_inputs[2] if out_given else second.centers)


def test_a_repeated_call_steps_aside_where_the_first_call_does_not_hold(driver_calls, monkeypatch):
    """Under capture, in another context, or with an output that overlaps an input, a call of a
    known signature takes the whole path: its checks, its copies, its one-time setup."""
    from centerkern.cuda import launcher as cuda_launcher, repeat

    features, labels, centers = _torch_batch(6)
    for _ in range(2):
        centerkern.center_loss(features, labels, centers, 0.5, out=centers, sync=False)
    taken = []
    real_run = repeat.Repeat.run
    monkeypatch.setattr(repeat.Repeat, "run", lambda self, *args: taken.append(real_run(self, *args)) or taken[-1])
    # features that are rows of the centers, of the same signature as before: the whole path copies them
    wide = torch.zeros((K + B, D))
    wide[:K] = centers
    inside, rows = wide[K - 3:K - 3 + B], wide[:K]
    driver_calls.clear()
    centerkern.center_loss(inside, labels, rows, 0.5, out=rows, sync=False)
    assert taken[-1] is None and _names(driver_calls).count("cuLaunchKernel") == 4  # a copy of the features first
    monkeypatch.setitem(stubbed_driver.capturing, "on", True)
    with pytest.raises(ValueError, match="pass sync=False to capture"):
        centerkern.center_loss(features, labels, centers, 0.5, out=centers, sync=True)
    centerkern.center_loss(features, labels, centers, 0.5, out=centers, sync=False)
    assert taken[-1] is None
    monkeypatch.setitem(stubbed_driver.capturing, "on", False)
    monkeypatch.setattr(cuda_launcher, "current_context", lambda: (7, 0))
    monkeypatch.setattr(repeat, "current_context", lambda: (7, 0))
    centerkern.center_loss(features, labels, centers, 0.5, out=centers, sync=False)
    assert taken[-1] is None


def test_a_repeated_call_raises_an_earlier_bad_label_before_it_launches(driver_calls):
    """A bad label left by an earlier sync=False call (here written into the record as the
    device would) is raised by the next call of a known signature before it launches anything."""
    from centerkern.cuda import kernels as cuda_kernels, record

    features, labels, centers = _torch_batch(7)
    for _ in range(2):
        centerkern.center_loss(features, labels, centers, 0.5, out=centers, sync=False)
    errors = next(iter(record._records.values()))
    ticket = int(errors.host[cuda_kernels.WRITTEN])
    base = cuda_kernels.RECORD_HEADER + (ticket % cuda_kernels.RECORD_SLOTS) * cuda_kernels.SLOT_FIELDS
    errors.host[base + 1:base + 5] = (5, 77, K, 0)
    errors.host[base] = ticket + 1
    errors.host[cuda_kernels.WRITTEN] = ticket + 1
    driver_calls.clear()
    with pytest.raises(IndexError, match="label 77 at position 5 "):
        centerkern.center_loss(features, labels, centers, 0.5, out=centers, sync=False)
    assert "cuLaunchKernel" not in _names(driver_calls)


def test_one_array_passed_as_two_is_part_of_the_signature(launched):
    """A call whose features are its centers (B = K, out=None: read-only, allowed) makes a plan of
    its own: a later call of the same shapes with two arrays is not launched with one pointer."""
    features, labels, centers = _torch_batch(8)
    square = torch.randn(K, D)
    labels_k = labels[:K].clone()
    centerkern.center_loss(square, labels_k, square, 0.5, sync=False)
    first, rows = centers.clone(), features[:K].clone()
    for _ in range(2):  # the second call of the signature is a repeat
        launched.clear()
        centerkern.center_loss(rows, labels_k, first, 0.5, sync=False)
        pointers = {v for launch in launched for v in launch}
        assert rows.data_ptr() in pointers and first.data_ptr() in pointers


def test_a_cpu_tensor_does_not_turn_the_repeat_path_off():
    """A call with a CPU parameter among CUDA tensors (it takes the full path) leaves later calls
    with CUDA parameters their repeat path: whether an array is plain is not a property of its type."""
    from centerkern.cuda import repeat

    features, labels, centers = _torch_batch(9)
    on_cpu = torch.nn.Parameter(centers.clone(), requires_grad=False)
    repeat._key_of_type.clear()
    torch.Tensor.is_cuda = property(lambda self: self is not on_cpu)  # stands for a CPU tensor
    try:
        with pytest.raises(ValueError, match="out must live in device memory"):
            centerkern.center_loss(features, labels, on_cpu, 0.5, out=on_cpu, sync=False)
    finally:
        torch.Tensor.is_cuda = property(lambda self: True)
    parameter = torch.nn.Parameter(centers.clone(), requires_grad=False)
    for _ in range(2):
        centerkern.center_loss(features, labels, parameter, 0.5, out=parameter, sync=False)
    outputs, _ = repeat.run("center_loss", (features, labels, parameter, parameter, None),
                            ("facenet", 0.5, float, False), None, False)
    assert outputs is not None


def test_alpha_true_is_refused_after_a_float_alpha():
    features, labels, centers = _torch_batch(10)
    for _ in range(2):
        centerkern.center_loss(features, labels, centers, 1.0, out=centers, sync=False)
    with pytest.raises(TypeError, match="alpha"):
        centerkern.center_loss(features, labels, centers, True, out=centers, sync=False)


def test_sparse_and_complex_tensors_get_the_validations_words():
    features, labels, centers = _torch_batch(11)
    with pytest.raises(TypeError, match="features must be float32 or float64"):
        centerkern.center_loss(features.to(torch.complex64).requires_grad_(), labels, centers, 0.5, sync=False)
    with pytest.raises(TypeError, match="features must be a dense array, got a torch.sparse_coo tensor"):
        centerkern.center_loss(features.to_sparse(), labels, centers, 0.5, sync=False)
