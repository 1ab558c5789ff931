"""Host time of the ``cuda`` backend's calls, measured without a GPU: the real path, the driver stubbed.

Each call runs the public function on device arrays (torch tensors, Numba device arrays, CuPy
arrays where CuPy imports), through validation, ``DeviceArrays``, the launch plans and the
allocators, with every CUDA driver call answered by a stub (``stubbed_driver``): what is
measured is the host's own work around the kernels, which the GPU cannot hide. The real driver
adds its own time per driver call (a few microseconds per launch); ``gpu_check.py`` measures the
same calls with it, on a GPU.

The cases, the timing (thread CPU time, in units of 1000 trivial Python calls, the quietest of
many rounds) and what is counted are ``host_time``'s, which ``gpu_check.py`` runs with the real
driver on a GPU.

Goals: a step on torch tensors or Numba arrays at most 40 µs where 1000
trivial calls take 35 µs (1.15 units), the gather at most 15 µs (0.43 units); at most 3 launches
and one temporary per step in the common case.

    python benchmarks/gpu_host_time.py            # benchmarks/results/gpu-host-<date>.json
    python benchmarks/gpu_host_time.py --quick    # a few calls each, to see that it runs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stubbed_driver  # noqa: E402

stubbed_driver.install()

import host_time  # noqa: E402
from centerkern._cli.reports import provenance  # noqa: E402
from centerkern.cuda import launcher  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per case in each pass")
    parser.add_argument("--passes", type=int, default=6, help="passes over every case")
    parser.add_argument("--quick", action="store_true", help="a few calls and rounds: that it runs, no figures")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.rounds, args.passes = 5, 2, 1
    frameworks = ["torch", "numba", "numpy"]
    try:
        import cupy  # noqa: F401
        frameworks.insert(2, "cupy")
    except ImportError:
        pass
    results = []
    cases = [case for framework in frameworks for case in host_time.cases_of(framework)]
    counted = []
    for name, framework, call in cases:
        host_time.warm(call)
        counted.append(host_time.count(call))
    # the cases interleaved, pass after pass: a noisy spell of the machine falls on every case a little,
    # not on one case whole
    measured = [[] for _ in cases]
    for _ in range(args.passes):
        for index, (_, _, call) in enumerate(cases):
            measured[index] += host_time.rounds_of(call, args.calls, args.rounds)
    for (name, framework, _), counts, rounds in zip(cases, counted, measured):
        row = {"case": name, "framework": framework, **counts, **host_time.summary(rounds)}
        results.append(row)
        print(f"{framework:6} {name:48} {row['host_us']:7.1f} µs {row['units']:5.2f} units "
              f"(median {row['median_host_us']:.1f} µs)  {row['launches']} launches, "
              f"{row['python_calls']} Python calls")
    report = {
        **provenance(),
        "what": "host time per call of the cuda backend, its CUDA driver stubbed (benchmarks/stubbed_driver.py)",
        "command": "python benchmarks/gpu_host_time.py" + (" --quick" if args.quick else ""),
        "timing": {"calls_per_round": args.calls, "rounds_per_pass": args.rounds, "passes": args.passes},
        "sizes": {"B": host_time.BATCH, "D": host_time.WIDTH, "K": host_time.CLASSES},
        "goals": {"step_units": round(host_time.GOAL_STEP_UNITS, 3), "gather_units": round(host_time.GOAL_GATHER_UNITS, 3),
                  "launches_per_step": 3, "temporaries_per_step": 1},
        "launch_path": launcher.launch_path(),
        "quick": args.quick,
        "cases": results,
    }
    date = report["date"][:10]
    output = args.output or Path(__file__).resolve().parent / "results" / f"gpu-host-{date}.json"
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
