"""This checkout against another git revision, in one process: the numba backend, and the public calls.

    python benchmarks/compare_revisions.py REVISION [--level backend|api] [--repeats 9] [--output PATH]

The other revision's ``centerkern`` package is exported from git into a temporary directory under
another name (its modules import each other relatively), so both load side by side and are timed
on the same inputs, interleaved call block by call block: the ratio this / other is what a change
did to the speed, with the machine's drift shared by both. On the sizes of
``python -m centerkern bench``:

- ``--level backend`` (the default): the numba backend at its signature (``center_loss_step``,
  ``scatter_sub_update``), with the arrays the public API would hand it: the kernels alone.
- ``--level api``: ``centerkern.center_loss(..., out=centers)`` and ``scatter_sub_update(...,
  out=centers)`` as a training loop calls them: validation, dispatch and the kernels, which is
  what the bench's ratios against the alternatives are made of.
- ``--level torch``: ``centerkern.torch.CenterLoss`` in training mode, forward and backward
  (``module(features, labels).backward()``, features requiring a gradient), each rule: what the
  torch glue around the kernels costs. Sizes S by default.

Results (medians, and the ratios) go to ``benchmarks/results/revisions-<date>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import centerkern
from centerkern._cli import bench as _bench
from centerkern._cli import reports as _reports
from centerkern._core.rules import rule_coefficients

OPERATIONS = ("step facenet", "step wen", "step pytorch", "scatter")
MODULE_OPERATIONS = ("module facenet", "module wen", "module pytorch")
ZEROS_IN_PARALLEL_BYTES = 1 << 22  # as the numba backend's zeros: from 4 MB on, zeroed by every thread


# Where the numba backend lives in a revision: under _backends after 0.4.0, in kernels_numba up to it.
BACKEND_MODULES = ("_backends.numba_cpu", "kernels_numba")


# Modules that both revisions may share when their source is the same. The rules module must be
# shared: Numba recognises an argument's type by a fingerprint of its values, which for a named
# tuple leaves out its class, so two RuleCoefficients classes of identical fields in one process
# would be typed as whichever a kernel saw first, and the other revision's kernels refuse it.
SHARED_WHEN_EQUAL = ("_core/rules.py",)


def import_revision(revision: str, directory: Path):
    """The ``centerkern`` package of ``revision``, imported as ``centerkern_<revision>``."""
    name = "centerkern_" + "".join(ch for ch in revision if ch.isalnum())
    sys.path.insert(0, str(_reports.export_revision(revision, directory, name)))
    this = Path(centerkern.__file__).parent
    for path in SHARED_WHEN_EQUAL:
        theirs = directory / name / path
        if theirs.exists() and theirs.read_bytes() == (this / path).read_bytes():
            module = path.removesuffix(".py").replace("/", ".")
            sys.modules[f"{name}.{module}"] = importlib.import_module(f"centerkern.{module}")
    package = importlib.import_module(name)
    if importlib.util.find_spec(f"{name}.kernels_numba") is not None:
        # That layout loaded its backends by absolute name (centerkern.kernels_<name>): point those
        # names at its own modules, which nothing of this checkout uses.
        for backend in ("numba", "numpy"):
            sys.modules[f"centerkern.kernels_{backend}"] = importlib.import_module(f"{name}.kernels_{backend}")
    return package


def numba_backend(package):
    """The numba backend module of ``package`` (a revision's ``centerkern``)."""
    for module in BACKEND_MODULES:
        try:
            return importlib.import_module(f"{package.__name__}.{module}")
        except ModuleNotFoundError:
            pass
    raise ImportError(f"no numba backend in {package.__name__}")


def _api_call(package, operation, alpha, features, labels, centers, updates):
    """One public call, in place (``out=centers``), as a training loop makes it."""
    if operation == "scatter":
        return lambda: package.scatter_sub_update(centers, labels, updates, out=centers)
    rule = operation.split()[1]
    return lambda: package.center_loss(features, labels, centers, alpha, rule=rule, out=centers)


def _backend_call(package, operation, alpha, features, labels, centers, updates):
    """One backend call as the public API makes it, in place (``out=centers``)."""
    kernels = numba_backend(package)
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


def _module_call(package, operation, alpha, features, labels, centers, updates):
    """``CenterLoss`` of ``package`` in training mode: the forward and the backward of one step,
    on torch tensors sharing the inputs' memory (the centers moved in place, as training does)."""
    import torch

    module = importlib.import_module(f"{package.__name__}.torch").CenterLoss(
        *centers.shape, alpha=alpha, rule=operation.split()[1])
    with torch.no_grad():
        module.centers.copy_(torch.from_numpy(centers))
    features = torch.from_numpy(features).requires_grad_()
    labels = torch.from_numpy(labels)

    def step():
        module(features, labels).backward()
        features.grad = None

    return step


CALLS = {"backend": _backend_call, "api": _api_call, "torch": _module_call}


def compare(other, sizes, repeats: int, level: str = "backend") -> dict:
    make_call = CALLS[level]
    results = {}
    for size in sizes:
        features, labels, centers, updates = _bench.make_inputs(size)
        results[size.name] = {}
        operations = MODULE_OPERATIONS if level == "torch" else ("step facenet",) if size.large else OPERATIONS
        for operation in operations:
            calls = {name: make_call(package, operation, size.alpha, features, labels, centers.copy(), updates)
                     for name, package in (("this", centerkern), ("other", other))}
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
    parser.add_argument("--level", choices=tuple(CALLS), default="backend",
                        help="the numba backend alone, the public functions (validation and dispatch too), or "
                             "the torch module's forward and backward")
    parser.add_argument("--sizes", nargs="*", choices=list(_bench.SIZES),
                        help="the bench's sizes (default: all; S for --level torch)")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or (["S"] if args.level == "torch" else list(_bench.SIZES))
    with tempfile.TemporaryDirectory() as directory:
        other = import_revision(args.revision, Path(directory))
        report = {**_reports.provenance(), "other revision": args.revision, "level": args.level,
                  "repeats": args.repeats,
                  "sizes": compare(other, [_bench.SIZES[name] for name in args.sizes], args.repeats, args.level)}
    ratios = [entry["this / other"] for size in report["sizes"].values() for entry in size.values()]
    report["worst this / other"] = max(ratios)
    report["median this / other"] = statistics.median(ratios)
    print(f"this / other: median {report['median this / other']:.2f}, worst {report['worst this / other']:.2f}")
    output = Path(args.output or Path("benchmarks") / "results" / f"revisions-{args.level}-{report['date'][:10]}.json")
    _reports.write_report(report, output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
