"""Center loss over ``torch.distributed``: the centers move as if one process had seen every
rank's batch. They are either replicated, every rank holding the whole (K, D) centers and ending
with the same bits (the data-parallel step, below), or sharded, a ``DTensor`` placed ``Shard(0)``
with about K / R rows on each rank (the sharded step, ``centerkern.distributed.sharded``: two
all-to-all rounds over each rank's batch, the same bits as the data-parallel step's sparse
exchange).

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

The steps live in ``replicated`` (the data-parallel step and its two exchanges) and ``sharded``
(the sharded step, ``shard_centers`` and ``gather_centers``); ``shared`` holds what they share,
the header every rank agrees on before anything moves and the arithmetic whose bits must not
depend on the step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .._api import CenterLossResult
from .._core.errors import PeerInputError
from . import replicated, shared
from .replicated import _data_parallel_step, _replicated_step, choose_exchange
from .sharded import _sharded_step, gather_centers, shard_centers
from .shared import _is_sharded

__all__ = ["EXCHANGES", "SPARSE_BELOW_FRACTION", "PeerInputError", "center_loss", "choose_exchange", "gather_centers",
           "shard_centers"]

#: ``exchange="auto"`` takes the sparse exchange while R·U < SPARSE_BELOW_FRACTION · K (R ranks,
#: U the most classes one rank touched, K classes), the dense one otherwise (the measured crossover: see the scale-out guide).
SPARSE_BELOW_FRACTION = replicated.SPARSE_BELOW_FRACTION
#: The values ``center_loss``'s ``exchange`` takes: ``sparse`` and ``dense`` name the collective
#: that adds up the ranks' per-class sums, ``auto`` lets ``choose_exchange`` pick the cheaper one.
EXCHANGES = shared.EXCHANGES


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
    return _data_parallel_step(features, labels, centers, alpha, rule, out, group, backend, deterministic, exchange)
