"""What a first call costs: each case in a fresh process with an empty kernel cache.

``python -m centerkern bench --first-call`` (or ``benchmarks/first_call.py``) runs every case
``--repeats`` times, each in a new interpreter whose kernel cache is a new, empty directory, and
writes the medians with the goals they are held to into ``benchmarks/results/first-call-<date>.json``.
``--against REVISION`` runs an earlier version of the package (a git revision of this checkout)
by turns with this one, case by case, so that both are measured on the same machine at the same
time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .reports import export_revision, provenance, write_report

# Each case is run by this child program; it prints one JSON object of seconds.
_CHILD = r"""
import json, sys, time
start = time.perf_counter()
import numpy as np
import centerkern
imported = time.perf_counter()
case = sys.argv[1]
rng = np.random.default_rng(0)

def batch(batch_size, width, classes, dtype="float32"):
    return (rng.standard_normal((batch_size, width)).astype(dtype), rng.integers(0, classes, batch_size),
            rng.standard_normal((classes, width)).astype(dtype))

def timed(call):
    begin = time.perf_counter()
    call()
    return time.perf_counter() - begin

result = {"import": imported - start}
if case == "numba import":
    result["seconds"] = timed(lambda: __import__("numba"))
elif case == "numba floor":
    # A one-line cached Numba function, called in a second process once the first cached it:
    # what any Numba package's first call costs here at best (Numba's own import and setup).
    import os, subprocess
    directory = os.environ["CENTERKERN_CACHE_DIR"]
    with open(os.path.join(directory, "one_line.py"), "w") as source:
        source.write("import numba\n@numba.njit(cache=True)\ndef double(x):\n    return 2 * x\n")
    program = ("import sys, time; sys.path.insert(0, %r); start = time.perf_counter(); import one_line; "
               "one_line.double(1.0); print(time.perf_counter() - start)" % directory)
    subprocess.run([sys.executable, "-c", program], check=True, capture_output=True)
    result["seconds"] = float(subprocess.run([sys.executable, "-c", program], check=True, capture_output=True,
                                             text=True).stdout)
elif case in ("serial", "parallel", "warm"):
    x, y, c = batch(*((64, 8, 100) if case != "parallel" else (1024, 512, 10000)))
    result["seconds"] = timed(lambda: centerkern.center_loss(x, y, c, 0.5, out=c))
elif case == "second dtype":
    x, y, c = batch(64, 8, 100)
    centerkern.center_loss(x, y, c, 0.5, out=c)
    x, y, c = batch(64, 8, 100, "float64")
    result["seconds"] = timed(lambda: centerkern.center_loss(x, y, c, 0.5, out=c))
elif case == "new layouts":
    x, y, c = batch(64, 8, 100)
    centerkern.center_loss(x, y, c, 0.5, out=c)
    fortran = np.asfortranarray(x)
    int32 = y.astype(np.int32)
    read_only = x.copy()
    read_only.flags.writeable = False
    fortran_out = np.asfortranarray(c)
    result["Fortran-ordered features"] = timed(lambda: centerkern.center_loss(fortran, y, c, 0.5, out=c))
    result["int32 labels"] = timed(lambda: centerkern.center_loss(x, int32, c, 0.5, out=c))
    result["read-only features"] = timed(lambda: centerkern.center_loss(read_only, y, c, 0.5, out=c))
    result["Fortran-ordered out"] = timed(lambda: centerkern.center_loss(x, y, fortran_out, 0.5, out=fortran_out))
    result["seconds"] = max(value for key, value in result.items() if key != "import")
