"""The command line: ``python -m centerkern demo``, ``info``, ``compile``, ``bench`` and ``check``.

``demo`` reproduces the seed example (SPEC.md) on every backend that can run here beside
TensorFlow's numbers (and says why any other does not run), shows why facenet's rule diverges on
a repeated class, and times the kernels; ``info`` reports the versions, threading setup and
kernel cache that a bug report needs; ``compile`` fills the kernel cache ahead of time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

import numba
import numpy as np

import centerkern

from . import compile as compile_command
from . import demo as demo_command


def _installed_version(*distributions: str) -> str:
    """The version of the first of ``distributions`` installed (one package, several names)."""
    # metadata rather than an import: importing torch alone takes seconds
    for distribution in distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "not installed"


def _threading_layer() -> str:
    """Numba's threading layer, which it only chooses when its first parallel kernel runs."""
    try:
        return numba.threading_layer()
    except ValueError:
        centerkern.gather_centers(np.zeros((1, 1)), [0], backend="numba")
        return numba.threading_layer()


def _jax_path() -> str:
    """How centerkern.jax runs the kernels here, where JAX is installed."""
    try:
        from ..jax import step_path
    except ImportError:
        return ""
    return ": " + step_path()


def _cuda_launch_path() -> str:
    """How the cuda backend launches its kernels here (Numba's own path under the simulator)."""
    if "cuda" not in centerkern.backends():
        return "no cuda backend here"
    from ..cuda import launch_path

    return launch_path()


def _kernel_cache() -> tuple[str, str]:
    """Where the numba kernels are cached, and which dtypes the cache holds them for."""
    from .._backends.numba_cpu import ENTRIES, kernel_cache

    where, how = kernel_cache()
    if where is None:
        return how, "none"
    held = [dtype for dtype in ("float32", "float64") if all(entry.is_cached(dtype) for entry in ENTRIES)]
    return f"{where} ({how})", (", ".join(held) or "nothing yet") + "  (python -m centerkern compile fills it)"


def info() -> int:
    """Print the versions, backends and threading setup of this installation."""
    cache_directory, cached_dtypes = _kernel_cache()
    rows = [
        ("centerkern", centerkern.__version__),
        ("Python", f"{platform.python_version()} ({sys.executable})"),
        ("NumPy", np.__version__),
        ("Numba", numba.__version__),
        ("numba-cuda", _installed_version("numba-cuda")),
        ("torch", _installed_version("torch") + "  (centerkern.torch, centerkern.distributed)"),
        ("JAX", _installed_version("jax") + "  (centerkern.jax" + _jax_path() + ")"),
        ("TensorFlow", _installed_version("tensorflow-cpu", "tensorflow") + "  (centerkern.tensorflow)"),
        ("Dask", _installed_version("dask") + "  (centerkern.dask)"),
        ("backends", ", ".join(centerkern.backends())),
        ("cuda launches", _cuda_launch_path()),
        ("numba threads", str(numba.get_num_threads())),
        ("threading layer", _threading_layer()),
        ("NUMBA_CACHE_DIR", os.environ.get("NUMBA_CACHE_DIR", "not set")),
        ("kernel cache", cache_directory),
        ("compiled for", cached_dtypes),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m centerkern", description="Center loss kernels: a demonstration and a report."
    )
    commands = parser.add_subparsers(dest="command", metavar="command")
    demo = commands.add_parser(
        "demo", help="the seed example on every backend that runs here, facenet vs wen, and a timing table",
        description="Reproduce the seed example beside TensorFlow's numbers on every backend that "
                    "runs here (saying why any other does not), show facenet's "
                    "divergence on a repeated class, and time the kernels (well under a minute).",
    )
    demo.add_argument("--backend", choices=centerkern.backends(),
                      help="check the seed example and the scatter on this backend only "
                           "(default: every backend)")
    demo.add_argument("--no-timing", action="store_true", help="skip the timing table")
    commands.add_parser("info", help="versions, backends and threading setup",
                        description="Print the versions, backends and threading setup of this installation.")
    compile_ = commands.add_parser(
        "compile", help="fill the kernel cache ahead of time (what a Dockerfile or CI job runs once)",
        description="Compile every kernel for the dtypes and backends asked for, into the kernel cache "
                    "(python -m centerkern info says where it is), so that no process compiles at its first call.")
    compile_command.add_arguments(compile_)
    commands.add_parser("bench", help="time every backend against the alternatives (python -m centerkern bench --help)",
                        add_help=False)
    check = commands.add_parser(
        "check", help="check your own center-loss step against the reference (exit 0, 1 where it disagrees, "
                      "2 for options or cases it cannot use)",
        description="Import MODULE:FUNCTION, a step (features, labels, centers, alpha) -> (loss, new_centers"
                    "[, grad or grad_centers]), and check it on cases drawn by hypothesis.")
    check.add_argument("step", metavar="MODULE:FUNCTION")
    check.add_argument("--rule", default="facenet", choices=centerkern.RULES)
    check.add_argument("--framework", default="numpy", choices=("numpy", "torch", "jax", "tensorflow"))
    check.add_argument("--max-examples", type=int, default=200)
    check.add_argument("--alpha", type=float, default=None)
    check.add_argument("--cases", metavar="PATH", default=None,
                       help="run the cases saved in PATH first (a file written by --save-cases or save_cases)")
    check.add_argument("--save-cases", metavar="PATH", default=None,
                       help="where the step disagrees, write the report's cases to PATH (an .npz file), "
                            "for a regression test: check_center_loss(step, rule, cases=load_cases(PATH))")
    return parser


