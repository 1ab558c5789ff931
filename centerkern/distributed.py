"""Center loss over ``torch.distributed``: the centers move as if one process had seen every
rank's batch. They are either replicated, every rank holding the whole (K, D) centers and ending
with the same bits (the data-parallel step, below), or sharded, a ``DTensor`` placed ``Shard(0)``
with about K / R rows on each rank (the sharded step, at the end of this module: two all-to-all
rounds over each rank's batch, the same bits as the data-parallel step's sparse exchange).

In the data-parallel step each rank holds the same centers and a slice of the global batch. The loss and its gradient are
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

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from . import _api, _backends
from ._adapters import batch_classes
from ._core import validation
from ._api import CenterLossResult
from ._core.errors import PeerInputError
from ._core.interop import check_writable
from ._core.rules import RULES, moves_centers, rule_coefficients

__all__ = ["EXCHANGES", "SPARSE_BELOW_FRACTION", "PeerInputError", "center_loss", "choose_exchange", "gather_centers",
           "shard_centers"]

#: ``exchange="auto"`` takes the sparse exchange while R·U < SPARSE_BELOW_FRACTION · K (R ranks,
#: U the most classes one rank touched, K classes), the dense one otherwise (the measured crossover: see the scale-out guide).
SPARSE_BELOW_FRACTION = 1.0
#: The values ``center_loss``'s ``exchange`` takes: ``sparse`` and ``dense`` name the collective
#: that adds up the ranks' per-class sums, ``auto`` lets ``choose_exchange`` pick the cheaper one.
EXCHANGES = ("auto", "sparse", "dense")


def center_loss(
    features: torch.Tensor, labels: Any, centers: Any, alpha: Any, *, rule: str = "facenet",
    out: Any = None, group: Any = None, backend: str = "auto", deterministic: bool = False,
    exchange: str = "auto",
) -> CenterLossResult:
    """``centerkern.center_loss`` over a ``torch.distributed`` process group: the centers move as
    if one process had run the rule on the concatenation of every rank's batch. Every rank of the
    group must call it.

    Parameters
    ----------
    features : torch.Tensor, shape (B, D)
        This rank's batch (CPU tensors with gloo, CUDA tensors with NCCL).
    labels : array_like
        An integer tensor or array of B values in [0, K).
    centers : torch.Tensor or DTensor, shape (K, D)
        Decides the step. A plain tensor, or a ``DTensor`` placed ``Replicate()``: the
        data-parallel step, every rank holding the same centers and ending with the same bits.
        A ``DTensor`` placed ``Shard(0)`` over a 1-D ``DeviceMesh`` (``shard_centers``): the
        sharded step, each rank holding its block of rows only.
    alpha : float
        The rule's alpha, the same on every rank.
    rule : {"facenet", "wen", "pytorch"}
        The update rule (see ``centerkern.center_loss``), the same on every rank.
    out : None, or a tensor placed like ``centers``
        ``out=centers`` updates in place; None returns new centers and leaves ``centers``.
    group : process group, optional
        The data-parallel step's group (None: the default group). Sharded and ``Replicate()``
        centers use their mesh's group.
    backend : {"auto", "numpy", "numba", "cuda"}
        The kernels of this rank's part of the step (see ``centerkern.center_loss``).
    deterministic : bool
        See ``centerkern.center_loss``; the sums across ranks are always added in rank order.
    exchange : {"auto", "sparse", "dense"}
        How the data-parallel step exchanges its per-class sums: ``sparse`` all-gathers each
        rank's rows, ``dense`` all-reduces a K x (D + 1) table, ``auto`` picks the cheaper one
        (``choose_exchange``). The sharded step has one way, two all-to-all rounds.

    Returns
    -------
    CenterLossResult
        ``loss`` and ``grad``: this rank's own. ``centers``: after the step, placed as given.
        ``grad_centers`` (rule ``pytorch``): a plain tensor for plain centers (this rank's; DDP
        averages it), ``Partial("avg")`` for ``Replicate()`` centers, ``Shard(0)`` for sharded
        centers (each owner's rows already averaged over the ranks).

    Raises
    ------
    IndexError
        On the rank holding a label outside [0, K), before anything moves.
    PeerInputError
        On every other rank when one rank's input fails validation, and on every rank when the
        ranks disagree on K, D, the dtype, the exchange, the rule or alpha. No rank moves its
        centers, and none waits for ever.
    RuntimeError
        Outside a process group.
    TypeError, ValueError
        As ``centerkern.center_loss`` for malformed input; ``ValueError`` for centers placed
        otherwise than ``Shard(0)`` or ``Replicate()`` on a 1-D mesh, or sharded over a mesh
        whose ranks are not in its group's order.

    Examples
    --------
    A process group of one rank (a real run starts one process per rank, each with its own
    batch, with ``torchrun`` for example):

    >>> import os
    >>> import tempfile
    >>> import torch
    >>> import torch.distributed as dist
    >>> from torch.distributed.device_mesh import init_device_mesh
    >>> from centerkern.distributed import center_loss, shard_centers
    >>> store = os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
    >>> features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 2.0]])
    >>> labels = torch.tensor([0, 0, 2])

    The data-parallel step on replicated centers, updated in place. Class 0's two samples add
    up; class 1, absent from every rank's batch, stays where it was.

    >>> centers = torch.zeros(3, 2)
    >>> result = center_loss(features, labels, centers, 0.5, rule="wen", out=centers)
    >>> round(float(result.loss), 4)
    5.6667
    >>> result.grad[:2]
    tensor([[0.3333, 0.6667],
            [1.0000, 1.3333]])
    >>> result.centers is centers
    True
    >>> centers
    tensor([[0.6667, 1.0000],
            [0.0000, 0.0000],
            [0.0000, 0.5000]])

    The sharded step, on centers placed ``Shard(0)`` over a 1-D mesh: the same numbers.

    >>> sharded = shard_centers((3, 2), init_device_mesh("cpu", (1,)))
    >>> result = center_loss(features, labels, sharded, 0.5, rule="wen", out=sharded)
    >>> round(float(result.loss), 4)
    5.6667
    >>> torch.equal(sharded.full_tensor(), centers)
    True
    >>> dist.destroy_process_group()
    """
    if isinstance(centers, DTensor):
        if _is_sharded(centers):
            return _sharded_step(features, labels, centers, alpha, rule, out, backend, deterministic)
        return _replicated_step(features, labels, centers, alpha, rule, out, group, backend, deterministic, exchange)
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
        checked = _api.validate_center_loss(features, labels, centers, alpha, rule, out, backend)
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


def shard_centers(centers: Any, mesh: Any = None, *, dtype: torch.dtype | None = None, device: Any = None,
                  init: str = "zeros") -> DTensor:
    """Centers as a ``DTensor`` placed ``Shard(0)`` over a 1-D ``DeviceMesh``: rank r holds rows
    ``[r·c, (r + 1)·c)`` of the K, ``c = ceil(K / R)`` (``torch.chunk``'s split, that of
    ``distribute_tensor``; the last ranks may hold fewer rows, or none).

    Parameters
    ----------
    centers : (K, D) tuple, or torch.Tensor of shape (K, D)
        A shape: zero centers, each rank allocating its own rows only (nothing K x D is made on
        any rank). A tensor: the same centers on every rank (a checkpoint, a seeded init), of
        which each rank keeps a copy of its rows; nothing is sent.
    mesh : DeviceMesh, process group, or None
        A 1-D mesh, or the process group to make one of (None: the default group).
    dtype, device : optional
        For a shape: the centers' dtype (float32 by default) and device (the CPU, or the
        current CUDA device with NCCL).
    init : {"zeros", "normal"}
        For a shape: zeros, or standard normal values (trainable centers, as
        pytorch-center-loss's ``randn``). Each row's values depend on torch's seed on the first
        rank of the mesh and on the row alone, so a run draws the same centers on any number
        of ranks, and no two rows are alike.

    Returns
    -------
    DTensor, shape (K, D), placed ``Shard(0)``
        What ``center_loss`` takes as ``centers`` and ``out`` for the sharded step.

    Raises
    ------
    RuntimeError
        Outside a process group.
    ValueError
        For a shape that is not (K, D), an unknown ``init``, a mesh that is not 1-D or lists
        its ranks in another order than its process group.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> import torch
    >>> import torch.distributed as dist
    >>> from torch.distributed.device_mesh import init_device_mesh
    >>> from centerkern.distributed import shard_centers
    >>> store = os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)

    Zero centers from a shape, over the default group (one rank here, so it holds every row):

    >>> centers = shard_centers((5, 2))
    >>> centers.shape, centers.placements, centers.dtype
    (torch.Size([5, 2]), (Shard(dim=0),), torch.float32)
    >>> centers.to_local().shape
    torch.Size([5, 2])

    Standard normal centers for rule ``pytorch``, over a mesh:

    >>> trainable = shard_centers((5, 2), init_device_mesh("cpu", (1,)), init="normal")
    >>> bool(trainable.full_tensor().abs().sum() > 0)
    True

    The same centers on every rank, each keeping its rows:

    >>> shard_centers(torch.arange(6.0).reshape(3, 2)).full_tensor()
    tensor([[0., 1.],
            [2., 3.],
            [4., 5.]])
    >>> dist.destroy_process_group()
    """
    _require_process_group()
    if isinstance(centers, torch.Tensor):
        if centers.dim() != 2:
            raise ValueError(f"centers must be 2-D, got shape {tuple(centers.shape)}")
        shape, dtype, device = tuple(centers.shape), centers.dtype, centers.device
    else:
        shape, dtype = tuple(int(n) for n in centers), dtype or torch.float32
        if len(shape) != 2 or min(shape) < 0:
            raise ValueError(f"the centers' shape must be (K, D) with K, D >= 0, got {tuple(centers)}")
        validation.check_choice(init, "init", ("zeros", "normal"))
    mesh = _one_dimensional_mesh(mesh, device)
    first, stop = _owned_rows(shape[0], mesh.size(), mesh.get_local_rank())
    if isinstance(centers, torch.Tensor):
        local = centers.detach()[first:stop].clone()
    else:
        local = torch.zeros(stop - first, shape[1], dtype=dtype, device=device or mesh.device_type)
        if init == "normal":
            _fill_normal_rows(local, first, _seed_of_first_rank(mesh))
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=(shape[1], 1))


_ROWS_PER_DRAW = 1024  # rows drawn from one generator: what makes a row's values independent of R


def _seed_of_first_rank(mesh: DeviceMesh) -> int:
    """A seed drawn from torch's generator on the mesh's first rank, the same on every rank."""
    seed = [int(torch.randint(2**62, ()))]
    dist.broadcast_object_list(seed, group_src=0, group=mesh.get_group())
    return seed[0]


def _fill_normal_rows(local: torch.Tensor, first: int, seed: int) -> None:
    """Standard normal rows ``first, first + 1, ...`` into ``local``: rows come in blocks of
    ``_ROWS_PER_DRAW``, each block drawn whole from a generator seeded by ``seed`` and the
    block's number, so row j's values depend on ``seed`` and j only (and one block is the most
    drawn beyond this rank's rows)."""
    stop = first + local.shape[0]
    for block in range(first // _ROWS_PER_DRAW, -(-stop // _ROWS_PER_DRAW)):
        block_first = block * _ROWS_PER_DRAW
        generator = torch.Generator().manual_seed((seed + block * 0x9E3779B97F4A7C15) % 2**63)
        rows = torch.randn(_ROWS_PER_DRAW, local.shape[1], generator=generator, dtype=local.dtype)
        low, high = max(first, block_first), min(stop, block_first + _ROWS_PER_DRAW)
        local[low - first:high - first] = rows[low - block_first:high - block_first].to(local.device)


def gather_centers(centers: DTensor, labels: Any, *, backend: str = "auto") -> torch.Tensor:
    """``centers[labels]`` of sharded centers: this rank's (B, D) rows, each fetched from the rank
    that owns it (the first exchange of the sharded step). Every rank of the mesh must call it.

    Parameters
    ----------
    centers : DTensor
        Shape (K, D), placed ``Shard(0)`` (``shard_centers``).
    labels : array_like
        An integer tensor or array of B values in [0, K).
    backend : {"auto", "numpy", "numba", "cuda"}
        The kernels that gather the rows (see ``centerkern.gather_centers``).

    Returns
    -------
    torch.Tensor, shape (B, D)
        On the device of this rank's shard, in the centers' dtype.

    Raises
    ------
    IndexError
        On the rank holding a label outside [0, K).
    PeerInputError
        On the other ranks then; nothing waits for ever.
    TypeError
        When ``centers`` is not a sharded DTensor, or the labels are not integers.
    ValueError
        For an unknown ``backend``, or centers placed otherwise than ``Shard(0)`` on a 1-D
        mesh in its group's rank order.
    RuntimeError
        Outside a process group.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> import torch
    >>> import torch.distributed as dist
    >>> from centerkern.distributed import gather_centers, shard_centers
    >>> store = os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
    >>> centers = shard_centers(torch.arange(6.0).reshape(3, 2))
    >>> gather_centers(centers, torch.tensor([2, 0, 2]))
    tensor([[4., 5.],
            [0., 1.],
            [4., 5.]])
    >>> dist.destroy_process_group()
    """
    _require_process_group()
    if not isinstance(centers, DTensor):  # no mesh: no peer to tell, every rank raises alike
        raise TypeError(f"gather_centers takes sharded centers, a DTensor (shard_centers), got {type(centers).__name__}")
    mesh = centers.device_mesh
    error = header = None
    try:
        local = _sharded_local(centers)
        validation.check_choice(backend, "backend", _backends.CHOICES)
        labels = validation.check_labels(_host_labels(labels), None, centers.shape[0], "the gather")
        classes, index, header = _sharded_header(centers, labels, local.device, rule_index=-1, alpha=0.0)
    except Exception as caught:  # noqa: BLE001 - re-raised by _agree, after the other ranks are told
        error = caught
    headers = _agree(header, error, mesh.size(), mesh.get_group(), extra=mesh.size())
    rows, _ = _rows_from_owners(classes, local, centers.shape[0], mesh, headers, backend)
    return _api.gather_centers(rows, index, backend=backend)


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


_DTYPES = (torch.float32, torch.float64)
SHARDED = len(EXCHANGES)  # the header's exchange entry for the sharded step
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


def _exchanges_nothing(rule: str) -> bool:
    """Rule pytorch with replicated centers: nothing moves, so the data-parallel step exchanges
    nothing (an unknown rule goes on, to fail validation alike on every rank)."""
    return rule in RULES and not moves_centers(rule)


def _require_process_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "centerkern.distributed.center_loss needs a torch.distributed process group: call "
            "torch.distributed.init_process_group first (or use centerkern.center_loss)"
        )


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


# --------------------------------------------------------------------------- sharded centers
#
# Rank r owns rows [r·c, (r + 1)·c) of the centers, c = ceil(K / R). A step is the header
# every step shares first, which carries how many classes each rank asks of each owner (the
# splits of both rounds), then two all-to-all rounds over the rank's own batch:
#
# 1. the batch's classes go to their owners, who gather those rows (the gather kernel) and send
#    them back: every sample reads its center as it was before the step;
# 2. the rank's (count, float64 sums) per class, exactly the data-parallel step's partials, go
#    to the owners, who add them up in rank order and move their own rows.
#
# Rank order is the order of the sparse exchange too, and the partials, the sums and the rule
# are the same operations on the same numbers: the sharded step's centers equal the
# data-parallel step's (exchange="sparse") bit for bit, on the CPU, and on the GPU with
# deterministic=True (else each rank's own partial sums use float atomics). Each rank sends and
# receives about 2·B·D values a step, whatever K; no rank holds more than its c rows.


def _is_sharded(centers: DTensor) -> bool:
    placements = tuple(centers.placements)
    if placements == (Shard(0),):
        return True
    if placements == (Replicate(),):
        return False
    raise ValueError(
        f"centers placed {placements} on a mesh of shape {tuple(centers.device_mesh.shape)}: centerkern takes "
        "Shard(0) (the sharded step) or Replicate() (the data-parallel step) over a 1-D mesh"
    )


def _one_dimensional_mesh(mesh: Any, device: Any) -> DeviceMesh:
    if isinstance(mesh, DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(f"the centers are sharded over a 1-D DeviceMesh, got one of shape {tuple(mesh.shape)}")
        _check_mesh_in_group_order(mesh)
        return mesh
    group = mesh if mesh is not None else dist.group.WORLD
    device_type = torch.device(device).type if device is not None else (
        "cuda" if dist.get_backend(group) == "nccl" else "cpu")
    return DeviceMesh.from_group(group, device_type)


def _rows_per_rank(num_classes: int, world_size: int) -> int:
    """c = ceil(K / R), torch.chunk's split (as Shard(0)'s); at least 1, so that it divides."""
    return max(-(-num_classes // world_size), 1)


def _owned_rows(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows ``[first, stop)`` that ``rank`` owns."""
    rows_per_rank = _rows_per_rank(num_classes, world_size)
    first = min(rank * rows_per_rank, num_classes)
    return first, min(first + rows_per_rank, num_classes)


def _check_mesh_in_group_order(mesh: DeviceMesh) -> None:
    """Owners are mesh positions, and collectives address group ranks: the two must agree (a
    mesh over the world in another order, ``DeviceMesh("cpu", [1, 0])``, would send each class
    to the wrong owner). Every rank sees the same mesh, so every rank raises alike."""
    in_mesh_order = [int(rank) for rank in mesh.mesh.reshape(-1).tolist()]
    if in_mesh_order != dist.get_process_group_ranks(mesh.get_group()):
        raise ValueError(
            f"the mesh lists ranks {in_mesh_order}, its process group {dist.get_process_group_ranks(mesh.get_group())}: "
            "shard the centers over a mesh in its group's rank order (init_device_mesh or DeviceMesh.from_group)"
        )


def _sharded_local(centers: Any) -> torch.Tensor:
    """The local rows of Shard(0) centers, checked to be the rows ``_owned_rows`` says."""
    if not isinstance(centers, DTensor) or not _is_sharded(centers):
        raise TypeError(f"sharded centers must be a DTensor placed Shard(0) (shard_centers), got {type(centers).__name__}")
    local = centers.to_local()
    mesh = centers.device_mesh
    _check_mesh_in_group_order(mesh)
    first, stop = _owned_rows(centers.shape[0], mesh.size(), mesh.get_local_rank())
    if local.shape[0] != stop - first:
        raise ValueError(
            f"this rank holds {local.shape[0]} rows of the {centers.shape[0]} centers where Shard(0) over {mesh.size()} "
            f"ranks gives it {stop - first}: make the centers with shard_centers or distribute_tensor"
        )
    return local.detach()


def _host_labels(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy()
    return np.asarray(labels)


def _split_all_to_all(rows: torch.Tensor, send_counts: list[int], receive_counts: list[int], group: Any):
    """All-to-all of ``rows`` cut into blocks of ``send_counts`` rows, one per rank; what comes
    back is every rank's block for this one, in rank order."""
    device = _collective_device(group)
    received = torch.empty(sum(receive_counts), *rows.shape[1:], dtype=rows.dtype, device=device)
    dist.all_to_all_single(received, rows.to(device), receive_counts, send_counts, group=group)
    return received


def _sharded_header(centers: DTensor, labels: np.ndarray, device: Any, rule_index: int, alpha: float):
    """``classes, index, header`` of a sharded call on checked host ``labels``: the batch's
    classes (sorted, ``labels == classes[index]``) on ``device``, and the header, whose last
    entries count the classes this rank asks of each owner, the splits of both rounds (so that
    no round needs an exchange of counts of its own)."""
    classes, index = torch.unique(torch.from_numpy(np.ascontiguousarray(labels)).to(device), return_inverse=True)
    num_classes, world_size = centers.shape[0], centers.device_mesh.size()
    asked_of_each_owner = torch.bincount(classes // _rows_per_rank(num_classes, world_size), minlength=world_size)
    header = [classes.numel(), *centers.shape, _DTYPES.index(centers.dtype), SHARDED, rule_index, alpha,
              *asked_of_each_owner.tolist()]
    return classes, index, header


def _rows_from_owners(classes, local, num_classes, mesh, headers, backend):
    """Round one: the rows of ``classes`` (sorted), fetched from their owners; and what the
    owners need for round two (the counts sent each way, the classes this rank was asked for).
    ``headers`` are every rank's, as ``_agree`` returns them, with each rank's counts per owner."""
    group, rank = mesh.get_group(), mesh.get_local_rank()
    first, _ = _owned_rows(num_classes, mesh.size(), rank)
    send_counts = [int(n) for n in headers[rank][_HEADER_SIZE:]]
    receive_counts = [int(row[_HEADER_SIZE + rank]) for row in headers]
    asked = _split_all_to_all(classes, send_counts, receive_counts, group).to(local.device)
    served = _api.gather_centers(local, asked - first, backend=backend)
    rows = _split_all_to_all(served, receive_counts, send_counts, group).to(local.device)
    return rows, (send_counts, receive_counts, asked)


def _sharded_step(features, labels, centers, alpha, rule, out, backend, deterministic):
    _require_process_group()
    mesh = centers.device_mesh
    group, world_size = mesh.get_group(), mesh.size()
    num_classes = centers.shape[0]
    error = header = None
    try:  # anything that can fail on one rank alone fails here, before the first collective
        local = _sharded_local(centers)
        rule = validation.check_choice(rule, "rule", RULES)
        alpha = validation.check_alpha(alpha)
        validation.check_choice(backend, "backend", _backends.CHOICES)
        if not isinstance(features, torch.Tensor) or isinstance(features, DTensor):
            raise TypeError(f"features must be this rank's batch as a plain torch tensor, got {type(features).__name__}")
        host_labels = _host_labels(labels)
        batch_classes.check_shapes_and_dtypes(features, local, host_labels.size, host_labels.dtype)
        if features.device != local.device:
            raise ValueError(f"features on {features.device} and the centers' shard on {local.device}")
        host_labels = validation.check_labels(host_labels, features.shape[0], num_classes, f"features of shape {tuple(features.shape)}")
        if out is not None:
            out_local = _sharded_local(out)
            if out.device_mesh != mesh or out.shape != centers.shape or out.dtype != centers.dtype:
                raise ValueError("out must be sharded like the centers: the same mesh, shape and dtype")
            check_writable(out_local)
        features = features.detach()
        classes, index, header = _sharded_header(centers, host_labels, features.device, RULES.index(rule), alpha)
    except Exception as caught:  # noqa: BLE001 - re-raised by _agree, after the other ranks are told
        error = caught
    headers = _agree(header, error, world_size, group, extra=world_size)

    rows, (send_counts, receive_counts, asked) = _rows_from_owners(classes, local, num_classes, mesh, headers, backend)
    coefficients = rule_coefficients(rule, alpha, *features.shape)
    squares, grad, partials = _local_partials(features, index, rows, index, coefficients, backend, deterministic)
    del rows  # read: the next round holds the partials instead
    if not coefficients.moves_centers:
        # pytorch: what DDP makes of the data-parallel step's grad_centers, their average over
        # the ranks; each rank's rows are its own grad_centers (B is the rank's batch)
        partials[:, 1:] = (coefficients.step * partials[:, 1:]).to(features.dtype).double()
    received = _split_all_to_all(partials, send_counts, receive_counts, group).to(local.device)
    del partials  # sent
    first, _ = _owned_rows(num_classes, world_size, mesh.get_local_rank())
    touched, position = torch.unique(asked, return_inverse=True)
    totals = _added_in_rank_order(position, received, touched.numel(), backend)
    owned = touched - first

    grad_centers = None
    if coefficients.moves_centers:
        new_rows = _moved_rows(local.index_select(0, owned), totals, coefficients)
    else:  # pytorch: the centers stay; each owner's rows of grad_centers, the ranks' average
        grad_local = torch.zeros_like(local)
        grad_local[owned] = (totals[:, 1:] / world_size).to(local.dtype)
        grad_centers = _like(centers, grad_local)
    # out is written only now, after every collective, so that a failed exchange leaves it as it was
    target = local.clone() if out is None else out_local
    if out is not None and target.data_ptr() != local.data_ptr():
        target.copy_(local)
    if coefficients.moves_centers:
        target.index_copy_(0, owned, new_rows)
    return CenterLossResult(loss=coefficients.loss_scale * squares, grad=grad,
                            centers=_like(centers, target) if out is None else out, grad_centers=grad_centers)


def _like(centers: DTensor, local: torch.Tensor) -> DTensor:
    """``local`` as this rank's rows of a DTensor sharded as ``centers``."""
    return DTensor.from_local(local, centers.device_mesh, centers.placements, run_check=False,
                              shape=centers.shape, stride=centers.stride())


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
    result = center_loss(
        features, labels, centers.to_local(), alpha, rule=rule, out=None if out is None else out.to_local(),
        group=group, backend=backend, deterministic=deterministic, exchange=exchange,
    )
    moved = out if out is not None else _like(centers, result.centers)
    grad_centers = None
    if result.grad_centers is not None:
        grad_centers = DTensor.from_local(result.grad_centers, centers.device_mesh, [Partial("avg")], run_check=False,
                                          shape=centers.shape, stride=centers.stride())
    return result._replace(centers=moved, grad_centers=grad_centers)
