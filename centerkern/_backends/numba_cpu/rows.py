"""Arithmetic on one row: what every pass does with a sample, a sum or a center row.

``Batch`` names what a call works on; it travels through every pass with the rule's numbers,
``centerkern._core.rules.RuleCoefficients`` (``SCATTER_SUB`` for the scatter), taken whole:
``written[j] (+)= step / (1 + count_weight * n_j) * S_j``, added where ``moves_centers`` (else
stored), and ``grad[i] = grad_scale * d_i``. Sums, squares and ``d`` are
float64 whatever the data's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .jit import FAST_MATH, helper


class Batch(NamedTuple):
    """The arrays of one call. ``rows``: the features for the step (each row contributes
    ``d_i = rows[i] - centers[labels[i]]``), the updates for the scatter (each row contributes
    itself). ``written``: where the rows' sums go, ``centers`` itself or rule pytorch's
    grad_centers. ``grad``: the step's (B, D) grad (an empty stand-in for the scatter)."""

    labels: np.ndarray
    rows: np.ndarray
    centers: np.ndarray
    written: np.ndarray
    grad: np.ndarray
    rows_are_features: bool  # the step (else the scatter, whose rows are the updates)


@helper(inline="always", fastmath=FAST_MATH)
def add_row(row_sum, first, batch, i, label, with_grad, grad_scale, rows_are_features):
    """Add row i's contribution to ``row_sum`` (or start it: one pass over D fewer than zeroing
    first). With ``with_grad``, also write the grad row and return the squared norm of ``d_i``
    (else 0)."""
    rows, centers, grad = batch.rows, batch.centers, batch.grad
    squares = 0.0
    width = row_sum.size
    if rows_are_features and with_grad:
        for k in range(width):
            difference = np.float64(rows[i, k]) - np.float64(centers[label, k])
            grad[i, k] = grad_scale * difference
            squares += difference * difference
            row_sum[k] = difference if first else row_sum[k] + difference
    elif rows_are_features:
        for k in range(width):
            difference = np.float64(rows[i, k]) - np.float64(centers[label, k])
            row_sum[k] = difference if first else row_sum[k] + difference
    elif first:
        for k in range(width):
            row_sum[k] = rows[i, k]
    else:
        for k in range(width):
            row_sum[k] += rows[i, k]
    return squares


@helper(inline="always", fastmath=FAST_MATH)
def add_sums(row_sum, first, sums):
    if first:
        for k in range(row_sum.size):
            row_sum[k] = sums[k]
    else:
        for k in range(row_sum.size):
            row_sum[k] += sums[k]


@helper(inline="always")
def write_center_row(written, label, row_sum, count, rule):
    scale = rule.step / (1.0 + rule.count_weight * count)
    if rule.moves_centers:
        # ``written`` is ``centers`` here. Reading it through the name it is written through
        # lets LLVM vectorize: with two names for one array its runtime overlap check fails
        # and the scalar loop runs (measured 2x slower).
        for k in range(row_sum.size):
            written[label, k] += scale * row_sum[k]
    else:
        for k in range(row_sum.size):
            written[label, k] = scale * row_sum[k]


@helper(inline="always", fastmath=FAST_MATH)
def singleton_row(batch, rule, i, label):
    """A class with one row in the batch, in one pass over D: its grad row and its center row
    (no other row reads or writes it). Returns the squared norm of ``d_i`` (0 for the scatter)."""
    rows, centers, written, grad = batch.rows, batch.centers, batch.written, batch.grad
    scale = rule.step / (1.0 + rule.count_weight)
    grad_scale = rule.grad_scale
    squares = 0.0
    width = centers.shape[1]
    if not batch.rows_are_features:
        # The scatter (scale -1): c - u in the data's own dtype. For float32 that is the float64
        # path's result bit for bit (float64 has more than 2 x 24 + 2 bits, so rounding the
        # exact float64 difference to float32 equals rounding the difference once), and it
        # needs no conversions, which bound this loop otherwise.
        for k in range(width):
            centers[label, k] -= rows[i, k]
    elif rule.moves_centers:
        for k in range(width):
            center = np.float64(centers[label, k])
            difference = np.float64(rows[i, k]) - center
            grad[i, k] = grad_scale * difference
            squares += difference * difference
            centers[label, k] = center + scale * difference  # see write_center_row
    else:
        for k in range(width):
            difference = np.float64(rows[i, k]) - np.float64(centers[label, k])
            grad[i, k] = grad_scale * difference
            squares += difference * difference
            written[label, k] = scale * difference
    return squares
