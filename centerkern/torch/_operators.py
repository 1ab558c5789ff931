"""The center-loss kernels as torch operators, ``torch.ops.centerkern.*``, registered when
``centerkern.torch`` is imported.

Why operators: ``torch.compile`` and ``torch.export`` trace a model with fake tensors, which have
no memory for a kernel to read. A registered operator is one node of their graph, its output
shapes given by a fake implementation, its gradient by an autograd formula, and its in-place
writes declared in its schema, so that a compiled or exported model holds the step whole
(``fullgraph=True``, no graph break) and runs the real kernels when it runs.

The step returns the gradient its backward needs (the kernel computes it in the forward pass),
so no compiled backward can recompute ``features - centers[labels]`` from centers that the step
has moved since: what a center loss written as torch ops that moves a buffer gets wrong under
``torch.compile``.

::

    centerkern::gather_centers(Tensor centers, Tensor labels, str backend="auto") -> Tensor
    centerkern::scatter_sub_update_(Tensor(a!) centers, Tensor labels, Tensor updates,
                                    bool deterministic=False, str backend="auto") -> ()
    centerkern::center_loss_step_(Tensor features, Tensor labels, Tensor(a!) centers, float alpha,
                                  str rule, bool deterministic=False, str backend="auto",
                                  str? group=None) -> (Tensor loss, Tensor grad)
    centerkern::center_loss_step(Tensor features, Tensor labels, Tensor centers, float alpha,
                                 str rule, bool deterministic=False, str backend="auto",
                                 str? group=None) -> (Tensor loss, Tensor grad, Tensor grad_centers)
    centerkern::center_loss_step_out_(Tensor features, Tensor labels, Tensor(a!) centers,
                                      Tensor(b!) grad_out, float alpha, str rule,
                                      bool deterministic=False, str backend="auto") -> Tensor
    centerkern::attach_gradient(Tensor features, Tensor labels, Tensor loss, Tensor grad,
                                str rule) -> Tensor

* ``center_loss_step_`` is the step of the rules that move the centers (``facenet``, ``wen``): it
  writes them in place (a buffer; declared mutated) and returns the loss and the features'
  gradient. torch gives no autograd formula to an operator that mutates an input, so the loss
  becomes differentiable in ``features`` through ``attach_gradient``, which returns it again
  with ``grad`` as its backward (and the rule's second-order term).
* ``center_loss_step`` is rule ``pytorch``'s: the centers are read only (a parameter) and their
  gradient is returned. Differentiable in ``features`` and ``centers``.
* ``center_loss_step_out_`` writes the features' gradient into ``grad_out`` too (a loop that
  keeps one (B, D) buffer instead of allocating it every step); it returns the loss only and is
  not differentiable, since a gradient saved for a backward pass must not be overwritten by
  the next step. Rules ``facenet`` and ``wen``.
* ``gather_centers`` is differentiable in ``centers``; ``scatter_sub_update_`` is an update,
  not differentiable.

``group`` names a process group that ``group_key`` has recorded, for the data-parallel step
of ``centerkern.distributed.center_loss`` (``None``: one process). Operators take strings, not
process-group objects; the module records its group's name when it is given one (building it,
setting ``group``, unpickling it). The names are this process's own: a program exported with
``distributed=True`` runs in the process whose module recorded its group.

CPU tensors run the ``numba`` kernels (``backend="auto"``), CUDA tensors the ``cuda`` ones on
torch's current stream without waiting for the GPU (``sync=False``).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _api
from .._adapters.settings import dtype_name
from .._core import validation
from .._core.rules import RULES, moves_centers, rule_coefficients

__all__ = ["NAMESPACE", "OPERATORS", "gather", "group_key", "hold_for_backward", "loss_tensor",
           "refuse_inside_backward", "step", "step_gradients"]

NAMESPACE = "centerkern"
_KERNEL_DTYPES = (torch.float32, torch.float64)
_LIBRARY = torch.library.Library(NAMESPACE, "DEF")

# Process groups by the key the step operators take as ``group``.
_GROUPS: dict[str, Any] = {}
DEFAULT_GROUP = "default"


def group_key(group: Any) -> str:
    """The string an operator takes for ``group`` (a process group, a 1-D DeviceMesh, or None for
    the default group), recorded so that the operator finds the group again."""
    if group is None:
        return DEFAULT_GROUP
    if hasattr(group, "get_group"):  # a DeviceMesh: its (1-D) process group
        group = group.get_group()
    # the object's identity: the registry holds it, so its id is not reused while recorded
    key = f"{getattr(group, 'group_name', 'group')}@{id(group):x}"
    _GROUPS[key] = group
    return key


def _process_group(key: str) -> Any:
    if key == DEFAULT_GROUP:
        return None
    try:
        return _GROUPS[key]
    except KeyError:
        raise ValueError(
            f"centerkern: no process group recorded as {key!r} in this process (the names are this process's own: a "
            "program exported with a group runs where its module recorded it); record one with "
            "centerkern.torch._operators.group_key(group)"
        ) from None


def refuse_inside_backward(rule: str) -> None:
    """A step that moves its centers must not run again inside a backward pass (activation
    checkpointing recomputes forwards there), or the centers would move twice."""
    if moves_centers(rule) and torch._C._current_graph_task_id() != -1:
        raise RuntimeError(
            f"CenterLoss (rule {rule!r}) moves its centers in the forward pass, and this forward runs inside "
            "a backward pass: activation checkpointing (torch.utils.checkpoint with use_reentrant=True, or a "
            "non-reentrant checkpoint that recomputes past the module) would move them a second time. Call "
            "the module outside the checkpointed function, or use use_reentrant=False with the module last"
        )


def _sync(tensor: torch.Tensor) -> bool:
    # on the GPU the step is queued like any torch op: no wait for the label check (a bad label
    # is raised by the next call, or centerkern.cuda.check_errors()), which also lets a CUDA
    # graph capture it; host tensors ignore sync
    return not tensor.is_cuda


def loss_tensor(loss: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(loss, float):
        return torch.tensor(loss, dtype=like.dtype, device=like.device)
    return loss.to(like.dtype)  # a CUDA tensor already: no trip through the host


def _check_rule(rule: str, moving: bool, operator: str) -> None:
    validation.check_choice(rule, "rule", RULES)
    if moves_centers(rule) != moving:
        other = "center_loss_step_" if moves_centers(rule) else "center_loss_step"
        kind = "moves the centers" if moves_centers(rule) else "leaves the centers to an optimizer"
        raise ValueError(f"centerkern::{operator} does not take rule {rule!r}, which {kind}: call centerkern::{other}")


def step(alpha, rule, deterministic, backend, group, features, labels, centers, grad_out=None):
    """The step of the operators (a ``CenterLossResult``): ``centerkern.center_loss`` with
    ``out=centers``, or ``centerkern.distributed.center_loss`` when ``group`` names a group."""
    refuse_inside_backward(rule)
    # out=centers: facenet and wen write their update there in place; pytorch reads it only (its
    # update goes into grad_centers), so no rule copies the centers
    settings = {"rule": rule, "out": centers, "backend": backend, "deterministic": deterministic}
    if group is None:
        return _api.center_loss(features, labels, centers, alpha, grad_out=grad_out, sync=_sync(features), **settings)
    from .. import distributed

    return distributed.center_loss(features, labels, centers, alpha, group=_process_group(group), **settings)


# --- the operators' implementations (CPU and CUDA alike: the backend follows the tensors) ------


def gather(centers, labels, backend="auto"):
    return _api.gather_centers(centers, labels, backend=backend, sync=_sync(centers))


def _scatter_sub_update_(centers, labels, updates, deterministic=False, backend="auto"):
    _api.scatter_sub_update(centers, labels, updates, out=centers, backend=backend, deterministic=deterministic,
                            sync=_sync(centers))


def _center_loss_step_(features, labels, centers, alpha, rule, deterministic=False, backend="auto", group=None):
    _check_rule(rule, True, "center_loss_step_")
    result = step(alpha, rule, deterministic, backend, group, features, labels, centers)
    return loss_tensor(result.loss, features), result.grad


def _center_loss_step(features, labels, centers, alpha, rule, deterministic=False, backend="auto", group=None):
    _check_rule(rule, False, "center_loss_step")
    result = step(alpha, rule, deterministic, backend, group, features, labels, centers)
    return loss_tensor(result.loss, features), result.grad, result.grad_centers


def _center_loss_step_out_(features, labels, centers, grad_out, alpha, rule, deterministic=False, backend="auto"):
    _check_rule(rule, True, "center_loss_step_out_")
    result = step(alpha, rule, deterministic, backend, None, features, labels, centers, grad_out=grad_out)
    return loss_tensor(result.loss, features)


def _attach_gradient(features, labels, loss, grad, rule):
    return loss.clone()  # an operator's output never aliases its input


# --- fake implementations: shapes and dtypes only, checked as the kernels check them ----------


def _checked_metadata(centers: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None = None,
                      rows_name: str = "features", grad_out: torch.Tensor | None = None) -> None:
    """What the kernels check that a fake tensor carries (dtypes and shapes, not the labels'
    values), by the same checks, so that torch.compile and torch.export refuse bad input while
    tracing as eager does when it runs."""
    validation.check_float_matrix(centers, "centers", centers.dtype in _KERNEL_DTYPES, dtype_name)
    integer = not (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool)
    validation.check_label_dtype(labels, integer, dtype_name)
    if rows is None:
        return
    validation.check_float_matrix(rows, rows_name, rows.dtype in _KERNEL_DTYPES, dtype_name)
    validation.check_same_dtype(**{rows_name: rows, "centers": centers})
    validation.check_feature_size(rows, rows_name, centers)
    validation.check_label_count(labels, labels.numel(), rows.shape[0], rows_name)
    if grad_out is not None:
        validation.check_like(grad_out, "grad_out", rows, rows_name, dtype_name)


def _fake_gather_centers(centers, labels, backend="auto"):
    _checked_metadata(centers, labels)
    return centers.new_empty((labels.numel(), centers.shape[1]))


def _fake_scatter_sub_update_(centers, labels, updates, deterministic=False, backend="auto"):
    _checked_metadata(centers, labels, updates, "updates")


def _fake_center_loss_step_(features, labels, centers, alpha, rule, deterministic=False, backend="auto", group=None):
    _check_rule(rule, True, "center_loss_step_")
    _checked_metadata(centers, labels, features)
    return features.new_empty(()), features.new_empty(features.shape)


def _fake_center_loss_step(features, labels, centers, alpha, rule, deterministic=False, backend="auto", group=None):
    _check_rule(rule, False, "center_loss_step")
    _checked_metadata(centers, labels, features)
    return features.new_empty(()), features.new_empty(features.shape), centers.new_empty(centers.shape)


def _fake_center_loss_step_out_(features, labels, centers, grad_out, alpha, rule, deterministic=False, backend="auto"):
    _check_rule(rule, True, "center_loss_step_out_")
    _checked_metadata(centers, labels, features, grad_out=grad_out)
    return features.new_empty(())


def _fake_attach_gradient(features, labels, loss, grad, rule):
    return loss.new_empty(loss.shape)


# --- autograd -----------------------------------------------------------------------------------
#
# The kernel's gradients are the values. Held on ctx as attributes, not saved tensors: unpacking
# a saved tensor makes a non-reentrant checkpoint recompute the forward, which would move the
# centers again. For a gradient that is itself differentiated (create_graph=True), what the
# gradients depend on is added as a term whose value is zero and whose derivative is the rule's:
# with d_i = f_i - c_{y_i} and s the rule's grad scale, d grad_i / d f_i = s and
# d grad_i / d c_{y_i} = -s, through f - f.detach() (and c[y] - c[y].detach() for a trainable
# center), so that the numbers stay the kernel's.


def hold_for_backward(ctx, features, labels, centers, rule, grad, grad_centers) -> None:
    """What ``step_gradients`` reads: the kernel's gradients and, for a second-order term, the
    features, labels and the centers (None where they are moved in place, not differentiable)."""
    ctx.grad, ctx.grad_centers, ctx.features, ctx.labels = grad, grad_centers, features, labels
    ctx.centers = None if moves_centers(rule) else centers
    ctx.grad_scale = rule_coefficients(rule, 0.0, *features.shape).grad_scale


def _setup_step(ctx, inputs, output):
    features, labels, centers, _alpha, rule = inputs[:5]
    ctx.mark_non_differentiable(*output[1:])
    hold_for_backward(ctx, features, labels, centers, rule, output[1], output[2])


def step_gradients(ctx, grad_loss):
    """The gradients of (features, labels, centers) from what ``ctx`` holds: ``grad`` and
    ``grad_centers`` (None for a center moved in place), ``features``, ``labels``, ``centers``
    (None when not differentiable) and ``grad_scale``."""
    grad, grad_centers = ctx.grad, ctx.grad_centers
    if torch.is_grad_enabled():  # create_graph=True: the gradient will itself be differentiated
        grad, grad_centers = _with_second_order_terms(ctx, grad, grad_centers)
    grad_features = grad * grad_loss if ctx.needs_input_grad[0] else None
    wanted = grad_centers is not None and ctx.needs_input_grad[2]
    return grad_features, None, grad_centers * grad_loss if wanted else None


def _step_backward(ctx, grad_loss, *_output_grads):
    return step_gradients(ctx, grad_loss) + (None,) * 5


def _setup_attached(ctx, inputs, output):
    features, labels, _loss, grad, rule = inputs
    hold_for_backward(ctx, features, labels, None, rule, grad, None)


def _attached_backward(ctx, grad_loss):
    return step_gradients(ctx, grad_loss) + (None, None)


def _index(labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Labels as ``index_select`` and ``index_add`` want them: flat, int64, on ``like``'s device."""
    return labels.reshape(-1).to(device=like.device, dtype=torch.long)


