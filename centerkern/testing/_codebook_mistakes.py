"""The known mistakes of EMA codebook updates (VQ-VAE layers: EnCodec, Sonnet, vector-quantize-pytorch),
each written as the wrong step that makes it.

A mistake is a step with ``check_codebook_update``'s calling convention, ``step(features, codes,
cluster_size, embed_avg, embed, all_reduce=None)``, its settings (``decay``, ``eps``,
``smoothing``) as keywords, in NumPy, computing in float64 and writing into the state arrays it is
handed, as the reference does. The diagnosis runs it on the cases, shards and ranks the step under
test ran on, through the same harness, so that what a mistake predicts is what a step making it
returns, rank by rank, and nothing is modelled twice.

Where the code that makes a mistake varies in what it does around it (which row of a repeated
code a scatter keeps, what a dead code's batch mean is taken to be), the mistake has several
``variants``: it reproduces a quantity if one of them reproduces it on every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..codebooks import ema_apply


@dataclass(frozen=True)
class CodebookMistake:
    explanation: str  # what the user is told; unique, so tests can look for it
    variants: tuple[Callable, ...]  # wrong steps: (features, codes, cluster_size, embed_avg, embed, *, settings)
    # made only where the batch is split over ranks (with one rank the step would be right)
    sharded_only: bool = False


# --------------------------------------------------------------------------- the batch's counts and sums


def _counts_added(codes, num_codes):
    return np.bincount(codes, minlength=num_codes).astype(np.float64)


def _one_per_code(codes, num_codes):
    """counts[codes] = 1 (or += 1 through a fancy index): a repeated code counted once."""
    counts = np.zeros(num_codes)
    counts[codes] = 1.0
    return counts


def _sums_added(rows, codes, num_codes):
    sums = np.zeros((num_codes, rows.shape[1]))
    np.add.at(sums, codes, rows)
    return sums


def _last_row(rows, codes, num_codes):
    """sums[codes] = x: a repeated code keeps one row, the last (as NumPy, and torch on the CPU,
    assign a repeated index)."""
    sums = np.zeros((num_codes, rows.shape[1]))
    sums[codes] = rows
    return sums


# --------------------------------------------------------------------------- the codes from the EMA


def _unsmoothed(size, average, previous, counts, sums, decay):
    """embed = embed_avg / cluster_size: no smoothing (a code never used divides by zero)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return average / size[:, None]


def _means_of_present_codes(size, average, previous, counts, sums, decay):
    """The EMA of each code itself towards its batch mean; a dead code stays as it was."""
    present = counts > 0
    code = previous.copy()
    code[present] = decay * previous[present] + (1.0 - decay) * sums[present] / counts[present][:, None]
    return code


def _means_of_every_code(size, average, previous, counts, sums, decay):
    """The EMA of each code itself towards sums / max(counts, 1): a dead code's mean is taken as
    zero, so it decays towards the origin."""
    return decay * previous + (1.0 - decay) * sums / np.maximum(counts, 1.0)[:, None]


# --------------------------------------------------------------------------- the wrong steps


def wrong_step(*, counts_of=_counts_added, sums_of=_sums_added, reduce_counts=True, reduce_sums=True,
               code_of=None):
    """A step right but for what is named: how the batch's counts and sums are formed, which of
    them are all-reduced across ranks, and how the codes follow from the EMA (None: the
    reference's smoothing, ``ema_apply``)."""
    def step(features, codes, cluster_size, embed_avg, embed, all_reduce=None, *, decay, eps, smoothing):
        num_codes = embed.shape[0]
        rows, codes = np.asarray(features, dtype=np.float64), np.asarray(codes, dtype=np.int64)
        counts, sums = counts_of(codes, num_codes), sums_of(rows, codes, num_codes)
        if all_reduce is not None:  # every rank calls it alike: it is a collective
            counts = np.asarray(all_reduce(counts), dtype=np.float64) if reduce_counts else counts
            sums = np.asarray(all_reduce(sums), dtype=np.float64) if reduce_sums else sums
        if code_of is None:
            ema_apply(counts, sums, cluster_size, embed_avg, embed, decay=decay, eps=eps, smoothing=smoothing,
                      backend="numpy")
            return cluster_size, embed_avg, embed
        size = decay * cluster_size.astype(np.float64) + (1.0 - decay) * counts
        average = decay * embed_avg.astype(np.float64) + (1.0 - decay) * sums
        code = code_of(size, average, embed.astype(np.float64), counts, sums, decay)
        cluster_size[...], embed_avg[...], embed[...] = size, average, code
        return cluster_size, embed_avg, embed
    return step


def right_step(features, codes, cluster_size, embed_avg, embed, all_reduce=None, *, decay, eps, smoothing):
    """The update made right, in the same form as the mistakes (for the diagnosis's own checks)."""
    return wrong_step()(features, codes, cluster_size, embed_avg, embed, all_reduce, decay=decay, eps=eps,
                        smoothing=smoothing)


ALL_REDUCE = ("all_reduce the batch's counts and sums, as torch.distributed.all_reduce does, before the EMA: "
              "every rank must take the same step")

# public as centerkern.testing.CODEBOOK_MISTAKES (documented there)
CODEBOOK_MISTAKES: tuple[CodebookMistake, ...] = (
    CodebookMistake("duplicate codes are not accumulated: a code's batch sum is one of its rows (a scatter such as "
                    "sums[codes] = x keeps one row per code; add them: np.add.at, index_add_, scatter_add_ or a "
                    "one-hot matmul)",
                    (wrong_step(sums_of=_last_row), wrong_step(sums_of=_last_row, counts_of=_one_per_code))),
    CodebookMistake("the smoothing is left out: embed = embed_avg / cluster_size, which divides by zero for a code "
                    "never used and by almost zero for a code long dead (Laplace's smoothing, or "
                    "vector-quantize-pytorch's, keeps the division finite)", (wrong_step(code_of=_unsmoothed),)),
    CodebookMistake("the EMA is applied to the codes, not to the counts and sums: embed = decay·embed + "
                    "(1 - decay)·(the code's batch mean), which weighs a code's batch mean alike whether one row "
                    "or a thousand made it (keep the EMA of the counts and of the sums, and divide them)",
                    (wrong_step(code_of=_means_of_present_codes), wrong_step(code_of=_means_of_every_code))),
    CodebookMistake("neither the batch's per-code counts nor its sums are all-reduced across ranks: each rank's "
                    f"codebook follows its own shard of the batch ({ALL_REDUCE})",
                    (wrong_step(reduce_counts=False, reduce_sums=False),), sharded_only=True),
    CodebookMistake("the batch's per-code counts are not all-reduced across ranks (its sums are): each rank divides "
                    f"the sums of the whole batch by the counts of its own shard ({ALL_REDUCE})",
                    (wrong_step(reduce_counts=False),), sharded_only=True),
    CodebookMistake("the batch's per-code sums are not all-reduced across ranks (its counts are): each rank divides "
                    f"the sums of its own shard by the counts of the whole batch ({ALL_REDUCE})",
                    (wrong_step(reduce_sums=False),), sharded_only=True),
)
