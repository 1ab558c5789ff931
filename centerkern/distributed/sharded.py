"""The sharded step of ``centerkern.distributed``: centers as a ``DTensor`` placed ``Shard(0)``
over a 1-D ``DeviceMesh`` (``shard_centers``), each rank holding about K / R rows, and the
gather of a batch's rows from their owners (``gather_centers``).

Rank r owns rows [r·c, (r + 1)·c) of the centers, c = ceil(K / R). A step is the header every
step shares first (``centerkern.distributed.shared``), which carries how many classes each rank
asks of each owner (the splits of both rounds), then two all-to-all rounds over the rank's own
batch:

1. the batch's classes go to their owners, who gather those rows (the gather kernel) and send
   them back: every sample reads its center as it was before the step;
2. the rank's (count, float64 sums) per class, exactly the data-parallel step's partials, go
   to the owners, who add them up in rank order and move their own rows.

Rank order is the order of the sparse exchange too, and the partials, the sums and the rule
are the same operations on the same numbers: the sharded step's centers equal the
data-parallel step's (exchange="sparse") bit for bit, on the CPU, and on the GPU with
deterministic=True (else each rank's own partial sums use float atomics). Each rank sends and
receives about 2·B·D values a step, whatever K; no rank holds more than its c rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .. import _api, _backends
from .._adapters import batch_classes
from .._api import CenterLossResult
from .._core import validation
from .._core.interop import check_writable
from .._core.rules import RULES, rule_coefficients
from .shared import (_DTYPES, _HEADER_SIZE, SHARDED, _added_in_rank_order, _agree, _collective_device, _is_sharded,
                     _like, _local_partials, _moved_rows, _require_process_group)

__all__ = ["gather_centers", "shard_centers"]


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