def check(step: str, rule: str, framework: str, max_examples: int, alpha: float | None, cases: str | None = None,
          save_cases: str | None = None) -> int:
    """Run the oracle on ``MODULE:FUNCTION``; 0 when it agrees, 1 with the diagnosis when not
    (its cases written to ``save_cases`` where given)."""
    import importlib

    from ..testing import CenterLossMismatch, check_center_loss, load_cases

    module_name, _, function_name = step.partition(":")
    if not function_name:
        print(f"expected MODULE:FUNCTION, got {step!r}", file=sys.stderr)
        return 2
    sys.path.insert(0, os.getcwd())  # as python -m would: the caller's own modules
    function = getattr(importlib.import_module(module_name), function_name)
    try:  # the command's own inputs, said in one line (a step that raises is a failing step: its traceback shows)
        given = load_cases(cases) if cases else []
        if max_examples < 0 or (max_examples == 0 and not given):
            raise ValueError("--max-examples must be at least 1, or 0 with --cases")
    except (ValueError, OSError) as problem:
        print(f"cannot check {step}: {problem}", file=sys.stderr)
        return 2
    try:
        check_center_loss(function, rule, framework=framework, max_examples=max_examples, alpha=alpha, cases=given)
    except AssertionError as failure:
        print(f"FAILED {step} (rule {rule!r}, {framework}):\n{failure}")
        if save_cases and isinstance(failure, CenterLossMismatch):
            failure.diagnosis.save_cases(save_cases)
            print(f"the {len(failure.diagnosis.cases)} cases of this report are saved in {save_cases}")
        return 1
    print(f"OK {step}: agrees with the {rule!r} reference on "
          f"{max_examples + len(given)} cases ({framework})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark has options of its own
        from . import bench

        return bench.main(argv[1:])
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if arguments.command == "demo":
            backends = (arguments.backend,) if arguments.backend else centerkern.backends()
            return demo_command.demo(backends, with_timing=not arguments.no_timing)
        if arguments.command == "compile":
            return compile_command.compile_kernels(tuple(arguments.dtypes), tuple(arguments.backends), arguments.jobs)
        if arguments.command == "check":
            return check(arguments.step, arguments.rule, arguments.framework, arguments.max_examples, arguments.alpha,
                         arguments.cases, arguments.save_cases)
        return info()
    except BrokenPipeError:
        # the reader left early (``| head``): stop quietly, and keep the interpreter's final
        # flush of stdout from raising again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

