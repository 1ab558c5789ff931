"""Center loss as a PyTorch module: ``centerkern.torch.CenterLoss``.

::

    center_loss = CenterLoss(num_classes=10, feat_dim=2, alpha=0.5, rule="wen")
    loss = cross_entropy(logits, labels) + weight * center_loss(embeddings, labels)
    loss.backward()          # into the embeddings; wen and facenet centers moved already
    optimizer.step()

The rules keep their sources' meaning of the centers (see ``centerkern.center_loss``):

* ``facenet`` and ``wen``: the centers are a buffer (saved in ``state_dict``, not a parameter).
  In training mode every call moves them in place, with no copy of the (num_classes, feat_dim)
  tensor (the kernels write them; with ``distributed=True``, the rows the ranks' batches touched
  are written after the exchange). In eval mode they are left as they are.
* ``pytorch``: the centers are an ``nn.Parameter``; ``backward`` gives them ``grad_centers``
  and the caller's optimizer moves them (KaiyangZhou/pytorch-center-loss trains them with SGD,
  learning rate 0.5).

The step is a set of registered operators, ``torch.ops.centerkern.*`` (``_operators``), with fake
implementations and autograd formulas, so that ``torch.compile(model, fullgraph=True)`` holds it
with no graph break and ``torch.export`` keeps the center update. The loss backpropagates into
the features through the kernel's own gradient, computed in the forward pass: no (B, D) graph of
gathers and subtractions is recorded, and no compiled backward can recompute the offsets from
centers the step has moved. In eager mode on plain tensors the module calls the operators'
implementation directly, from an autograd Function with the same formulas (the dispatcher's
round trip would cost more than the rest of the step's glue). CPU tensors go to the ``numba``
kernels and CUDA tensors to the ``cuda`` ones, zero-copy both ways.
On CUDA tensors the step runs on torch's current stream, with memory from torch's caching
allocator, and never waits for the GPU (``sync=False``: a bad label is raised by the next call or
by ``centerkern.cuda.check_errors()``), so a training step holding it can be captured in a CUDA
graph (``torch.cuda.graph``) and replayed.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import torch
from torch import nn

from .. import _backends
from .._adapters.settings import HALF_PRECISION
from .._core.rules import RULES, moves_centers, rule_coefficients
from .._core.validation import check_same_dtype, check_alpha, check_choice
from . import _operators
from .codebooks import CodebookOutput, EMACodebook

__all__ = ["CenterLoss", "CodebookOutput", "EMACodebook"]

# _adapters.settings.computed_dtype's rule, as torch dtypes: a set that torch.compile reads as a
# constant, where the function's NumPy dtype lookup cannot be traced
_HALF_PRECISION = frozenset(getattr(torch, name) for name in HALF_PRECISION)
_PLAIN_CENTERS = (torch.Tensor, nn.Parameter)  # a buffer, or rule pytorch's parameter


class _DirectStep(torch.autograd.Function):
    """The step without the dispatcher: ``step``, the operators' own implementation (or the
    sharded step, whose DTensor centers the operators do not take), called from an autograd
    Function whose backward is the operators' formula.

    Why: in eager mode on plain tensors, the dispatcher's round trip into Python and the
    operators' autograd wrapper cost more than the rest of the step at a training size
    (``benchmarks/compare_revisions.py --level torch``), and nothing is there to see the
    operators; under torch.compile and torch.export, for tensor subclasses and under dispatch
    modes, the module calls the operators."""

    @staticmethod
    def forward(ctx, features, labels, centers, rule, step):
        result = step(features, labels, centers)
        # held as attributes, not saved tensors (see _operators: a checkpoint would recompute the step)
        _operators.hold_for_backward(ctx, features, labels, centers, rule, result.grad, result.grad_centers)
        return _operators.loss_tensor(result.loss, features)

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled() and ctx.centers is not None and _is_distributed_tensor(ctx.centers):
            raise RuntimeError(
                "the second-order term of sharded centers is not supported: it needs each sample's center "
                "as a differentiable gather across ranks; use replicated centers for create_graph=True"
            )
        return _operators.step_gradients(ctx, grad_loss) + (None, None)


def _is_distributed_tensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _through_operators(features: torch.Tensor, centers: torch.Tensor) -> bool:
    """Whether the step goes through the dispatcher: when torch.compile or torch.export traces
    it, for tensor subclasses (fake tensors, DTensors), and under a dispatch mode (make_fx,
    FlopCounterMode), which would not see a direct call."""
    return (torch.compiler.is_compiling() or type(features) is not torch.Tensor
            or type(centers) not in _PLAIN_CENTERS or torch._C._len_torch_dispatch_stack() > 0)


def _refuse_graph_transforms() -> None:
    """Refuse, before anything moves, the transforms that cannot run the kernels: they would
    see wrapped tensors, or record this batch's values as constants."""
    functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
    if functorch_active():
        raise RuntimeError(
            "centerkern.torch.CenterLoss cannot run under torch.func transforms (grad, vmap, jacrev, jvp, ...): its "
            "kernels read the tensors' memory, which these transforms wrap, and rules facenet and wen move the centers "
            "in the forward. Take gradients with loss.backward() or torch.autograd.grad (create_graph=True for "
            "second order), and call the module once per problem for per-sample work"
        )
    if torch.jit.is_tracing():
        raise RuntimeError(
            "centerkern.torch.CenterLoss cannot be traced with torch.jit.trace: its kernels run outside the graph a "
            "trace records, which would replay this batch's values (and the trace's own check runs the forward again, "
            "moving facenet's and wen's centers each time). Trace the model without the module and add the center "
            "loss in Python, or use torch.compile or torch.export, which hold its operators"
        )


