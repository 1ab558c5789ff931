"""The numba kernels of this checkout against those of another git revision, in one process.

    python benchmarks/compare_revisions.py REVISION [--repeats 9] [--output PATH]

The other revision's ``centerkern`` package is exported from git into a temporary directory under
another name (its modules import each other relatively), so both kernel modules load side by side
and are timed on the same inputs, interleaved call block by call block: the ratio new / old is
what a change did to the kernels' speed, with the machine's drift shared by both. Each is called
at its backend signature (``center_loss_step``, ``scatter_sub_update``), with the arrays the
public API would hand it, on the sizes of ``python -m centerkern bench``. Results (medians, and
the ratios) go to ``benchmarks/results/revisions-<date>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from centerkern._cli import bench as _bench
from centerkern._cli import reports as _reports
from centerkern._backends import numba_cpu as this_revision
from centerkern._core.rules import rule_coefficients

OPERATIONS = ("step facenet", "step wen", "step pytorch", "scatter")
ZEROS_IN_PARALLEL_BYTES = 1 << 22  # as HostArrays.zeros: from 4 MB on, zeroed by every thread


def import_revision(revision: str, directory: Path):
    """The ``kernels_numba`` module of ``revision``, imported as ``centerkern_<revision>``."""
    name = "centerkern_" + "".join(ch for ch in revision if ch.isalnum())
    sys.path.insert(0, str(_reports.export_revision(revision, directory, name)))
    return importlib.import_module(f"{name}.kernels_numba")


def _call(kernels, operation, alpha, features, labels, centers, updates):
    """One call as the public API makes it, in place (``out=centers``)."""
    if operation == "scatter":
        return lambda: kernels.scatter_sub_update(centers, labels, updates)
    coefficients = rule_coefficients(operation.split()[1], alpha, *features.shape)

    def step():
        grad = np.empty_like(features)
        if coefficients.moves_centers:
            written = centers
        elif centers.nbytes < ZEROS_IN_PARALLEL_BYTES:
            written = np.zeros_like(centers)
        else:
            written = kernels.zeros(centers.shape, centers.dtype)
        return kernels.center_loss_step(features, labels, centers, grad, written, coefficients)

    return step


def compare(other, sizes, repeats: int) -> dict:
    results = {}
    for size in sizes:
        features, labels, centers, updates = _bench.make_inputs(size)
        results[size.name] = {}
        operations = ("step facenet",) if size.large else OPERATIONS
        for operation in operations:
            calls = {name: _call(kernels, operation, size.alpha, features, labels, centers.copy(), updates)
                     for name, kernels in (("this", this_revision), ("other", other))}
            for call in calls.values():
                call()
            start = time.perf_counter()
            calls["this"]()
            per_block = max(1, min(500, int(0.02 / max(time.perf_counter() - start, 1e-7))))
            seconds = {name: [] for name in calls}
            for repeat in range(repeats):
                order = list(calls.items())
                for name, call in order if repeat % 2 == 0 else order[::-1]:  # neither always goes first
                    start = time.perf_counter()
                    for _ in range(per_block):
                        call()
                    seconds[name].append((time.perf_counter() - start) / per_block)
            this, that = statistics.median(seconds["this"]), statistics.median(seconds["other"])
            results[size.name][operation] = {"this_seconds": this, "other_seconds": that, "this / other": this / that}
            print(f"{size.name:7s} {operation:13s} this {this * 1e6:10.1f} us  other {that * 1e6:10.1f} us  "
                  f"this / other {this / that:5.2f}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved blocks per implementation")
    parser.add_argument("--sizes", nargs="*", default=list(_bench.SIZES), choices=list(_bench.SIZES))
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        other = import_revision(args.revision, Path(directory))
        report = {**_reports.provenance(), "other revision": args.revision, "repeats": args.repeats,
                  "sizes": compare(other, [_bench.SIZES[name] for name in args.sizes], args.repeats)}
    ratios = [entry["this / other"] for size in report["sizes"].values() for entry in size.values()]
    report["worst this / other"] = max(ratios)
    report["median this / other"] = statistics.median(ratios)
    print(f"this / other: median {report['median this / other']:.2f}, worst {report['worst this / other']:.2f}")
    output = Path(args.output or Path("benchmarks") / "results" / f"revisions-{report['date'][:10]}.json")
    _reports.write_report(report, output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
