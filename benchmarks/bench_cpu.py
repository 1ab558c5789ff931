"""CPU timings of the numba backend against the peers a user would otherwise pick.

All implementations run in one process, on the same inputs, interleaved round by round, and the
table reports medians and ratios (the machine is shared: absolute times move, ratios much less).

    python benchmarks/bench_cpu.py                 # sizes M and L, float32
    python benchmarks/bench_cpu.py --sizes S M --repeats 50 --json benchmarks/results/cpu.json

Peers: ``np.subtract.at`` (the obvious NumPy scatter), a serial Numba loop over rows (what a
first ``@njit`` attempt looks like), and torch eager (``index_select`` + ``index_add_``) when
torch is installed. The fused step is facenet's: loss, grad and the center update.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone

import numba
import numpy as np
from numba import njit

import centerkern
from centerkern._peers import (
    interleaved_medians, numpy_subtract_at_scatter, torch_eager_step, torch_index_add_scatter,
)

SIZES = {  # (B, D, K)
    "S": (256, 128, 1000),
    "M": (1024, 512, 10000),
    "L": (8192, 512, 100000),
}
ALPHA = 0.95  # facenet's training value


@njit(cache=True)
def serial_scatter_sub(centers, labels, updates):
    for i in range(labels.size):
        for k in range(centers.shape[1]):
            centers[labels[i], k] -= updates[i, k]


def make_inputs(batch, width, classes, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((batch, width), dtype=np.float32)
    labels = rng.integers(0, classes, batch).astype(np.int64)
    centers = rng.standard_normal((classes, width), dtype=np.float32)
    updates = rng.standard_normal((batch, width), dtype=np.float32)
    return features, labels, centers, updates


def implementations(features, labels, centers, updates):
    """name -> (kind, zero-argument callable); each callable owns its own copy of the centers."""
    impls = {}
    ck_centers = centers.copy()
    impls["centerkern numba step"] = ("step", lambda: centerkern.center_loss(
        features, labels, ck_centers, ALPHA, out=ck_centers, backend="numba"))
    ck_scatter = centers.copy()
    impls["centerkern numba scatter"] = ("scatter", lambda: centerkern.scatter_sub_update(
        ck_scatter, labels, updates, out=ck_scatter, backend="numba"))
    impls["np.subtract.at scatter"] = ("scatter", numpy_subtract_at_scatter(centers, labels, updates))
    serial = centers.copy()
    impls["numba serial-rows scatter"] = ("scatter", lambda: serial_scatter_sub(serial, labels, updates))
    # the bandwidth floor of the step: read features, write grad, read and write touched rows
    source = np.empty(3 * features.size, dtype=np.float32)
    destination = np.empty_like(source)
    impls["memcpy of 3*B*D floats"] = ("floor", lambda: np.copyto(destination, source))
    torch_step = torch_eager_step(features, labels, centers, ALPHA)
    if torch_step is None:
        print("torch is not installed: its rows are absent", file=sys.stderr)
        return impls
    impls["torch eager step"] = ("step", torch_step)
    impls["torch index_add_ scatter"] = ("scatter", torch_index_add_scatter(centers, labels, updates))
    return impls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["M", "L"], choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="write every figure to this path")
    args = parser.parse_args(argv)

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(), "processor": platform.processor(),
        "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
        "threads": numba.get_num_threads(), "threading_layer": None, "sizes": {},
    }
    for size in args.sizes:
        batch, width, classes = SIZES[size]
        impls = implementations(*make_inputs(batch, width, classes))
        medians = interleaved_medians({name: run for name, (_, run) in impls.items()}, args.repeats)
        report["threading_layer"] = numba.threading_layer()
        report["sizes"][size] = {"B": batch, "D": width, "K": classes, "median_seconds": medians}
        print(f"\n{size}: B={batch} D={width} K={classes}, float32, median of {args.repeats}")
        for kind, ours in (("step", "centerkern numba step"), ("scatter", "centerkern numba scatter")):
            for name, (impl_kind, _) in impls.items():
                if impl_kind == kind:
                    ratio = medians[name] / medians[ours]
                    print(f"  {name:28s} {medians[name] * 1e6:10.1f} us   {ratio:6.2f}x centerkern's time")
        floor = medians["memcpy of 3*B*D floats"]
        print(f"  {'memcpy of 3*B*D floats':28s} {floor * 1e6:10.1f} us   "
              f"(step / floor = {medians['centerkern numba step'] / floor:.2f})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
