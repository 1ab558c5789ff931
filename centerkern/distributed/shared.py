"""What both steps of ``centerkern.distributed`` share: the header every rank agrees on before
anything moves, where the collectives take their tensors, and the local arithmetic whose bits
must not depend on the step (this rank's partial sums, their addition in rank order, the rule
applied to the totals).

The header is one all-gather of a few float64 values per rank, ``_HEADER_SIZE`` of them that
every rank must agree on but the first, then ``extra`` of the rank's own:

====  =================================================================================
0     how many classes this rank's batch touched (-1: its input failed validation)
1, 2  K and D, the centers' shape
3     the centers' dtype, an index into ``_DTYPES``
4     the exchange, an index into ``EXCHANGES``, or ``SHARDED`` for the sharded step
5     the rule, an index into ``RULES`` (-1 for the sharded gather, which has none)
6     alpha
7...  (sharded step only) how many classes this rank asks of each owner
====  =================================================================================
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from .. import _api
from .._core.errors import PeerInputError

# the values center_loss's exchange takes (documented where the package exports them); the
# header carries the choice as an index into them
EXCHANGES = ("auto", "sparse", "dense")

_DTYPES = (torch.float32, torch.float64)
SHARDED = len(EXCHANGES)  # the header's exchange entry for the sharded step
_HEADER_SIZE = 7  # classes touched, K, D, dtype, exchange, rule, alpha


def _require_process_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "centerkern.distributed.center_loss needs a torch.distributed process group: call "
            "torch.distributed.init_process_group first (or use centerkern.center_loss)"
        )


def _collective_device(group: Any) -> torch.device:
    """Where this group's collectives take their tensors: NCCL's on the GPU, gloo's on the host."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_headers(header: list[float], world_size: int, group: Any) -> list[list[float]]:
    """Every rank's header (float64 holds the counts, sizes and alpha exactly)."""
    mine = torch.tensor(header, dtype=torch.float64, device=_collective_device(group))
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine, group=group)
    return [row.tolist() for row in everyone]


def _agree(header: list[float] | None, error: Exception | None, world_size: int, group: Any,
           extra: int = 0) -> list[list[float]]:
    """Share every rank's header (None: this rank's input failed with ``error``) and raise on
    every rank if any input failed or the ranks disagree; else every rank's header. The one
    collective before anything is exchanged or written. A header is ``_HEADER_SIZE`` entries
    every rank must agree on but the first (its count of touched classes), then ``extra``
    entries of its own (the sharded step's rows for each owner)."""
    failed_header = [-1.0] * (_HEADER_SIZE + extra)
    headers = _all_gather_headers(failed_header if header is None else header, world_size, group)
    if error is not None:
        raise error
    failed = [rank for rank, row in enumerate(headers) if row[0] < 0]
    if failed:
        raise PeerInputError(f"the input of rank(s) {failed} failed validation; no rank moved its centers")
    agreed = slice(1, _HEADER_SIZE)
    disagreeing = [rank for rank, row in enumerate(headers) if row[agreed] != headers[0][agreed]]
    if disagreeing:
        raise PeerInputError(
            f"rank(s) {disagreeing} disagree with rank 0 on the centers' shape or dtype, the exchange, the rule "
            "or alpha; no rank moved its centers"
        )
    return headers


# --------------------------------------------------------------------------- placements


def _is_sharded(centers: DTensor) -> bool:
    """Whether DTensor ``centers`` take the sharded step (``Shard(0)``) rather than the
    data-parallel one (``Replicate()``); any other placement is refused."""
    placements = tuple(centers.placements)
    if placements == (Shard(0),):
        return True
    if placements == (Replicate(),):
        return False
    raise ValueError(
        f"centers placed {placements} on a mesh of shape {tuple(centers.device_mesh.shape)}: centerkern takes "
        "Shard(0) (the sharded step) or Replicate() (the data-parallel step) over a 1-D mesh"
    )


def _like(centers: DTensor, local: torch.Tensor) -> DTensor:
    """``local`` as this rank's part of a DTensor placed as ``centers``."""
    return DTensor.from_local(local, centers.device_mesh, centers.placements, run_check=False,
                              shape=centers.shape, stride=centers.stride())


# --------------------------------------------------------------------------- the arithmetic
#
# Both steps compute the same partials with the same kernels and add them up in the same (rank)
# order: that is what makes the sharded step's centers equal the data-parallel step's bit for bit.


def _local_partials(features, index, rows, labels_of_rows, coefficients, backend, deterministic):
    """This rank's part of a step: the sum of squares, ``grad``, and per touched class its count
    and float64 sum of ``d_i`` (a (U, 1 + D) table). ``rows[labels_of_rows]`` are the batch's
    centers: the whole centers and the labels, or the batch's own rows and ``index``. It holds
    one float64 (B, D) array at a time (the step's largest temporary)."""
    # float64 for the sums, as the kernels: e = c - f = -d, so that scatter_sub adds up +d
    minus_difference = _api.gather_centers(rows, labels_of_rows, backend=backend).double().sub_(features)
    flat = minus_difference.reshape(-1)
    squares = float(torch.dot(flat, flat))
    touched = int(index.max()) + 1 if index.numel() else 0
    partials = torch.zeros(touched, 1 + features.shape[1], dtype=torch.float64, device=features.device)
    partials[:, 0] = torch.bincount(index, minlength=touched).double()
    sums = partials[:, 1:]
    _api.scatter_sub_update(sums, index, minus_difference, out=sums, backend=backend, deterministic=deterministic)
    grad = minus_difference.mul_(-coefficients.grad_scale).to(features.dtype)  # in place: its last use
    return squares, grad, partials


def _added_in_rank_order(position, received, touched, backend):
    """Rows of (count, sums) added up per entry of ``position`` in the order they came, which is
    rank order: the scatter kernel adds duplicates in batch order, so every rank (and the sharded
    step's owners) compute the same bits from the same rows. ``received`` is the caller's own
    copy, negated in place (scatter_sub of -x adds x; negation is exact)."""
    totals = torch.zeros(touched, received.shape[1], dtype=torch.float64, device=received.device)
    _api.scatter_sub_update(totals, position, received.neg_(), out=totals, backend=backend, deterministic=True)
    return totals


def _moved_rows(rows, totals, coefficients):
    """The rule applied to ``rows`` (their centers as they were) with the (count, sums) totals,
    which are used up: the update is computed in their memory (scale·S + c is c + scale·S, to the
    bit), so the step holds no further float64 array of that size."""
    scale = coefficients.step / (1.0 + coefficients.count_weight * totals[:, 0])
    return totals[:, 1:].mul_(scale[:, None]).add_(rows).to(rows.dtype)
