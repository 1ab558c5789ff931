"""The data-parallel step of ``centerkern.distributed``: replicated centers, every rank holding
the whole (K, D) centers and ending with the same bits, and the two exchanges of the ranks'
per-class sums (``sparse`` and ``dense``) with the choice between them. The package's docstring
describes the step and the measured crossover of the exchanges."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate

from .. import _api
from .._api import CenterLossResult
from .._core import validation
from .._core.rules import RULES, moves_centers, rule_coefficients
from .shared import (_DTYPES, EXCHANGES, _added_in_rank_order, _agree, _collective_device, _like, _local_partials,
                     _moved_rows, _require_process_group)

__all__ = ["SPARSE_BELOW_FRACTION", "choose_exchange"]

# exchange="auto" takes the sparse exchange while R·U < SPARSE_BELOW_FRACTION · K (documented
# where the package exports it)
SPARSE_BELOW_FRACTION = 1.0


def choose_exchange(exchange: str, world_size: int, most_touched: int, num_classes: int) -> str:
    """``sparse`` or ``dense``: what ``exchange`` asks for, or for ``auto`` the cheaper one by the
    measured crossover. Every rank passes the same numbers (from the header), so every rank
    makes the same choice.

    ``auto`` takes ``sparse`` while ``world_size * most_touched < SPARSE_BELOW_FRACTION *
    num_classes``.

    Parameters
    ----------
    exchange : {"auto", "sparse", "dense"}
        What the caller asked for (``center_loss``'s ``exchange``).
    world_size : int
        R, the number of ranks.
    most_touched : int
        U, the most classes one rank's batch touched.
    num_classes : int
        K, the number of classes.

    Returns
    -------
    str
        ``"sparse"`` or ``"dense"``.

    Raises
    ------
    ValueError
        If ``exchange`` is not one of ``EXCHANGES``.

    Examples
    --------
    >>> from centerkern.distributed import choose_exchange
    >>> choose_exchange("auto", world_size=4, most_touched=100, num_classes=20000)
    'sparse'
    >>> choose_exchange("auto", world_size=4, most_touched=8000, num_classes=20000)
    'dense'
    >>> choose_exchange("sparse", world_size=4, most_touched=8000, num_classes=20000)
    'sparse'
    """
    validation.check_choice(exchange, "exchange", EXCHANGES)
    if exchange != "auto":
        return exchange
    return "sparse" if world_size * most_touched < SPARSE_BELOW_FRACTION * num_classes else "dense"


def _exchanges_nothing(rule: str) -> bool:
    """Rule pytorch with replicated centers: nothing moves, so the data-parallel step exchanges
    nothing (an unknown rule goes on, to fail validation alike on every rank)."""
    return rule in RULES and not moves_centers(rule)


def _data_parallel_step(features, labels, centers, alpha, rule, out, group, backend, deterministic, exchange):
    """``center_loss`` on plain tensors: every rank's partial sums exchanged over ``group``,
    the rule applied to identical totals in an identical order on every rank."""
    if _exchanges_nothing(rule):
        return _api.center_loss(
            features, labels, centers, alpha, rule=rule, out=out, backend=backend, deterministic=deterministic
        )
    _require_process_group()
    world_size = dist.get_world_size(group)
    error = None
    try:  # anything that can fail on one rank alone fails here, before the first collective
        validation.check_choice(exchange, "exchange", EXCHANGES)
        if not all(isinstance(x, torch.Tensor) for x in (features, centers) + (() if out is None else (out,))):
            raise TypeError(
                "features, centers and out must be torch tensors, got "
                f"{type(features).__name__}, {type(centers).__name__} and {type(out).__name__}"
            )
        checked = _api.checked_center_loss_inputs(features, labels, centers, alpha, rule, out, backend)
        features, centers = features.detach(), centers.detach()  # the gradient is returned, not recorded
        labels = torch.as_tensor(labels, device=features.device).reshape(-1).to(torch.int64)
        classes, index = torch.unique(labels, return_inverse=True)
        header = [classes.numel(), *centers.shape, _DTYPES.index(centers.dtype), EXCHANGES.index(exchange),
                  RULES.index(checked.rule), checked.alpha]
    except Exception as caught:  # noqa: BLE001 - re-raised by _agree, after the other ranks are told
        error, header = caught, None
    sizes = [int(row[0]) for row in _agree(header, error, world_size, group)]

    coefficients = rule_coefficients(checked.rule, checked.alpha, *features.shape)
    squares, grad, partials = _local_partials(features, index, centers, labels, coefficients, backend, deterministic)

    num_classes = centers.shape[0]
    touched = torch.empty(0, dtype=torch.int64, device=features.device)
    if max(sizes) > 0:  # an empty global batch moves nothing
        chosen = choose_exchange(exchange, world_size, max(sizes), num_classes)
        combine = _exchange_sparse if chosen == "sparse" else _exchange_dense
        touched, totals = combine(classes, partials, sizes, num_classes, group, backend)
        # read before anything is written: out may overlap the centers
        new_rows = _moved_rows(centers.index_select(0, touched), totals, coefficients)

    # out is written only now, after every collective, so that a failed exchange leaves it as it was
    target = centers.clone() if out is None else out.detach()
    if out is not None and not checked.out_is_centers:
        target.copy_(centers)
    if touched.numel():
        target.index_copy_(0, touched, new_rows)
    return CenterLossResult(
        loss=coefficients.loss_scale * squares, grad=grad, centers=target if out is None else out, grad_centers=None
    )


def _replicated_step(features, labels, centers, alpha, rule, out, group, backend, deterministic, exchange):
    """Replicate() centers: the data-parallel step on the local replicas, over the mesh's group.
    Rule pytorch's ``grad_centers`` differ by rank (each from its own batch): they come back
    placed ``Partial("avg")``, whose full tensor is their average, what DDP makes of them."""
    group = centers.device_mesh.get_group() if group is None else group
    if out is not None and not (isinstance(out, DTensor) and tuple(out.placements) == (Replicate(),)):
        error = TypeError(f"out must be placed like the centers, Replicate(), or None; got {type(out).__name__}")
        if _exchanges_nothing(rule):
            raise error  # no peer waits
        _agree(None, error, dist.get_world_size(group), group)  # the others wait in the step's header
    result = _data_parallel_step(
        features, labels, centers.to_local(), alpha, rule, None if out is None else out.to_local(),
        group, backend, deterministic, exchange,
    )
    moved = out if out is not None else _like(centers, result.centers)
    grad_centers = None
    if result.grad_centers is not None:
        grad_centers = DTensor.from_local(result.grad_centers, centers.device_mesh, [Partial("avg")], run_check=False,
                                          shape=centers.shape, stride=centers.stride())
    return result._replace(centers=moved, grad_centers=grad_centers)


def _exchange_sparse(classes, partials, sizes, num_classes, group, backend):
    """All-gather the rows (class, count, sums) of every rank, then add them up in rank order."""
    rows = torch.zeros(max(sizes), 1 + partials.shape[1], dtype=torch.float64, device=_collective_device(group))
    rows[: classes.numel(), 0] = classes.double()  # class ids are exact in float64 below 2**53
    rows[: classes.numel(), 1:] = partials
    received = [torch.empty_like(rows) for _ in sizes]
    dist.all_gather(received, rows, group=group)
    every_row = torch.cat([block[:size] for block, size in zip(received, sizes)]).to(partials.device)
    touched, position = torch.unique(every_row[:, 0].to(torch.int64), return_inverse=True)
    return touched, _added_in_rank_order(position, every_row[:, 1:], touched.numel(), backend)


def _exchange_dense(classes, partials, sizes, num_classes, group, backend):
    """All-reduce a (K, 1 + D) table of counts and sums."""
    table = torch.zeros(num_classes, partials.shape[1], dtype=torch.float64, device=_collective_device(group))
    table[classes.to(table.device)] = partials.to(table.device)
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)
    touched = torch.nonzero(table[:, 0]).reshape(-1)
    return touched.to(partials.device), table[touched].to(partials.device)
