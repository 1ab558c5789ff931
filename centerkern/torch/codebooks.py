"""A VQ codebook with EMA updates as a PyTorch module: ``centerkern.torch.EMACodebook``.

It keeps vector-quantize-pytorch's state (buffers ``cluster_size`` (h, K), ``embed_avg`` and
``embed`` (h, K, D), h the number of codebooks), so that a ``state_dict`` moves between the two,
and replaces the layer's one-hot work: the nearest codes are found a tile of rows at a time,
the quantized rows are a gather, and the EMA update a scatter of each code's rows
(``centerkern.codebooks``), in float64, with duplicates added. No N x K matrix is made.

Under ``torch.distributed`` (``process_group=``, or ``distributed=True`` for the default group)
every rank moves its codebook by the whole batch of all ranks, so that the codebooks stay
identical:

- ``sparse``: the ranks' rows, codes and weights are all-gathered and every rank applies the
  whole batch in rank order (the same bits as one process on the concatenated batch);
- ``dense``: each rank's per-code row counts, weights and sums (K x (2 + D), float64) are all-reduced
  in one call, then applied (``ema_apply``);
- ``auto``: sparse while all ranks' rows together are fewer than K / 4 (the measured crossover
  of the center-loss exchanges).

Before either, the ranks share their batch sizes and whether their input passed its checks (one
small all-gather): ``auto`` then chooses alike on every rank, and a bad input on one rank fails
every rank (``centerkern.PeerInputError`` on the others) instead of leaving them waiting.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .. import codebooks
from .._adapters.batch_classes import EXCHANGES, exchange_for
from .._core import codebooks as checks
from .._core.errors import PeerInputError
from .._core.validation import check_choice

__all__ = ["EMACodebook", "CodebookOutput"]


class CodebookOutput(NamedTuple):
    """What ``EMACodebook`` returns, a named tuple.

    Parameters
    ----------
    quantize : torch.Tensor
        The quantized rows (the codes before the update), shaped as the input.
        No gradient flows through them.
    codes : torch.Tensor
        Each row's code, int64, the input's shape without D.
    counts : torch.Tensor
        How many rows each code got in the batch, (h, K) int64: all ranks' rows when
        distributed; zero marks a dead code.

    Examples
    --------
    >>> import torch
    >>> from centerkern.torch import EMACodebook
    >>> output = EMACodebook(dim=2, codebook_size=4).eval()(torch.zeros(3, 2))
    >>> output.codes.shape, output.counts.shape
    (torch.Size([3]), torch.Size([1, 4]))
    """

    quantize: torch.Tensor
    codes: torch.Tensor
    counts: torch.Tensor


class EMACodebook(nn.Module):
    """A Euclidean VQ codebook whose codes follow an EMA of their rows.

    Parameters
    ----------
    dim : int
        D, the size of a row.
    codebook_size : int
        K, the number of codes.
    num_codebooks : int, optional
        h, codebooks side by side (vector-quantize-pytorch's ``num_codebooks``); an input of
        shape (h, ..., D) is quantized by codebook i along its first axis.
    decay : float, optional
        γ; 0.8 as vector-quantize-pytorch.
    eps : float, optional
        ε of the smoothing.
    smoothing : {"current_code", "laplace"}, optional
        ``current_code`` (the default) as vector-quantize-pytorch 1.34; ``laplace`` as EnCodec
        (see ``centerkern.codebooks``).
    process_group : ProcessGroup, optional
        The ranks whose batches move the codebook together.
    distributed : bool, optional
        True: the default process group (when ``process_group`` is not given).
    exchange : {"auto", "sparse", "dense"}, optional
        How the ranks combine their batches (module docstring).

    Raises
    ------
    ValueError
        If ``decay``, ``eps``, ``smoothing`` or ``exchange`` is out of its range.

    Examples
    --------
    >>> import torch
    >>> from centerkern.torch import EMACodebook
    >>> torch.manual_seed(0) and None
    >>> codebook = EMACodebook(dim=4, codebook_size=16)
    >>> quantize, codes, counts = codebook(torch.randn(2, 8, 4))
    >>> quantize.shape, codes.shape, counts.shape, int(counts.sum())
    (torch.Size([2, 8, 4]), torch.Size([2, 8]), torch.Size([1, 16]), 16)
    """

    def __init__(self, dim: int, codebook_size: int, *, num_codebooks: int = 1, decay: float = 0.8,
                 eps: float = 1e-5, smoothing: str = "current_code", process_group: Any = None,
                 distributed: bool = False, exchange: str = "auto"):
        super().__init__()
        checks.ema_settings(decay, eps, smoothing)  # refused here; each call checks them again
        self.decay, self.eps, self.smoothing = decay, eps, smoothing
        self.exchange = check_choice(exchange, "exchange", EXCHANGES)
        self.process_group = process_group
        self.distributed = distributed or process_group is not None
        self.codebook_size, self.num_codebooks = codebook_size, num_codebooks
        embed = torch.empty(num_codebooks, codebook_size, dim)
        nn.init.kaiming_uniform_(embed)
        self.register_buffer("cluster_size", torch.zeros(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", torch.zeros(num_codebooks, codebook_size, dim))
        self.register_buffer("embed", embed)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> CodebookOutput:
        """Quantize ``x``, and in training mode move the codes.

        Parameters
        ----------
        x : torch.Tensor
            Rows of D, shape (..., D); with h codebooks, (h, ..., D), codebook i taking
            ``x[i]``.
        mask : torch.Tensor of bool, optional
            Rows to leave out of the update (False), shaped as ``x`` without D (with h
            codebooks, with or without h: one mask for every codebook).

        Returns
        -------
        CodebookOutput
            The quantized rows, the codes and the batch's rows per code.

        Raises
        ------
        IndexError, TypeError, ValueError
            As ``centerkern.codebooks.quantize``: nothing is written when a check fails.

        Examples
        --------
        >>> import torch
        >>> from centerkern.torch import EMACodebook
        >>> codebook = EMACodebook(dim=3, codebook_size=8).eval()     # eval: the codes stay
        >>> quantize, codes, counts = codebook(torch.randn(5, 3))
        >>> codes.shape, bool((quantize == codebook.embed[0][codes]).all())
        (torch.Size([5]), True)
        """
        rows_shape = x.shape[:-1]
        flat = x.detach().reshape(self.num_codebooks, -1, x.shape[-1]).to(self.embed.dtype)
        collective = self.training and self.distributed
        problem = None
        try:
            weights = _mask_weights(mask, self.num_codebooks, flat.shape[1])
        except (TypeError, ValueError) as error:
            if not collective:
                raise
            problem, weights = error, None  # raised once the other ranks know (_distributed_step)
        quantized, codes, counts = [], [], []
        for index in range(self.num_codebooks):
            rows = flat[index].contiguous()
            state = (self.cluster_size[index], self.embed_avg[index], self.embed[index])
            row_weights = None if weights is None else weights[index]
            if collective:
                result = self._distributed_step(rows, row_weights, problem, *state)
            else:
                result = codebooks.quantize(rows, *state, decay=self.decay, eps=self.eps, smoothing=self.smoothing,
                                            weights=row_weights, update=self.training)
            quantized.append(result.quantized)
            codes.append(result.codes)
            counts.append(result.counts)
        return CodebookOutput(torch.stack(quantized).reshape(*rows_shape, x.shape[-1]).to(x.dtype),
                              torch.stack(codes).reshape(rows_shape), torch.stack(counts))

    def _distributed_step(self, rows, weights, problem, cluster_size, embed_avg, embed) -> codebooks.Quantized:
        """One codebook's step on every rank. The ranks first share their batch sizes and whether
        their input failed its checks (``problem``, raised here on its own rank), so that a bad
        batch fails every rank, none left waiting in a collective that the bad one never reaches,
        and so that ``auto`` chooses alike everywhere."""
        import torch.distributed as dist

        group = self.process_group
        sizes, failed = _sizes_and_failures(group, dist.get_world_size(group), rows, problem is not None)
        if problem is not None:
            raise problem
        if failed:
            raise PeerInputError(f"the input of rank(s) {failed} failed validation; no rank moved its codebook")
        assignment = codebooks.assign_codes(rows, embed)
        quantized = embed[assignment.codes]  # the codes before the update
        options = dict(decay=self.decay, eps=self.eps, smoothing=self.smoothing)
        if exchange_for(self.exchange, 1, sum(sizes), self.codebook_size) == "sparse":
            all_rows, all_codes, all_weights = _all_gathered(group, sizes, rows, assignment.codes, weights)
            counts = codebooks.ema_update(all_rows, all_codes, cluster_size, embed_avg, embed,
                                          weights=all_weights, **options)
        else:
            sums = codebooks.class_sums(rows, assignment.codes, self.codebook_size, weights=weights)
            # one all-reduce: the rows per code ride in the table as float64, exact below 2^53
            row_counts = torch.bincount(assignment.codes, minlength=self.codebook_size).to(torch.float64)
            table = torch.cat([row_counts[:, None], sums.counts[:, None], sums.sums], dim=1)
            dist.all_reduce(table, group=group)
            codebooks.ema_apply(table[:, 1], table[:, 2:], cluster_size, embed_avg, embed, **options)
            counts = table[:, 0].to(torch.int64)
        return codebooks.Quantized(assignment.codes, assignment.distances, quantized, counts)


def _mask_weights(mask: torch.Tensor | None, num_codebooks: int, rows: int) -> torch.Tensor | None:
    """The mask as float64 weights, (h, rows): one mask for every codebook, or one per codebook."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.numel() == rows:
        return mask.reshape(1, rows).expand(num_codebooks, rows).to(torch.float64)
    if mask.numel() == num_codebooks * rows:
        return mask.reshape(num_codebooks, rows).to(torch.float64)
    raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {rows} rows per codebook")


def _sizes_and_failures(group, ranks: int, rows: torch.Tensor, failed: bool) -> tuple[list[int], list[int]]:
    """Every rank's number of rows, and the ranks whose input failed its checks."""
    import torch.distributed as dist

    mine = torch.tensor([rows.shape[0], int(failed)], dtype=torch.int64, device=rows.device)
    every = [torch.zeros_like(mine) for _ in range(ranks)]
    dist.all_gather(every, mine, group=group)
    return [int(part[0]) for part in every], [rank for rank, part in enumerate(every) if part[1]]


def _all_gathered(group, sizes: list[int], rows: torch.Tensor, codes: torch.Tensor, weights: torch.Tensor | None):
    """Every rank's rows, codes and weights, concatenated in rank order (batches may differ in size)."""
    import torch.distributed as dist

    largest = max(sizes)
    # one message: each row with its code and weight as float64 columns (exact for codes < 2^53)
    table = torch.zeros(largest, rows.shape[1] + 2, dtype=torch.float64, device=rows.device)
    table[:rows.shape[0], :-2] = rows
    table[:rows.shape[0], -2] = codes.to(torch.float64)
    table[:rows.shape[0], -1] = 1.0 if weights is None else weights
    gathered = [torch.empty_like(table) for _ in sizes]
    dist.all_gather(gathered, table, group=group)
    whole = torch.cat([part[:size] for part, size in zip(gathered, sizes)])
    # every rank's weights, ones where a rank had no mask: a rank without one of its own must
    # still weigh the others' rows as they do
    return whole[:, :-2].to(rows.dtype).contiguous(), whole[:, -2].to(torch.int64), whole[:, -1].contiguous()
