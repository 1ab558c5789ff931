"""The implementations a user would otherwise write, and how they are timed beside centerkern's,
for ``python -m centerkern demo`` and ``benchmarks/``.

Each returns a zero-argument callable that runs one step on its own copy of the centers (so
repeated calls keep working on the same inputs), or None when its library is not installed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def torch_eager_step(features: np.ndarray, labels: np.ndarray, centers: np.ndarray,
                     alpha: float) -> Callable[[], object] | None:
    """facenet's step in torch eager mode: ``index_select``, the loss, the grad, ``index_add_``."""
    try:
        import torch
    except ImportError:
        return None
    torch_features = torch.from_numpy(features)
    torch_labels = torch.from_numpy(labels)
    torch_centers = torch.from_numpy(centers.copy())
    grad_scale = 2.0 / features.size

    def step():
        differences = torch_features - torch_centers.index_select(0, torch_labels)
        loss = differences.square().mean().item()
        grad = differences * grad_scale
        torch_centers.index_add_(0, torch_labels, differences, alpha=1.0 - alpha)
        return loss, grad

    return step


def torch_index_add_scatter(centers: np.ndarray, labels: np.ndarray,
                            updates: np.ndarray) -> Callable[[], object] | None:
    """The scatter as torch does it: ``index_add_`` with alpha -1 (duplicates accumulate)."""
    try:
        import torch
    except ImportError:
        return None
    torch_centers = torch.from_numpy(centers.copy())
    torch_labels = torch.from_numpy(labels)
    torch_updates = torch.from_numpy(updates)
    return lambda: torch_centers.index_add_(0, torch_labels, torch_updates, alpha=-1.0)


def numpy_subtract_at_scatter(centers: np.ndarray, labels: np.ndarray, updates: np.ndarray) -> Callable[[], object]:
    """The obvious correct NumPy scatter: ``np.subtract.at``."""
    own_centers = centers.copy()
    return lambda: np.subtract.at(own_centers, labels, updates)


def interleaved_medians(implementations: dict[str, Callable[[], object]], repeats: int,
                        rounds: int = 5) -> dict[str, float]:
    """Median seconds per call of each implementation, all measured in this process.

    Each round runs every implementation in turn, a block of calls each, so that a slow moment
    of the machine hits every row alike. Blocks rather than single calls, and one untimed call
    first: torch and Numba each keep a pool of OpenMP threads that spin for a while after a
    parallel region, and a call made right after the other library's pays for that.
    """
    samples: dict[str, list[float]] = {name: [] for name in implementations}
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for name, run in implementations.items():
            run()
            for _ in range(per_round):
                start = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}
