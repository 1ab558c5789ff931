"""The calls whose host time ``gpu_host_time.py`` (the driver stubbed) and ``gpu_check.py`` (on a
GPU, the real driver) measure, and how: the same cases, the same timing, in both.

Timing: the thread's CPU time of ``calls`` calls in a row, in many short rounds, each round
preceded by 1000 calls of a trivial Python function, its calibration, so that a figure can be
read on any machine in "trivial-call units" (host time / time of 1000 trivial calls). Noise on
a shared machine only ever adds time: the quietest round of each (the least disturbed) is
reported, host time over calibration, with the medians of the rounds beside them.

Counted, in one further call of each case (not timed): Python-level function calls (a stubbed
driver call counts as one C call, as the real binding is), kernel launches, memsets, the
allocator's calls (torch's, the pool's), host waits, the kernel parameters a plan holds and the
pointer cells a call writes into it (driver calls only where the driver is stubbed).
"""

from __future__ import annotations

import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import centerkern
from centerkern.cuda import launcher


def stubbed_driver_counts() -> collections.Counter:
    """The stubbed driver's counts, or an empty counter where the driver is the real one."""
    stub = sys.modules.get("stubbed_driver")
    return stub.counts if stub is not None else collections.Counter()


BATCH, WIDTH, CLASSES = 64, 8, 100  # host time does not depend on the sizes; the CPU path's comparison size
GOAL_STEP_UNITS, GOAL_GATHER_UNITS = 40 / 35, 15 / 35


def trivial():
    pass


def calibration_us() -> float:
    """CPU time of 1000 calls of a trivial Python function, in µs."""
    start = time.thread_time_ns()
    for _ in range(1000):
        trivial()
    return (time.thread_time_ns() - start) / 1e3


def arrays_of(framework: str, device: str | None = None):
    rng = np.random.default_rng(0)
    host = (rng.standard_normal((BATCH, WIDTH)).astype(np.float32), rng.integers(0, CLASSES, BATCH),
            rng.standard_normal((CLASSES, WIDTH)).astype(np.float32),
            rng.standard_normal((BATCH, WIDTH)).astype(np.float32))
    if framework == "torch":
        import torch

        return tuple(torch.from_numpy(a).to(device or "cpu") for a in host)
    if framework == "numba":
        if device is None:  # the stubbed driver's memory
            import stubbed_driver

            return tuple(stubbed_driver.numba_array(a) for a in host)
        from numba import cuda

        return tuple(cuda.to_device(a) for a in host)
    if framework == "cupy":
        import cupy

        return tuple(cupy.asarray(a) for a in host)
    return host  # "numpy": the CPU path, for comparison


def cases_of(framework: str, device: str | None = None):
    """(name, framework, call) of every call measured, on ``framework``'s arrays (on ``device``, a
    torch device name, where the driver is real)."""
    features, labels, centers, updates = arrays_of(framework, device)
    on_device = framework != "numpy"
    backend = "auto" if on_device else "numba"
    syncs = (False, True) if on_device else (False,)
    cases = []

    def case(name, function, *args, **settings):
        cases.append((name, framework, lambda: function(*args, backend=backend, **settings)))

    for rule in ("facenet", "wen", "pytorch"):
        for sync in syncs:
            case(f"center_loss {rule} sync={sync}", centerkern.center_loss, features, labels, centers, 0.5,
                 rule=rule, out=centers, sync=sync)
    case("center_loss facenet sync=False deterministic", centerkern.center_loss, features, labels, centers, 0.5,
         out=centers, sync=False, deterministic=True)
    if on_device:
        case("center_loss facenet sync=False out=None", centerkern.center_loss, features, labels, centers, 0.5,
             sync=False)
        from centerkern.cuda import repeat

        def as_a_first_call():  # its signature forgotten before each call: the plain path, and its plan
            repeat._repeats.by_key = {}
            centerkern.center_loss(features, labels, centers, 0.5, out=centers, sync=False)
        cases.append(("center_loss facenet sync=False, a new signature each call", framework, as_a_first_call))
    for sync in syncs:
        case(f"gather_centers sync={sync}", centerkern.gather_centers, centers, labels, sync=sync)
        case(f"scatter_sub_update sync={sync}", centerkern.scatter_sub_update, centers, labels, updates,
             out=centers, sync=sync)
    return cases


class _Calls:
    """Function calls of one call: Python frames, and C calls (a stubbed driver call as one)."""

    def __init__(self):
        self.python = self.c = 0
        self.torch_allocations = 0
        self._stub = str(Path(__file__).resolve().parent / "stubbed_driver.py")

    def __call__(self, frame, event, argument):
        if event == "call":
            if frame.f_code.co_filename == self._stub:
                if frame.f_back is None or frame.f_back.f_code.co_filename != self._stub:
                    self.c += 1  # the driver call the stub stands for
            else:
                self.python += 1
        elif event == "c_call":
            if frame.f_code.co_filename != self._stub:
                self.c += 1
            if getattr(argument, "__name__", "") in ("empty", "zeros") and getattr(argument, "__module__", "") == "torch":
                self.torch_allocations += 1


def count(call) -> dict:
    used = []
    real_run = launcher.LaunchPlan.run

    def run(plan, stream, pointers):
        used.append(plan)
        return real_run(plan, stream, pointers)

    launcher.LaunchPlan.run = run
    driver = stubbed_driver_counts()
    driver.clear()
    calls = _Calls()
    sys.setprofile(calls)
    try:
        call()
    finally:
        sys.setprofile(None)
        launcher.LaunchPlan.run = real_run
    return {
        "python_calls": calls.python,
        "c_calls": calls.c,
        "launches": driver["cuLaunchKernel"],
        "memsets": driver["cuMemsetD32Async"],
        "pool_allocations": driver["cuMemAllocFromPoolAsync"],
        "pool_frees": driver["cuMemFreeAsync"],
        "torch_allocations": calls.torch_allocations,
        "host_waits": driver["cuStreamSynchronize"] + driver["cuCtxSynchronize"],
        "kernel_parameters": sum(len(entry[1]) for plan in used for entry in plan.launches),
        "pointer_cells_written": sum(len(cells) for plan in used for _, _, cells in plan.patches),
    }


def warm(call) -> None:
    for _ in range(20):  # plans made, caches filled
        call()


def rounds_of(call, calls: int, rounds: int) -> list[tuple[float, float]]:
    """``rounds`` rounds of ``calls`` calls: (host µs per call, calibration µs) of each."""
    measured = []
    for _ in range(rounds):
        calibration = calibration_us()
        start = time.thread_time_ns()
        for _ in range(calls):
            call()
        measured.append(((time.thread_time_ns() - start) / 1e3 / calls, calibration))
    return measured


def summary(measured: list[tuple[float, float]]) -> dict:
    """The quietest host time and calibration of the rounds, their ratio, and the medians."""
    per_call = [host for host, _ in measured]
    host, calibration = min(per_call), min(c for _, c in measured)
    return {"host_us": round(host, 2), "units": round(host / calibration, 3), "calibration_us": round(calibration, 2),
            "median_host_us": round(statistics.median(per_call), 2),
            "median_units": round(statistics.median(h / c for h, c in measured), 3), "rounds": len(measured)}


def time_per_call(call, calls: int, rounds: int) -> dict:
    return summary(rounds_of(call, calls, rounds))