result["version"] = centerkern.__version__ + " " + centerkern.__file__
print(json.dumps(result))
"""

# (case, what it measures, the goal in seconds); "warm" runs in the cache "serial" filled.
CASES = (
    ("import", "import centerkern", 0.3),
    ("serial", "first center_loss, cold cache, B=64 D=8 (serial regime)", 5.0),
    ("parallel", "first center_loss, cold cache, B=1024 D=512 K=10000 (parallel regime)", 5.0),
    ("second dtype", "first center_loss at float64 after float32, same process, cold cache", 5.0),
    ("new layouts", "first call with Fortran-ordered or read-only features, int32 labels or a Fortran-ordered "
                    "out, after a C-ordered int64 one (the slowest of the four)", 0.5),
    ("warm", "first center_loss, warm cache, new process (Numba's own import included)", 0.3),
    ("numba import", "import numba alone, for scale (no goal of centerkern's)", None),
    ("numba floor", "a one-line cached @njit function's first call, warm cache, new process: Numba's own "
                    "import and setup, the floor of the warm case (no goal of centerkern's)", None),
)


def _run_child(case: str, cache: str, package: str | None = None) -> dict:
    """One case in a fresh interpreter whose kernel cache is ``cache``; ``package``: the
    directory holding another version's ``centerkern`` to run instead of this one."""
    # NUMBA_CACHE_DIR too: an earlier version caches where Numba does
    environment = {**os.environ, "CENTERKERN_CACHE_DIR": cache, "NUMBA_CACHE_DIR": cache}
    if package:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, (package, os.environ.get("PYTHONPATH"))))
    # run from the cache directory: from a checkout's root, its own package would come first
    completed = subprocess.run([sys.executable, "-c", _CHILD, "serial" if case == "import" else case],
                               env=environment, capture_output=True, text=True, check=True, cwd=cache)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _measure_case(case: str, package: str | None, runs: dict) -> None:
    """One run of ``case`` (the serial case carries the import and the warm case) into ``runs``:
    each child's report, by case."""
    with tempfile.TemporaryDirectory() as cache:
        child = _run_child(case, cache, package)
        runs[case].append(child)
        if case == "serial":  # the import, and the warm case in the cache this run filled
            runs["import"].append(child)
            runs["warm"].append(_run_child("warm", cache, package))


def _seconds(case: str, runs: list[dict]) -> list[float]:
    return [run["import" if case == "import" else "seconds"] for run in runs]


def measure(repeats: int, progress=None, against: str | None = None) -> dict:
    """Every case ``repeats`` times; with ``against`` (a directory holding another version's
    ``centerkern``), that version too, run by turns with this one so that both see the same
    machine."""
    versions = {"this": None} if against is None else {"this": None, "other": against}
    runs = {version: {case: [] for case, _, _ in CASES} for version in versions}
    for repeat in range(repeats):
        for case, _, _ in CASES:
            if case in ("import", "warm"):
                continue  # measured inside the serial case's runs
            order = list(versions.items())
            for version, package in order if repeat % 2 == 0 else order[::-1]:
                _measure_case(case, package, runs[version])
            if progress:
                progress(case)
    report = {"repeats": repeats, "cases": {}, "goals": {}}
    for case, described, target in CASES:
        seconds = _seconds(case, runs["this"][case])
        median = statistics.median(seconds)
        measured = report["cases"][case] = {"what": described, "median_seconds": median, "runs_seconds": seconds,
                                            "version": runs["this"][case][0]["version"]}
        if case == "new layouts":
            measured["each"] = {key: statistics.median(run[key] for run in runs["this"][case])
                                for key in runs["this"][case][0] if key not in ("import", "seconds", "version")}
        if against is not None:
            other = _seconds(case, runs["other"][case])
            measured.update(other_median_seconds=statistics.median(other), other_runs_seconds=other,
                            other_version=runs["other"][case][0]["version"])
        if target is not None:
            report["goals"][described] = {"value": median, "target": target, "met": median <= target}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m centerkern bench --first-call", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per case (default 3)")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/first-call-<date>.json)")
    parser.add_argument("--against", metavar="REVISION",
                        help="also run a git revision of this checkout (an earlier version), by turns with this one")
    args = parser.parse_args(argv)

    def progress(case):
        print(f"  {case} done", file=sys.stderr)

    with tempfile.TemporaryDirectory() as other:
        package = str(export_revision(args.against, Path(other))) if args.against else None
        report = {**provenance(), "against": args.against, **measure(args.repeats, progress, package)}
    output = Path(args.output or Path("benchmarks") / "results" / f"first-call-{report['date'][:10]}.json")
    print(f"first calls, each in a fresh process with an empty kernel cache (median of {args.repeats})"
          + (f"; {args.against} beside it" if args.against else ""))
    for case, measured in report["cases"].items():
        other_seconds = f"{measured['other_median_seconds']:7.2f} s  " if args.against else ""
        print(f"  {other_seconds}{measured['median_seconds']:7.3f} s  {measured['what']}")
        for name, seconds in measured.get("each", {}).items():
            print(f"  {' ' * len(other_seconds)}{seconds:7.3f} s      {name}")
    print("goals")
    for described, goal in report["goals"].items():
        print(f"  {goal['value']:6.2f} s <= {goal['target']} s  {'met' if goal['met'] else 'MISSED'}  {described}")
    write_report(report, output)
    return 0
