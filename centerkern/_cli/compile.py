"""``python -m centerkern compile``: fill the kernel cache ahead of time.

What a Dockerfile or a CI job runs once, so that no process pays for compiling at its first call.
Every entry point of the numba backend (``numba_cpu.ENTRIES``), and the XLA handlers that
compile its step for ``centerkern.jax`` (``xla_native.ENTRIES``), is compiled for each dtype
asked for, in worker processes where there is more than one core: one process per entry point,
so that no two processes write one cache index. The ``cuda`` backend compiles where a GPU is
present, by running each kernel once on it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time

import numpy as np

DTYPES = ("float32", "float64")
BACKENDS = ("numba", "cuda")


def _compile_entry(name: str, dtypes: tuple[str, ...]) -> list[tuple[str, float, bool]]:
    """Compile (or find in the cache) one numba entry point for each dtype: (dtype, seconds,
    whether it was cached already) each. Runs in a worker process."""
    entry = next(entry for entries in _entries() for entry in entries if entry.name == name)
    done = []
    for dtype in dtypes:
        start = time.perf_counter()
        cached = entry.is_cached(dtype)
        if not cached:
            entry.compiled(dtype)
        done.append((dtype, time.perf_counter() - start, cached))
    return done


def _entries() -> tuple[tuple, tuple]:
    """The numba backend's entry points, then the XLA handlers (``centerkern.jax`` on the CPU),
    which call them."""
    from .._adapters import xla_native
    from .._backends import numba_cpu

    return numba_cpu.ENTRIES, xla_native.ENTRIES


def _compile_cuda(dtypes: tuple[str, ...]) -> str:
    """Run every cuda kernel once per dtype on the GPU, which compiles and caches them."""
    import centerkern

    if "cuda" not in centerkern.backends() or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "skipped: no GPU here"
    from numba import cuda as numba_cuda

    for dtype in dtypes:
        rng = np.random.default_rng(0)
        features = numba_cuda.to_device(rng.standard_normal((300, 5)).astype(dtype))
        centers = numba_cuda.to_device(np.zeros((7, 5), dtype))
        labels = numba_cuda.to_device(np.arange(300, dtype=np.int64) % 7)
        for deterministic in (False, True):
            for rule in centerkern.RULES:
                centerkern.center_loss(features, labels, centers, 0.5, rule=rule, deterministic=deterministic)
            centerkern.scatter_sub_update(centers, labels, features, deterministic=deterministic)
        centerkern.gather_centers(centers, labels)
    name = numba_cuda.get_current_device().name
    return "compiled on " + (name.decode() if isinstance(name, bytes) else str(name))


class _Progress:
    """A one-line progress bar on a terminal; a line per step elsewhere (a CI log)."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.on_terminal = stream.isatty()

    def step(self, text: str) -> None:
        self.done += 1
        if self.on_terminal:
            filled = 30 * self.done // self.total
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {text:60.60s}")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"[{self.done}/{self.total}] {text}\n")
        self.stream.flush()


def compile_kernels(dtypes: tuple[str, ...], backends: tuple[str, ...], jobs: int) -> int:
    from .._backends.numba_cpu import kernel_cache

    start = time.perf_counter()
    if "numba" in backends:
        where, how = kernel_cache()
        print(f"numba kernels for {', '.join(dtypes)} -> {where or 'no cache'} ({how})")
        # in two rounds: the XLA handlers link in the backend's entry points, which must be in the
        # cache first (else two processes would compile and save one entry's files at once)
        rounds = [[entry.name for entry in entries] for entries in _entries()]
        progress = _Progress(sum(len(names) for names in rounds))
        for names in rounds:
            if jobs > 1:
                # "spawn": a fresh interpreter per worker, never a fork of one that holds Numba's threads
                context = multiprocessing.get_context("spawn")
                with concurrent.futures.ProcessPoolExecutor(min(jobs, len(names)), mp_context=context) as pool:
                    futures = {pool.submit(_compile_entry, name, dtypes): name for name in names}
                    for future in concurrent.futures.as_completed(futures):
                        progress.step(_described(futures[future], future.result()))
            else:
                for name in names:
                    progress.step(_described(name, _compile_entry(name, dtypes)))
    if "cuda" in backends:
        print(f"cuda kernels: {_compile_cuda(dtypes)}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _described(name: str, done: list[tuple[str, float, bool]]) -> str:
    return f"{name}: " + ", ".join(f"{dtype} {'cached' if cached else f'{seconds:.1f} s'}"
                                   for dtype, seconds, cached in done)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES),
                        help="the dtypes to compile for (default: both)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=["numba"],
                        help="the backends to compile (default: numba; cuda needs a GPU)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: one per core; 1 compiles in this process)")