def _with_second_order_terms(ctx, grad, grad_centers):
    features, centers = ctx.features, ctx.centers
    labels = _index(ctx.labels, features)
    tracked = features - features.detach()  # zero, with d/d features = 1
    if centers is not None:
        rows = centers.index_select(0, labels)
        tracked = tracked - (rows - rows.detach())
    tracked = torch.where(torch.isfinite(tracked), tracked, 0.0)  # inf - inf is not zero
    grad = grad + ctx.grad_scale * tracked
    if grad_centers is not None:
        grad_centers = grad_centers - ctx.grad_scale * torch.zeros_like(grad_centers).index_add(0, labels, tracked)
    return grad, grad_centers


def _setup_gather(ctx, inputs, output):
    centers, labels, _backend = inputs
    ctx.num_classes, ctx.labels = centers.shape[0], labels


def _gather_backward(ctx, grad_rows):
    labels = _index(ctx.labels, grad_rows)
    grad_centers = grad_rows.new_zeros((ctx.num_classes, grad_rows.shape[1])).index_add(0, labels, grad_rows)
    return grad_centers, None, None


# --- registration -------------------------------------------------------------------------------

OPERATORS = {
    "gather_centers": (
        "gather_centers(Tensor centers, Tensor labels, str backend='auto') -> Tensor",
        gather, _fake_gather_centers, (_gather_backward, _setup_gather),
    ),
    "scatter_sub_update_": (
        "scatter_sub_update_(Tensor(a!) centers, Tensor labels, Tensor updates, bool deterministic=False, "
        "str backend='auto') -> ()",
        _scatter_sub_update_, _fake_scatter_sub_update_, None,
    ),
    "center_loss_step_": (
        "center_loss_step_(Tensor features, Tensor labels, Tensor(a!) centers, float alpha, str rule, "
        "bool deterministic=False, str backend='auto', str? group=None) -> (Tensor loss, Tensor grad)",
        _center_loss_step_, _fake_center_loss_step_, None,
    ),
    "center_loss_step": (
        "center_loss_step(Tensor features, Tensor labels, Tensor centers, float alpha, str rule, "
        "bool deterministic=False, str backend='auto', str? group=None) -> (Tensor loss, Tensor grad, "
        "Tensor grad_centers)",
        _center_loss_step, _fake_center_loss_step, (_step_backward, _setup_step),
    ),
    "center_loss_step_out_": (
        "center_loss_step_out_(Tensor features, Tensor labels, Tensor(a!) centers, Tensor(b!) grad_out, "
        "float alpha, str rule, bool deterministic=False, str backend='auto') -> Tensor",
        _center_loss_step_out_, _fake_center_loss_step_out_, None,
    ),
    "attach_gradient": (
        "attach_gradient(Tensor features, Tensor labels, Tensor loss, Tensor grad, str rule) -> Tensor",
        _attach_gradient, _fake_attach_gradient, (_attached_backward, _setup_attached),
    ),
}

for _name, (_schema, _implementation, _fake, _autograd) in OPERATORS.items():
    _LIBRARY.define(_schema)
    _qualified = f"{NAMESPACE}::{_name}"
    for _device in ("CPU", "CUDA"):
        _LIBRARY.impl(_name, _implementation, _device)
    torch.library.register_fake(_qualified, _fake, lib=_LIBRARY)
    if _autograd is None:  # no gradient: its outputs do not require one
        _LIBRARY.impl(_name, torch.library.fallthrough_kernel, "Autograd")
    else:
        torch.library.register_autograd(_qualified, _autograd[0], setup_context=_autograd[1], lib=_LIBRARY)
