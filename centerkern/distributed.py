"""Data-parallel center loss over ``torch.distributed``: the centers move as if one process had
seen every rank's batch, and every rank ends with the same bits.

Each rank holds the same centers and a slice of the global batch. The loss and its gradient are
the rank's own (DDP averages gradients as usual). The update of class j needs the global
``S_j = sum of d_i`` and ``n_j`` over every rank's samples; since every rank reads the same
centers, those are sums of per-rank partials, so a step is

1. local: ``d_i`` against the shared centers, the loss and grad, and the partial sums and
   counts of the classes this rank saw (the scatter kernel, float64);
2. exchange the partials, by whichever collective is cheaper (below);
3. every rank applies the rule to the classes seen anywhere, with identical inputs in an
   identical order, so every replica computes identical bits.

The exchange:

* ``sparse``: all-gather of each rank's ``(class, count, sums)`` rows, padded to the largest
  rank's number of classes U. Every rank receives R·U rows of D + 2 float64 values and adds
  them up in rank order (the scatter kernel, deterministic). Cheap when a batch touches few
  classes.
* ``dense``: all-reduce of a (K, D + 1) float64 table of counts and sums. Its cost does not
  depend on U; a ring all-reduce moves about 2·K·(D + 1) values per rank, and its result is
  computed once per chunk and copied to every rank (gloo's and NCCL's ring and tree
  algorithms), so all replicas hold the same bits.

``exchange="auto"`` takes ``sparse`` while ``R·U < SPARSE_BELOW_FRACTION · K`` (R ranks, U the
most classes one rank touched, K classes). Measured with gloo on 127.0.0.1 (K = 20000,
D = 128, ``benchmarks/distributed_exchange.py``, ``benchmarks/results/distributed-*.json``),
dense became the faster between R·U/K = 0.41 and 0.82 with 2 ranks, 0.61 and 1.23 with 3,
0.82 and 1.64 with 4: both costs grow with D alike, so the crossover is a ratio of row counts.

Before anything is exchanged the ranks share a small header in one all-gather: how many
classes each touched (the padding of the sparse exchange, and the choice of exchange, which
every rank must make alike), K, D, the dtype, the exchange, the rule and alpha, or a flag for
invalid input. A rank whose input fails validation raises its own error, and the others raise
``PeerInputError`` instead of waiting forever in the next collective; so do all ranks when the
headers disagree (replicas would drift apart, or the collectives would not match). Only then
is ``out`` written: an error leaves every rank's centers as they were.

Rule ``pytorch`` leaves the centers to the caller's optimizer: its ``grad_centers`` is local and
DDP (or the caller) averages it like any parameter gradient, so nothing is exchanged here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from . import _api, _validation
from ._api import CenterLossResult
from ._errors import PeerInputError
from ._rules import RULES, moves_centers, rule_coefficients

# sparse while R * U < SPARSE_BELOW_FRACTION * K (see the module docstring)
SPARSE_BELOW_FRACTION = 1.0
EXCHANGES = ("auto", "sparse", "dense")


def center_loss(
    features: torch.Tensor, labels: Any, centers: torch.Tensor, alpha: Any, *, rule: str = "facenet",
    out: torch.Tensor | None = None, group: Any = None, backend: str = "auto", deterministic: bool = False,
    exchange: str = "auto",
) -> CenterLossResult:
    """``centerkern.center_loss`` over a ``torch.distributed`` process group.

    Same arguments and result as ``centerkern.center_loss`` (torch tensors: CPU with gloo, CUDA
    with NCCL), plus ``group`` (None: the default group) and ``exchange`` ("auto", "sparse",
    "dense"; see the module docstring). ``loss`` and ``grad`` are this rank's; ``centers``
    are the centers after one step of the rule on the concatenation of every rank's batch,
    identical on every rank. Every rank of the group must call it, with the same centers.
    """
    if rule in RULES and not moves_centers(rule):
        # pytorch: nothing moves here, so there is nothing to exchange
        return _api.center_loss(
            features, labels, centers, alpha, rule=rule, out=out, backend=backend, deterministic=deterministic
        )
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "centerkern.distributed.center_loss needs a torch.distributed process group: call "
            "torch.distributed.init_process_group first (or use centerkern.center_loss)"
        )
    world_size = dist.get_world_size(group)
    error = None
    try:  # anything that can fail on one rank alone fails here, before the first collective
        _validation.check_choice(exchange, "exchange", EXCHANGES)
        if not all(isinstance(x, torch.Tensor) for x in (features, centers) + (() if out is None else (out,))):
            raise TypeError(
                "features, centers and out must be torch tensors, got "
                f"{type(features).__name__}, {type(centers).__name__} and {type(out).__name__}"
            )
        checked = _api.validate_center_loss(features, labels, centers, alpha, rule, out, backend)
        features, centers = features.detach(), centers.detach()  # the gradient is returned, not recorded
        labels = torch.as_tensor(labels, device=features.device).reshape(-1).to(torch.int64)
        classes, index = torch.unique(labels, return_inverse=True)
        header = [classes.numel(), *centers.shape, _DTYPES.index(centers.dtype), EXCHANGES.index(exchange),
                  RULES.index(checked.rule), checked.alpha]
    except Exception as caught:  # noqa: BLE001 - re-raised below, after the other ranks are told
        error, header = caught, [-1.0] * _HEADER_SIZE
    headers = _all_gather_headers(header, world_size, group)
    if error is not None:
        raise error
    failed = [rank for rank, row in enumerate(headers) if row[0] < 0]
    if failed:
        raise PeerInputError(f"the input of rank(s) {failed} failed validation; no rank moved its centers")
    disagreeing = [rank for rank, row in enumerate(headers) if row[1:] != headers[0][1:]]
    if disagreeing:
        raise PeerInputError(
            f"rank(s) {disagreeing} disagree with rank 0 on the centers' shape or dtype, the exchange, the rule "
            "or alpha; no rank moved its centers"
        )
    sizes = [int(row[0]) for row in headers]

    coefficients = rule_coefficients(checked.rule, checked.alpha, *features.shape)
    gathered = _api.gather_centers(centers, labels, backend=backend)
    # float64 for the sums, as the kernels: e = c - f = -d, so that scatter_sub adds up +d
    minus_difference = gathered.double() - features.double()
    squares = float(minus_difference.pow(2).sum())
    grad = (-coefficients.grad_scale * minus_difference).to(features.dtype)
    partial_sums = torch.zeros(classes.numel(), features.shape[1], dtype=torch.float64, device=features.device)
    _api.scatter_sub_update(
        partial_sums, index, minus_difference, out=partial_sums, backend=backend, deterministic=deterministic
    )
    counts = torch.bincount(index, minlength=classes.numel()).double()

    num_classes = centers.shape[0]
    touched = torch.empty(0, dtype=torch.int64, device=features.device)
    if max(sizes) > 0:  # an empty global batch moves nothing
        chosen = choose_exchange(exchange, world_size, max(sizes), num_classes)
        combine = _exchange_sparse if chosen == "sparse" else _exchange_dense
        touched, total_counts, total_sums = combine(classes, counts, partial_sums, sizes, num_classes, group, backend)
        scale = coefficients.step / (1.0 + coefficients.count_weight * total_counts)
        # read before anything is written: out may overlap the centers
        new_rows = (centers.index_select(0, touched).double() + scale[:, None] * total_sums).to(centers.dtype)

    # out is written only now, after every collective, so that a failed exchange leaves it as it was
    target = centers.clone() if out is None else out.detach()
    if out is not None and not checked.out_is_centers:
        target.copy_(centers)
    if touched.numel():
        target.index_copy_(0, touched, new_rows)
    return CenterLossResult(
        loss=coefficients.loss_scale * squares, grad=grad, centers=target if out is None else out, grad_centers=None
    )


def choose_exchange(exchange: str, world_size: int, most_touched: int, num_classes: int) -> str:
    """``sparse`` or ``dense``: what ``exchange`` asks for, or for ``auto`` the cheaper one by the
    measured crossover. Every rank passes the same numbers (from the header), so every rank
    makes the same choice."""
    if exchange != "auto":
        return exchange
    return "sparse" if world_size * most_touched < SPARSE_BELOW_FRACTION * num_classes else "dense"


_DTYPES = (torch.float32, torch.float64)
_HEADER_SIZE = 7  # classes touched, K, D, dtype, exchange, rule, alpha


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


def _exchange_sparse(classes, counts, partial_sums, sizes, num_classes, group, backend):
    """All-gather the rows (class, count, sums) of every rank, then add them up in rank order."""
    width = partial_sums.shape[1]
    rows = torch.zeros(max(sizes), width + 2, dtype=torch.float64, device=_collective_device(group))
    rows[: classes.numel(), 0] = classes.double()  # class ids are exact in float64 below 2**53
    rows[: classes.numel(), 1] = counts
    rows[: classes.numel(), 2:] = partial_sums
    received = [torch.empty_like(rows) for _ in sizes]
    dist.all_gather(received, rows, group=group)
    every_row = torch.cat([block[:size] for block, size in zip(received, sizes)]).to(partial_sums.device)
    touched, position = torch.unique(every_row[:, 0].to(torch.int64), return_inverse=True)
    # the scatter kernel adds duplicates in batch order, here rank order: the same bits on every rank
    totals = torch.zeros(touched.numel(), width + 1, dtype=torch.float64, device=partial_sums.device)
    _api.scatter_sub_update(totals, position, -every_row[:, 1:], out=totals, backend=backend, deterministic=True)
    return touched, totals[:, 0], totals[:, 1:]


def _exchange_dense(classes, counts, partial_sums, sizes, num_classes, group, backend):
    """All-reduce a (K, D + 1) table of counts and sums."""
    table = torch.zeros(num_classes, partial_sums.shape[1] + 1, dtype=torch.float64, device=_collective_device(group))
    classes = classes.to(table.device)
    table[classes, 0] = counts.to(table.device)
    table[classes, 1:] = partial_sums.to(table.device)
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)
    touched = torch.nonzero(table[:, 0]).reshape(-1)
    return tuple(x.to(partial_sums.device) for x in (touched, table[touched, 0], table[touched, 1:]))
