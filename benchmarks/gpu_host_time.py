"""Host time of the ``cuda`` backend's calls, measured without a GPU: the real path, the driver stubbed.

Each call runs the public function on device arrays (torch tensors, Numba device arrays, CuPy
arrays where CuPy imports), through validation, ``DeviceArrays``, the launch plans and the
allocators, with every CUDA driver call answered by a stub (``stubbed_driver``): what is
measured is the host's own work around the kernels, which the GPU cannot hide. The real driver
adds its own time per driver call (a few microseconds per launch); ``gpu_check.py`` measures the
same calls with it, on a GPU.

Timing: the thread's CPU time of ``--calls`` calls in a row, in many short rounds, each round
preceded by 1000 calls of a trivial Python function, its calibration, so that a figure can be
read on any machine in "trivial-call units" (host time / time of 1000 trivial calls). Noise on
a shared machine only ever adds time: the quietest round of each (the least disturbed) is
reported, host time over calibration, with the medians of the rounds beside them.

Counted, in one further call of each case (not timed): Python-level function calls (a stubbed
driver call counts as one C call, as the real binding is), kernel launches, memsets, the
allocator's calls (torch's, the pool's), the kernel parameters a plan holds and the pointer
cells a call writes into it.

Goals (issue "GPU host time"): a step on torch tensors or Numba arrays at most 40 µs where 1000
trivial calls take 35 µs (1.15 units), the gather at most 15 µs (0.43 units); at most 3 launches
and one temporary per step in the common case.

    python benchmarks/gpu_host_time.py            # benchmarks/results/gpu-host-<date>.json
    python benchmarks/gpu_host_time.py --quick    # a few calls each, to see that it runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stubbed_driver  # noqa: E402

stubbed_driver.install()

import numpy as np  # noqa: E402

import centerkern  # noqa: E402
from centerkern.cuda import launcher  # noqa: E402

BATCH, WIDTH, CLASSES = 64, 8, 100  # host time does not depend on the sizes; the CPU path's comparison size
GOAL_STEP_UNITS, GOAL_GATHER_UNITS = 40 / 35, 15 / 35


def _trivial():
    pass


def _calibration_us() -> float:
    """CPU time of 1000 calls of a trivial Python function, in µs."""
    start = time.thread_time_ns()
    for _ in range(1000):
        _trivial()
    return (time.thread_time_ns() - start) / 1e3


def _arrays(framework: str):
    rng = np.random.default_rng(0)
    host = (rng.standard_normal((BATCH, WIDTH)).astype(np.float32), rng.integers(0, CLASSES, BATCH),
            rng.standard_normal((CLASSES, WIDTH)).astype(np.float32),
            rng.standard_normal((BATCH, WIDTH)).astype(np.float32))
    if framework == "torch":
        import torch

        return tuple(torch.from_numpy(a) for a in host)
    if framework == "numba":
        return tuple(stubbed_driver.numba_array(a) for a in host)
    if framework == "cupy":
        import cupy

        return tuple(cupy.asarray(a) for a in host)
    return host  # "numpy": the CPU path, for comparison


def _cases_of(framework: str):
    """(name, framework, call) of every call of the issue's table, on ``framework``'s arrays."""
    features, labels, centers, updates = _arrays(framework)
    device = framework != "numpy"
    backend = "auto" if device else "numba"
    syncs = (False, True) if device else (False,)
    cases = []

    def case(name, function, *args, **settings):
        cases.append((name, framework, lambda: function(*args, backend=backend, **settings)))

    for rule in ("facenet", "wen", "pytorch"):
        for sync in syncs:
            case(f"center_loss {rule} sync={sync}", centerkern.center_loss, features, labels, centers, 0.5,
                 rule=rule, out=centers, sync=sync)
    case("center_loss facenet sync=False deterministic", centerkern.center_loss, features, labels, centers, 0.5,
         out=centers, sync=False, deterministic=True)
    if device:
        case("center_loss facenet sync=False out=None", centerkern.center_loss, features, labels, centers, 0.5,
             sync=False)
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
        self._stub = stubbed_driver.__file__

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


def _count(call) -> dict:
    used = []
    real_run = launcher.LaunchPlan.run

    def run(plan, stream, pointers):
        used.append(plan)
        return real_run(plan, stream, pointers)

    launcher.LaunchPlan.run = run
    stubbed_driver.counts.clear()
    calls = _Calls()
    sys.setprofile(calls)
    try:
        call()
    finally:
        sys.setprofile(None)
        launcher.LaunchPlan.run = real_run
    driver = stubbed_driver.counts
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


def _warm(call) -> None:
    for _ in range(20):  # plans made, caches filled
        call()


def _time(call, calls: int, rounds: int) -> dict:
    per_call, units, calibrations = [], [], []
    for _ in range(rounds):
        calibration = _calibration_us()
        start = time.thread_time_ns()
        for _ in range(calls):
            call()
        host = (time.thread_time_ns() - start) / 1e3 / calls
        per_call.append(host)
        units.append(host / calibration)
        calibrations.append(calibration)
    host, calibration = min(per_call), min(calibrations)
    return {"host_us": round(host, 2), "units": round(host / calibration, 3), "calibration_us": round(calibration, 2),
            "median_host_us": round(statistics.median(per_call), 2), "median_units": round(statistics.median(units), 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="a few calls and rounds: that it runs, no figures")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.rounds = 5, 2
    frameworks = ["torch", "numba", "numpy"]
    try:
        import cupy  # noqa: F401
        frameworks.insert(2, "cupy")
    except ImportError:
        pass
    results = []
    for name, framework, call in (case for framework in frameworks for case in _cases_of(framework)):
        _warm(call)
        row = {"case": name, "framework": framework, **_count(call), **_time(call, args.calls, args.rounds)}
        results.append(row)
        print(f"{framework:6} {name:48} {row['host_us']:7.1f} µs {row['units']:5.2f} units "
              f"(median {row['median_host_us']:.1f} µs)  {row['launches']} launches, "
              f"{row['python_calls']} Python calls")
    date = datetime.date.today().isoformat()
    report = {
        "date": date,
        "what": "host time per call of the cuda backend, its CUDA driver stubbed (benchmarks/stubbed_driver.py)",
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "sizes": {"B": BATCH, "D": WIDTH, "K": CLASSES},
        "goals": {"step_units": round(GOAL_STEP_UNITS, 3), "gather_units": round(GOAL_GATHER_UNITS, 3),
                  "launches_per_step": 3, "temporaries_per_step": 1},
        "launch_path": launcher.launch_path(),
        "quick": args.quick,
        "cases": results,
    }
    output = args.output or Path(__file__).resolve().parent / "results" / f"gpu-host-{date}.json"
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
