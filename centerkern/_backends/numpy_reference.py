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


# Codebooks (``centerkern.codebooks``): the per-code sums of a batch and the updates built on
# them. Every sum is taken in float64 with ``np.add.at`` (duplicates add up) and the state is
# read whole before any of it is written.


# How many scores one tile holds (rows x codes): 2^20, 4 MB in float32, 8 MB in float64.
ASSIGN_TILE_ELEMENTS = 1 << 20


def assign_codes(features: np.ndarray, codebook: np.ndarray, codes: np.ndarray, distances: np.ndarray) -> None:
    """Write each row's nearest code (squared Euclidean distance, the lowest index on a tie) and
    its distance, in float64."""
    assign_in_tiles(features, codebook, codes, distances, np.float64)


def assign_in_tiles(features, codebook, codes, distances, dtype) -> None:
    """``assign_codes`` with the products taken in ``dtype``: a tile of rows at a time (at most
    ``ASSIGN_TILE_ELEMENTS`` scores), so never an N x K matrix. The code of least
    ``|e|^2 - 2 x.e`` (the row's own ``|x|^2`` does not change which is least) is ``argmin``'s,
    the first of equal ones; each row's distance to it is then computed exactly, in float64."""
    codebook_in_dtype = codebook.astype(dtype, copy=False)
    code_norms = np.einsum("kd,kd->k", codebook, codebook, dtype=np.float64).astype(dtype)
    rows_per_tile = max(1, ASSIGN_TILE_ELEMENTS // max(1, codebook.shape[0]))
    scores = np.empty((min(rows_per_tile, features.shape[0]), codebook.shape[0]), dtype)
    for start in range(0, features.shape[0], rows_per_tile):
        rows = features[start:start + rows_per_tile]
        tile, nearest = scores[:rows.shape[0]], codes[start:start + rows.shape[0]]
        np.matmul(rows.astype(dtype, copy=False), codebook_in_dtype.T, out=tile)
        tile *= -2.0
        tile += code_norms
        np.argmin(tile, axis=1, out=nearest)
        differences = rows.astype(np.float64) - codebook[nearest]
        distances[start:start + rows.shape[0]] = np.einsum("nd,nd->n", differences, differences)


def _batch_sums(features, codes, weights, num_codes):
    """(per-code weight sums, per-code weighted feature sums), float64, duplicates added."""
    weight = np.ones(codes.size) if weights is None else weights.astype(np.float64)
    counts = np.zeros(num_codes, dtype=np.float64)
    np.add.at(counts, codes, weight)
    sums = np.zeros((num_codes, features.shape[1]), dtype=np.float64)
    np.add.at(sums, codes, features.astype(np.float64) * weight[:, None])
    return counts, sums


def class_sums(features, codes, weights, counts, sums) -> None:
    """Write the per-code weight sums (``counts``) and weighted feature sums (``sums``) of the
    batch, float64, every code's row (zero where no row has the code)."""
    counts[...], sums[...] = _batch_sums(features, codes, weights, counts.size)


def ema_apply(counts, sums, cluster_size, embed_avg, embed, settings) -> None:
    """The EMA update of ``settings`` (``centerkern._core.codebooks.EMASettings``) from a
    batch's per-code ``counts`` and ``sums``, in place on the three state arrays."""
    decay = settings.decay
    size = decay * cluster_size.astype(np.float64) + (1.0 - decay) * counts
    average = decay * embed_avg.astype(np.float64) + (1.0 - decay) * sums
    if settings.laplace:
        total = size.sum()
        smoothed = (size + settings.eps) / (total + size.size * settings.eps) * total
        code = average / smoothed[:, None]
    else:
        code = (average + settings.eps * embed.astype(np.float64)) / (size + settings.eps)[:, None]
    cluster_size[...] = size
    embed_avg[...] = average
    embed[...] = code


def ema_step(features, codes, weights, cluster_size, embed_avg, embed, settings) -> None:
    """``class_sums`` and ``ema_apply`` in one call."""
    ema_apply(*_batch_sums(features, codes, weights, cluster_size.size), cluster_size, embed_avg, embed, settings)


def kmeans_update(features, codes, weights, centers, weight_sums) -> None:
    """Mini-batch k-means (scikit-learn's ``_mini_batch_step``): each code that the batch holds
    moves to the weighted mean of its old center, weighted by ``weight_sums``, and its rows;
    ``weight_sums`` grows by the batch's weights. Codes the batch does not hold stay as they are."""
    counts, sums = _batch_sums(features, codes, weights, centers.shape[0])
    moved = counts > 0
    old_weight = weight_sums[moved].astype(np.float64)
    new_weight = old_weight + counts[moved]
    centers[moved] = (centers[moved].astype(np.float64) * old_weight[:, None] + sums[moved]) / new_weight[:, None]
    weight_sums[moved] = new_weight