# Where torch.compiler.disable takes a reason (newer torch releases), it is what
# torch.compile(fullgraph=True) shows when it refuses the graph break; older releases show their own.
COMPILE_REFUSAL_SAYS_WHY = "reason" in inspect.signature(torch.compiler.disable).parameters


def _compiler_disabled(reason: str):
    """``torch.compiler.disable`` as a decorator, with ``reason`` where this torch takes one."""
    return torch.compiler.disable(reason=reason) if COMPILE_REFUSAL_SAYS_WHY else torch.compiler.disable


class CenterLoss(nn.Module):
    """Center loss (Wen et al., ECCV 2016) with one of the published rules.

    ``module(features, labels)`` returns the loss of the batch (``forward``). The centers start
    at zero for ``facenet`` (as facenet's ``constant_initializer(0)``) and ``wen``, and from a
    standard normal for ``pytorch`` (as pytorch-center-loss's ``randn``).

    Parameters
    ----------
    num_classes, feat_dim : int
        K and D: the centers are a (num_classes, feat_dim) tensor, ``self.centers``.
    alpha : float
        The rule's alpha: the retention for ``facenet`` (step 1 - alpha), the step for ``wen``;
        unused by ``pytorch``.
    rule : {"facenet", "wen", "pytorch"}
        The update rule (see ``centerkern.center_loss``). ``facenet`` and ``wen`` keep the
        centers as a buffer that the module moves; ``pytorch`` makes them an ``nn.Parameter``
        that the caller's optimizer moves.
    backend : {"auto", "numpy", "numba", "cuda"}
        ``auto`` picks ``cuda`` for CUDA tensors and ``numba`` otherwise.
    deterministic : bool
        Bitwise-identical center updates from run to run on the GPU too (see ``center_loss``).
    group : torch.distributed process group or 1-D DeviceMesh, optional
        Distributed training: the centers move as if one process had seen every rank's batch
        (``centerkern.distributed.center_loss``, which takes the same ``group=``). Giving one
        implies ``distributed=True``; ``None`` with ``distributed=True`` is the default group.
    distributed : bool
        Synchronise the center updates over ``group`` (the default group when None).
    placement : {"replicated", "sharded"}
        With ``distributed=True``: ``replicated`` keeps the whole (K, D) centers on every rank,
        identical everywhere (a plain tensor); ``sharded`` gives each rank its block of about
        K / R rows, the centers a ``DTensor`` placed ``Shard(0)`` (``shard_centers``), for K x D
        too large for one rank. Sharded centers are saved and loaded by
        ``torch.distributed.checkpoint`` into any number of ranks; every rank must call the
        module in evaluation too (each sample's center is fetched from its owner).
    device, dtype : optional
        Where the centers live and their dtype (float32 by default).
    process_group : optional
        The former name of ``group``, still taken, with a ``DeprecationWarning``.

    Raises
    ------
    ValueError
        For an unknown ``rule``, ``backend`` or ``placement``, an ``alpha`` that is not finite,
        or ``placement="sharded"`` without ``distributed=True`` (or a ``group``).
    TypeError
        For an ``alpha`` that is not a real number, or both ``group`` and ``process_group``
        given.
    RuntimeError
        For ``placement="sharded"`` outside a ``torch.distributed`` process group.

    Warns
    -----
    DeprecationWarning
        When ``process_group=`` is given: pass ``group=`` instead.

    Notes
    -----
    With ``torch.nn.parallel.DistributedDataParallel`` around a model holding this module, pass
    ``broadcast_buffers=False``: by default DDP copies rank 0's buffers over the others' at every
    forward, which costs a K x D broadcast per step and, without ``distributed=True``, would
    discard the other ranks' center updates. With sharded centers and rule ``pytorch``, leave the
    centers out of DDP's gradient all-reduce (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``):
    the module gives each rank the averaged ``grad_centers`` of its own rows already.

    Examples
    --------
    >>> import torch
    >>> from centerkern.torch import CenterLoss
    >>> center_loss = CenterLoss(num_classes=3, feat_dim=2, alpha=0.5, rule="wen")
    >>> center_loss
    CenterLoss(num_classes=3, feat_dim=2, alpha=0.5, rule='wen', backend='auto')
    >>> features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 2.0]], requires_grad=True)
    >>> labels = torch.tensor([0, 0, 2])

    A training step: the loss backpropagates into the features, and the centers (a buffer)
    have moved already. Class 0's two samples add up; class 1, absent from the batch, stays.

    >>> loss = center_loss(features, labels)
    >>> round(loss.item(), 4)
    5.6667
    >>> loss.backward()
    >>> features.grad
    tensor([[0.3333, 0.6667],
            [1.0000, 1.3333],
            [0.0000, 0.6667]])
    >>> center_loss.centers
    tensor([[0.6667, 1.0000],
            [0.0000, 0.0000],
            [0.0000, 0.5000]])

    In evaluation mode the centers stay where they are:

    >>> _ = center_loss.eval()
    >>> round(center_loss(features, labels).item(), 4)
    2.9676
    >>> center_loss.centers[0]
    tensor([0.6667, 1.0000])

    Rule ``pytorch`` makes the centers a parameter, which ``backward`` gives a gradient for
    the caller's optimizer:

    >>> _ = torch.manual_seed(0)
    >>> trainable = CenterLoss(num_classes=3, feat_dim=2, rule="pytorch")
    >>> optimizer = torch.optim.SGD(trainable.parameters(), lr=0.5)
    >>> trainable(features.detach(), labels).backward()
    >>> trainable.centers.grad.shape
    torch.Size([3, 2])
    >>> optimizer.step()
    """

    def __init__(
        self, num_classes: int, feat_dim: int, alpha: float = 0.5, rule: str = "facenet",
        backend: str = "auto", *, deterministic: bool = False, group: Any = None,
        distributed: bool = False, placement: str = "replicated", device: Any = None,
        dtype: torch.dtype | None = None, process_group: Any = None,
    ):
        super().__init__()
        if process_group is not None:
            if group is not None:
                raise TypeError("CenterLoss got both group= and process_group=, its former name: pass group= only")
            # the name centerkern.distributed.center_loss takes, so that both spell the setting alike
            warnings.warn("CenterLoss(process_group=...) is deprecated: pass group=", DeprecationWarning, stacklevel=2)
            group = process_group
        self.rule = check_choice(rule, "rule", RULES)
        self.alpha = check_alpha(alpha)
        self.backend = check_choice(backend, "backend", _backends.CHOICES)
        self.deterministic = bool(deterministic)
        self.num_classes, self.feat_dim = int(num_classes), int(feat_dim)
        self.group = group
        self.distributed = bool(distributed) or group is not None
        self.placement = check_choice(placement, "placement", ("replicated", "sharded"))
        if self.placement == "sharded" and not self.distributed:
            raise ValueError("placement='sharded' spreads the centers over ranks: it needs distributed=True")
        factory = {"device": device, "dtype": dtype or torch.float32}
        if self.placement == "sharded":
            from ..distributed import shard_centers

            # trainable centers: normal values, the same on any number of ranks for one seed
            centers = shard_centers((self.num_classes, self.feat_dim), group,
                                    init="zeros" if moves_centers(self.rule) else "normal", **factory)
        elif moves_centers(self.rule):
            centers = torch.zeros(self.num_classes, self.feat_dim, **factory)
        else:
            centers = torch.randn(self.num_classes, self.feat_dim, **factory)
        if moves_centers(self.rule):
            self.register_buffer("centers", centers)
        else:
            self.centers = nn.Parameter(centers)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of the batch (a 0-d tensor of the centers' dtype) that backpropagates into
        ``features`` (and into the centers for rule ``pytorch``). In training mode, rules
        ``facenet`` and ``wen`` also move the centers.

        Called as ``module(features, labels)``.

        Parameters
        ----------
        features : torch.Tensor
            The batch's embeddings, shape (B, D), of the centers' dtype (float16 and bfloat16
            features, as autocast makes them, are computed in the centers' dtype), on the
            centers' device.
        labels : torch.Tensor
            Integer tensor holding B values in [0, num_classes), any shape (flattened).

        Returns
        -------
        torch.Tensor
            The loss, a 0-d tensor of the centers' dtype.

        Raises
        ------
        IndexError
            For a label outside [0, num_classes). On CUDA tensors the step does not wait for
            the check: the error is raised by the next call or by
            ``centerkern.cuda.check_errors()``.
        TypeError
            For features of another dtype than the centers', or labels that are not integers.
        ValueError
            For features whose shape does not match the labels and the centers.
        RuntimeError
            Under ``torch.func`` transforms or ``torch.jit.trace``, and for rules ``facenet``
            and ``wen`` in training mode inside a backward pass (activation checkpointing that
            recomputes the module's forward).
        PeerInputError
            With ``distributed=True``: on every rank when another rank's input fails validation
            or the ranks disagree on the step (``centerkern.distributed.center_loss``).

        Examples
        --------
        >>> import torch
        >>> from centerkern.torch import CenterLoss
        >>> center_loss = CenterLoss(num_classes=3, feat_dim=2, alpha=0.5, rule="facenet")
        >>> features = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
        >>> loss = center_loss(features, torch.tensor([1, 1]))
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
        >>> round(loss.item(), 4)
        7.5
        >>> loss.backward()
        >>> features.grad
        tensor([[0.5000, 1.0000],
                [1.5000, 2.0000]])
        >>> center_loss.centers[1]  # (1 - alpha) times the sum of both samples' offsets
        tensor([2., 3.])
        """
        if not torch.compiler.is_compiling():  # a compiled graph holds the operators, with no transform around
            _refuse_graph_transforms()
        if features.dtype in _HALF_PRECISION:  # computed in the centers' dtype (see computed_dtype)
            features = features.to(self.centers.dtype)
        if self.placement == "sharded":
            return self._sharded_forward(features, labels)
        direct = not _through_operators(features, self.centers)
        if not self._needs_kernel_step(features):
            check_same_dtype(features=features, centers=self.centers)
            gather = _operators.gather if direct else torch.ops.centerkern.gather_centers
            return self._loss_without_update(features, labels, gather(self.centers, labels, self.backend))
        settings = (self.alpha, self.rule, self.deterministic, self.backend,
                    self._operator_group if self.distributed else None)
        if direct:
            step = functools.partial(_operators.step, *settings)
            return _DirectStep.apply(features, labels, self.centers, self.rule, step)
        if moves_centers(self.rule):
            loss, grad = torch.ops.centerkern.center_loss_step_(features, labels, self.centers, *settings)
            # the loss, differentiable in the features through the kernel's gradient
            return torch.ops.centerkern.attach_gradient(features, labels, loss, grad, self.rule)
        return torch.ops.centerkern.center_loss_step(features, labels, self.centers, *settings)[0]

    def _needs_kernel_step(self, features: torch.Tensor) -> bool:
        if moves_centers(self.rule):
            return self.training
        # pytorch: the kernel step is what computes grad_centers
        return torch.is_grad_enabled() and (features.requires_grad or self.centers.requires_grad)

    @_compiler_disabled(
        "centerkern.torch.CenterLoss(placement='sharded') runs behind a graph break: its centers are a DTensor, "
        "which the centerkern operators do not take. Compile without fullgraph=True (torch.compile runs the module "
        "eagerly, the rest compiled), or use placement='replicated'")
    def _sharded_forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self._needs_kernel_step(features):
            from ..distributed import gather_centers

            # every rank joins the gather before anything of its own can raise (a peer would wait)
            gathered = gather_centers(self.centers, labels, backend=self.backend)
            check_same_dtype(features=features, centers=self.centers)
            return self._loss_without_update(features, labels, gathered)
        from ..distributed import center_loss

        def step(features, labels, centers):
            _operators.refuse_inside_backward(self.rule)
            return center_loss(features, labels, centers, self.alpha, rule=self.rule, out=centers, backend=self.backend,
                               deterministic=self.deterministic, group=self.group)

        return _DirectStep.apply(features, labels, self.centers, self.rule, step)

    @property
    def group(self) -> Any:
        """The process group (or 1-D DeviceMesh) of a distributed step; None is the default group."""
        return self._group

    @group.setter
    def group(self, group: Any) -> None:
        self._group = group
        # what the operators take: a name (operators take no process-group objects), decided here
        # once rather than in a forward that torch.compile traces
        self._operator_group = _operators.group_key(group)

    @property
    def process_group(self) -> Any:
        """The former name of ``group``, kept readable (and writable) for code that used it."""
        return self.group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        self.group = group

    def __setstate__(self, state: dict) -> None:
        # a module pickled whole before group was a property kept it as group (or, earlier, as
        # process_group); the operators' name for it is recorded again in this process
        group = state.pop("group", state.pop("process_group", state.get("_group")))
        super().__setstate__(state)
        self.group = group

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script`` on every module of what it scripts: refused here, in
        centerkern's words rather than TorchScript's about this module's Python."""
        raise RuntimeError(
            "centerkern.torch.CenterLoss cannot be scripted with torch.jit.script: its kernels are Python calls on the "
            "tensors' memory. Script the rest of the model and call the module from Python, or use torch.compile or "
            "torch.export, which hold its operators"
        )

    def _loss_without_update(self, features: torch.Tensor, labels: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
        """Evaluation: the same loss from the batch's ``gathered`` centers (the kernel gather
        reads only the batch's B rows: the centers neither moved nor copied), differentiable by
        autograd. The dtypes are checked already."""
        if features.shape != gathered.shape:
            raise ValueError(
                f"features of shape {tuple(features.shape)} do not match {labels.numel()} labels "
                f"and centers of shape {tuple(self.centers.shape)}"
            )
        coefficients = rule_coefficients(self.rule, self.alpha, features.shape[0], features.shape[1])
        squares = (features - gathered).pow(2).sum(dtype=torch.float64)
        return (coefficients.loss_scale * squares).to(features.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, alpha={self.alpha}, "
            f"rule={self.rule!r}, backend={self.backend!r}"
            + (", distributed=True" if self.distributed else "")
            + (", placement='sharded'" if self.placement == "sharded" else "")
        )
