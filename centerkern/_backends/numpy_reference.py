"""The ``numpy`` backend: the reference every other backend is tested against.

Plain NumPy, written to be obviously correct rather than fast: the duplicate-label scatter is
``np.add.at`` (never ``centers[labels] -= u``, which keeps only one of the duplicates), every
sum is taken in float64, and the centers are gathered before anything is written.

Every backend module has these three functions with the same signatures. They receive arrays
that ``centerkern._core.validation`` has already checked, and update ``centers`` in place; the public
functions in ``centerkern`` decide what is copied first, and pass it as ``copy_from`` (the
backend's first write). ``deterministic`` is part of the shared signature; this backend's
results are bitwise reproducible whatever it says.
"""

from __future__ import annotations

import numpy as np

from .._core.rules import RuleCoefficients


# the public functions' allocation in host memory (see ``centerkern._backends``)
zeros = np.zeros


def gather_centers(centers: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return ``centers[labels]``, a new (B, D) array."""
    return centers[labels]


def scatter_sub_update(
    centers: np.ndarray, labels: np.ndarray, updates: np.ndarray, *, deterministic: bool = False,
    copy_from: np.ndarray | None = None,
) -> None:
    """Subtract ``updates[i]`` from ``centers[labels[i]]`` for every i, duplicates accumulating
    (after copying ``copy_from`` into ``centers``, when given)."""
    if copy_from is not None:
        centers[...] = copy_from
    touched, row_of_sample = np.unique(labels, return_inverse=True)
    totals = np.zeros((touched.size, centers.shape[1]), dtype=np.float64)
    np.add.at(totals, row_of_sample, updates)
    centers[touched] = centers[touched] - totals


def center_loss_step(
    features: np.ndarray,
    labels: np.ndarray,
    centers: np.ndarray,
    grad: np.ndarray,
    written: np.ndarray,
    rule: RuleCoefficients,
    *,
    deterministic: bool = False,
    copy_from: np.ndarray | None = None,
) -> float:
    """One step of ``rule``: write the grad and the center rows, return the loss.

    ``written`` is ``centers`` itself for rules that move the centers, or the zeroed
    ``grad_centers`` for the ``pytorch`` rule. ``copy_from``, when given, is copied into
    ``centers`` first.
    """
    if copy_from is not None:
        centers[...] = copy_from
    centers_before = centers[labels].astype(np.float64)  # gathered before any write
    differences = features.astype(np.float64) - centers_before
    grad[...] = rule.grad_scale * differences

    touched, row_of_sample, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sums = np.zeros((touched.size, centers.shape[1]), dtype=np.float64)
    np.add.at(sums, row_of_sample, differences)
    row_update = (rule.step / (1.0 + rule.count_weight * counts))[:, None] * sums
    if rule.moves_centers:
        written[touched] = centers[touched] + row_update
    else:
        written[touched] = row_update
    return float(rule.loss_scale * np.sum(differences * differences))
