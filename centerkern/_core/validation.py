"""Every check of SPEC.md's error table, in one place, before any backend runs.

The public functions call ``validate_*`` here first. A backend receives checked arrays only:
floating matrices of one dtype, labels as a flat int64 vector with every value in range, an
``out`` that may be written, and no input that overlaps the array it writes. Nothing here
writes to a caller's array, so an exception leaves every caller array as it was.

How arrays are inspected depends on where they live: ``HostArrays`` below for the CPU backends,
and the CUDA backend's own object of the same shape for device arrays, so that the label range
check runs where the labels are.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import label_out_of_range
from .interop import FLOAT_DTYPES, check_writable, framework_of, is_device_array, torch_host_view
from .rules import RULES



def check_choice(value: Any, what: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices are {', '.join(map(repr, choices))}")
    return value


#: ``check_alpha``'s message for an alpha that is not finite, ``{}`` for its repr (the XLA
#: handlers and TensorFlow's data-parallel step, which see a traced alpha, write it too).
ALPHA_NOT_FINITE = "alpha must be finite, got {}"


def check_alpha(alpha: Any) -> float:
    if isinstance(alpha, np.ndarray) and alpha.ndim == 0:
        alpha = alpha[()]
    # bool is an int to Python, but an alpha of True is surely a mistake
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number, got {alpha!r} of type {type(alpha).__name__}")
    try:
        value = float(alpha)
    except OverflowError:  # an int beyond float range, 10**400
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(ALPHA_NOT_FINITE.format(repr(alpha)))
    return value


class HostArrays:
    """Conversion and inspection of arrays that live in host memory, and their allocation by the
    host backend that computes on them (``zeros``: the numba backend fills large arrays on every
    core).

    The CUDA backend's ``DeviceArrays`` has the same methods for device arrays."""

    name = "host"

    def __init__(self, zeros: Callable[[tuple[int, ...], Any], np.ndarray] = np.zeros):
        self.zeros = zeros

    @staticmethod
    def asarray(x: Any, what: str) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        if isinstance(x, (list, tuple)):
            return np.asarray(x)
        if framework_of(x) == "torch":
            # a CPU tensor's own view, so that out= writes into it; the tensors torch refuses one
            # (CUDA, bfloat16, requiring grad) go on to the paths below, which say what is wrong
            view = torch_host_view(x)
            if view is not None:
                return view
        if hasattr(x, "__dlpack__"):
            # DLPack: zero-copy, and writable where producer and NumPy speak versioned DLPack
            # (NumPy 2.1 and newer), so that out= writes into the caller's memory
            try:
                return np.from_dlpack(x)
            except (BufferError, TypeError, RuntimeError, ValueError):
                pass
        try:
            return np.asarray(x)
        except Exception as error:  # the object's own __array__ failed: say which input it was
            raise TypeError(f"{what} of type {type(x).__name__} cannot be read as an array: {error}") from error

    @staticmethod
    def flat_labels(labels: np.ndarray) -> np.ndarray:
        return labels.reshape(-1)

    @staticmethod
    def first_out_of_range(labels: np.ndarray, num_classes: int) -> tuple[int, int] | None:
        """(position, value) of the first label outside [0, num_classes), or None."""
        if labels.size == 0 or (labels.min() >= 0 and labels.max() < num_classes):  # the common case
            return None
        position = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
        return position, int(labels[position])

    @staticmethod
    def as_label_vector(labels: np.ndarray) -> np.ndarray:
        # values are already known to lie in [0, K), so the cast cannot wrap
        return np.ascontiguousarray(labels, dtype=np.int64)

    @staticmethod
    def contiguous(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x)

    @staticmethod
    def is_writable(x: np.ndarray) -> bool:
        return bool(x.flags.writeable)

    @staticmethod
    def strides(x: np.ndarray) -> tuple[int, ...]:
        return x.strides

    @staticmethod
    def same_memory(a: np.ndarray, b: np.ndarray) -> bool:
        return (
            a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape
            and a.strides == b.strides
        )

    @staticmethod
    def may_share_memory(a: np.ndarray, b: np.ndarray) -> bool:
        return bool(np.may_share_memory(a, b))

    @staticmethod
    def holds(x: Any) -> bool:
        return not is_device_array(x)

    @staticmethod
    def copy(x: np.ndarray) -> np.ndarray:
        return np.array(x, order="C", copy=True)

    @staticmethod
    def empty(shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

def _float_matrix(x: Any, what: str, arrays) -> Any:
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
        if x.dtype.kind in "iu":
            x = x.astype(np.float64)  # a Python list of numbers carries no dtype of its own
    if "bfloat16" in str(getattr(x, "dtype", "")):  # no NumPy dtype, so no array to read: say so first
        raise TypeError(f"{what} must be float32 or float64, got dtype bfloat16")
    layout = str(getattr(x, "layout", "torch.strided"))
    if layout != "torch.strided":  # a sparse torch tensor: no strides to read
        raise TypeError(f"{what} must be a dense array, got a {layout} tensor")
    array = arrays.asarray(x, what)
    check_float_matrix(array, what, array.dtype in FLOAT_DTYPES)
    return array


# The checks below read an array's metadata only (dtype, shape), so that what carries no values
# (torch's fake tensors, while torch.compile and torch.export trace) is refused in the same
# words. ``describe`` writes a dtype as the message shows it.


def check_float_matrix(array: Any, what: str, computable: bool, describe=str) -> None:
    """``array`` as the kernels compute on it: ``computable`` (float32 or float64) and 2-D."""
    if not computable:
        raise TypeError(f"{what} must be float32 or float64, got dtype {describe(array.dtype)}")
    if len(array.shape) != 2:
        raise ValueError(f"{what} must be 2-D, got shape {tuple(array.shape)}")


def check_label_dtype(labels: Any, integer: bool, describe=str) -> None:
    if not integer:
        raise TypeError(f"labels must have an integer dtype (not bool), got dtype {describe(labels.dtype)}")


def check_label_count(labels: Any, count: int, batch_size: int, batch_source: str) -> None:
    if count != batch_size:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} hold {count} values, but {batch_source} has {batch_size} rows"
        )


def check_like(target: Any, name: str, like: Any, like_name: str, describe=str) -> None:
    """``target`` (an ``out`` or ``grad_out``) shaped and typed as ``like``, whose place it takes."""
    if target.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name}: {name} {describe(target.dtype)}, "
                        f"{like_name} {describe(like.dtype)}")
    if tuple(target.shape) != tuple(like.shape):
        raise ValueError(
            f"{name} must have the shape of {like_name}: {name} {tuple(target.shape)}, {like_name} {tuple(like.shape)}"
        )


def check_same_dtype(**named) -> None:
    dtypes = {name: array.dtype for name, array in named.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"dtypes must match (no silent cast): {listed}")


def check_feature_size(rows, rows_name: str, centers) -> None:
    if rows.shape[1] != centers.shape[1]:
        raise ValueError(
            f"{rows_name} of shape {tuple(rows.shape)} and centers of shape {tuple(centers.shape)} "
            "must have the same number of columns D"
        )


def flat_labels(labels: Any, batch_size: int | None, arrays, batch_source: str) -> Any:
    """Labels (or codes) as a flat vector of ``arrays``, their dtype and count checked; their
    values are checked by the caller, where they are (host or device)."""
    if isinstance(labels, (list, tuple)):
        labels = np.asarray(labels)
        if labels.size == 0:
            labels = labels.astype(np.int64)  # [] is float64 to NumPy, but means "no labels" here
    array = arrays.asarray(labels, "labels")
    check_label_dtype(array, array.dtype.kind in "iu")
    if batch_size is not None:
        check_label_count(array, int(array.size), batch_size, batch_source)
    return arrays.flat_labels(array)


def _labels(
    labels: Any, batch_size: int | None, num_classes: int, arrays, batch_source: str, first_position: int = 0
) -> Any:
    flat = flat_labels(labels, batch_size, arrays, batch_source)
    bad = arrays.first_out_of_range(flat, num_classes)
    if bad is not None:
        position, value = bad
        raise label_out_of_range(first_position + position, value, num_classes)
    return arrays.as_label_vector(flat)


def overlaps_itself(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool:
    """Whether two elements of an array share memory (a broadcast row stride of 0, or strides
    smaller than the extent of the dimension inside them): such an array cannot be written."""
    if 0 in shape:
        return False  # no elements, nothing to share
    extent = itemsize
    for stride, length in sorted((abs(s), n) for s, n in zip(strides, shape) if n > 1):
        if stride < extent:
            return True
        extent = stride * (length - 1) + extent
    return False


def check_labels(
    labels: Any, batch_size: int, num_classes: int, batch_source: str, first_position: int = 0
) -> np.ndarray:
    """Host labels as a flat int64 vector, checked as every entry point checks them. A bad
    label's position is reported counting from ``first_position`` (a chunk's place in the whole)."""
    return _labels(labels, batch_size, num_classes, HostArrays, batch_source, first_position)


def _writable_target(target: Any, name: str, like: Any, like_name: str, arrays) -> Any:
    """A caller's array that a call will write (``out``, ``grad_out``): checked to take the
    place of a fresh array shaped and typed as ``like``."""
    if isinstance(target, (list, tuple)):
        raise TypeError(f"{name} must be an array, got a " + type(target).__name__)
    check_writable(target)
    if not arrays.holds(target):
        raise ValueError(f"{name} must live in {arrays.name} memory, where this backend computes")
    checked = arrays.asarray(target, name)
    check_like(checked, name, like, like_name)
    if not arrays.is_writable(checked):
        raise ValueError(f"{name} is read-only; pass a writable array or {name}=None")
    if overlaps_itself(tuple(checked.shape), arrays.strides(checked), checked.dtype.itemsize):
        raise ValueError(
            f"{name} overlaps itself (strides {tuple(arrays.strides(checked))} for shape {tuple(checked.shape)}): "
            f"some of its elements share memory; pass an array that owns each element, or {name}=None"
        )
    return checked


def _grad_out(grad_out: Any, arrays, **inputs) -> Any:
    """The checked ``grad_out``, which may overlap no input: the grad is written while they are read."""
    if grad_out is None:
        return None
    checked = _writable_target(grad_out, "grad_out", inputs["features"], "features", arrays)
    for name, value in inputs.items():
        if value is not None and arrays.may_share_memory(checked, value):
            raise ValueError(f"grad_out overlaps {name}; pass a buffer of its own, or grad_out=None")
    return checked


def _read_before_write(arrays, target, **inputs):
    """Copy every input that shares memory with ``target``: results are as if all inputs were
    read before the first write, and a parallel kernel never reads memory another thread writes."""
    return tuple(
        arrays.copy(value) if arrays.may_share_memory(value, target) else value for value in inputs.values()
    )


@dataclass
class GatherInputs:
    centers: Any
    labels: Any


@dataclass
class ScatterInputs:
    centers: Any
    labels: Any
    updates: Any
    out: Any  # None, or the caller's array to write (it may be centers itself)
    out_is_centers: bool


@dataclass
class CenterLossInputs:
    features: Any
    labels: Any
    centers: Any
    alpha: float
    rule: str
    out: Any
    out_is_centers: bool
    grad_out: Any = None  # None, or the caller's (B, D) array for the grad


# --------------------------------------------------------------------------- plain NumPy inputs
#
# A training loop on the CPU calls with the same kind of arrays every step: C-contiguous NumPy
# arrays of the expected dtypes, out=centers. For them the full validation above costs more than
# the step at small sizes (tens of microseconds of Python against a kernel of tens), so they are
# recognised by a few attribute reads instead, and the label range check is left to the numba
# kernel, which makes it in its sort before anything is written and raises the same IndexError.
# Anything else (a list, another framework's array, a view, an overlap, an empty batch, a bad
# value) returns None here and takes the full validation, whose messages are SPEC's.

_PLAIN_LABEL_DTYPE = np.dtype(np.int64)


def _plain_matrix(x: Any) -> bool:
    return type(x) is np.ndarray and x.ndim == 2 and x.dtype in FLOAT_DTYPES and x.flags.c_contiguous and x.size > 0


def _plain_labels(labels: Any, batch_size: int) -> bool:
    return (type(labels) is np.ndarray and labels.dtype == _PLAIN_LABEL_DTYPE and labels.size == batch_size
            and labels.flags.c_contiguous)


def _shares_no_memory(target: np.ndarray, inputs: tuple) -> bool:
    for x in inputs:  # a loop, not any(...): a generator costs this hot path half a microsecond
        if np.may_share_memory(target, x):
            return False
    return True


def _plain_out(out: Any, centers: np.ndarray, *inputs: np.ndarray) -> bool:
    """out=None, or out=centers (the same object) that can be written and overlaps no input."""
    return out is None or (out is centers and centers.flags.writeable and _shares_no_memory(centers, inputs))


def _plain_grad_out(grad_out: Any, features: np.ndarray, *inputs: np.ndarray) -> bool:
    return grad_out is None or (
        type(grad_out) is np.ndarray and grad_out.dtype == features.dtype and grad_out.shape == features.shape
        and grad_out.flags.c_contiguous and grad_out.flags.writeable
        and _shares_no_memory(grad_out, (features, *inputs))
    )


def plain_center_loss(features, labels, centers, out, grad_out, alpha, rule) -> CenterLossInputs | None:
    """``center_loss``'s inputs checked in a few attribute reads (labels excepted, see above),
    or None where they need the full ``validate_center_loss``."""
    if not (_plain_matrix(features) and _plain_matrix(centers) and features.dtype == centers.dtype
            and features.shape[1] == centers.shape[1] and _plain_labels(labels, features.shape[0])
            and rule in RULES and isinstance(alpha, float) and math.isfinite(alpha)
            and _plain_out(out, centers, features, labels) and _plain_grad_out(grad_out, features, labels, centers)):
        return None
    return CenterLossInputs(features, labels.reshape(-1), centers, float(alpha), rule, out, out is not None, grad_out)


def plain_scatter(centers, labels, updates, out) -> ScatterInputs | None:
    """``scatter_sub_update``'s inputs checked in a few attribute reads (labels excepted, see
    above), or None where they need the full ``validate_scatter``."""
    if not (_plain_matrix(centers) and _plain_matrix(updates) and updates.dtype == centers.dtype
            and updates.shape[1] == centers.shape[1] and _plain_labels(labels, updates.shape[0])
            and _plain_out(out, centers, updates, labels)):
        return None
    return ScatterInputs(centers, labels.reshape(-1), updates, out, out is not None)


# --------------------------------------------------------------------------- plain device inputs
#
# The same for device arrays, whose step is a few kernels of microseconds each: the host time
# of the full validation would be most of the call. ``DeviceArrays.plain`` (the cuda backend)
# makes views of plain device arrays of one framework on one device, and these checks read
# their metadata. Anything else (a strided output, an overlap, an empty batch, N-D labels, a
# bad dtype) returns None and takes the full validation, whose messages are SPEC's. The label
# range check runs on the device either way.


def _plain_device_matrix(x: Any) -> bool:
    return len(x.shape) == 2 and x.dtype in FLOAT_DTYPES and x.size > 0


def _plain_device_labels(labels: Any, batch_size: int) -> bool:
    return len(labels.shape) == 1 and labels.dtype.kind in "iu" and labels.shape[0] == batch_size


def _plain_device_target(target: Any, arrays, *inputs: Any) -> bool:
    """A written array: writable, C-contiguous (so that it cannot overlap itself), overlapping
    no input."""
    if target.readonly or not target.is_c_contiguous():
        return False
    for x in inputs:
        if x is not None and arrays.may_share_memory(target, x):
            return False
    return True


def plain_device_center_loss(features, labels, centers, out, grad_out, alpha, rule, arrays) -> CenterLossInputs | None:
    """``center_loss``'s device inputs checked in a few attribute reads (labels on the device),
    or None where they need the full ``validate_center_loss``."""
    if not (_plain_device_matrix(features) and _plain_device_matrix(centers) and features.dtype == centers.dtype
            and features.shape[1] == centers.shape[1] and _plain_device_labels(labels, features.shape[0])
            and rule in RULES and type(alpha) is float and math.isfinite(alpha)):
        return None
    if out is not None and not (out is centers and _plain_device_target(out, arrays, features, labels)):
        return None
    if grad_out is not None and not (grad_out.dtype == features.dtype and grad_out.shape == features.shape
                                     and _plain_device_target(grad_out, arrays, features, labels, centers)):
        return None
    return CenterLossInputs(features, labels, centers, alpha, rule, out, out is not None, grad_out)


def plain_device_scatter(centers, labels, updates, out, arrays) -> ScatterInputs | None:
    """``scatter_sub_update``'s device inputs checked in a few attribute reads, or None."""
    if not (_plain_device_matrix(centers) and _plain_device_matrix(updates) and updates.dtype == centers.dtype
            and updates.shape[1] == centers.shape[1] and _plain_device_labels(labels, updates.shape[0])):
        return None
    if out is not None and not (out is centers and _plain_device_target(out, arrays, updates, labels)):
        return None
    return ScatterInputs(centers, labels, updates, out, out is not None)


def plain_device_gather(centers, labels, arrays) -> GatherInputs | None:
    """``gather_centers``' device inputs checked in a few attribute reads, or None."""
    if not (_plain_device_matrix(centers) and len(labels.shape) == 1 and labels.dtype.kind in "iu"
            and labels.shape[0] > 0):
        return None
    return GatherInputs(centers, labels)


def validate_gather(centers: Any, labels: Any, arrays) -> GatherInputs:
    centers = _float_matrix(centers, "centers", arrays)
    labels = _labels(labels, None, centers.shape[0], arrays, "")
    return GatherInputs(centers, labels)


def _resolve_out(out, arrays, **inputs):
    """The checked ``out``, whether it is the centers themselves, and the inputs, each copied
    where it overlaps ``out`` (except the centers when ``out`` is them: the in-place path)."""
    if out is None:
        return None, False, tuple(inputs.values())
    centers = inputs["centers"]
    target = _writable_target(out, "out", centers, "centers", arrays)
    out_is_centers = arrays.same_memory(target, centers)
    if out_is_centers:
        del inputs["centers"]
        return target, True, (centers, *_read_before_write(arrays, target, **inputs))
    return target, False, _read_before_write(arrays, target, **inputs)


def validate_scatter(centers: Any, labels: Any, updates: Any, out: Any, arrays) -> ScatterInputs:
    centers = _float_matrix(centers, "centers", arrays)
    updates = _float_matrix(updates, "updates", arrays)
    check_same_dtype(centers=centers, updates=updates)
    check_feature_size(updates, "updates", centers)
    labels = _labels(labels, updates.shape[0], centers.shape[0], arrays, f"updates of shape {tuple(updates.shape)}")
    target, out_is_centers, (centers, labels, updates) = _resolve_out(
        out, arrays, centers=centers, labels=labels, updates=arrays.contiguous(updates)
    )
    return ScatterInputs(centers, labels, updates, target, out_is_centers)


def validate_center_loss(
    features: Any, labels: Any, centers: Any, alpha: Any, rule: Any, out: Any, arrays, grad_out: Any = None
) -> CenterLossInputs:
    rule = check_choice(rule, "rule", RULES)
    alpha = check_alpha(alpha)
    features = _float_matrix(features, "features", arrays)
    centers = _float_matrix(centers, "centers", arrays)
    check_same_dtype(features=features, centers=centers)
    check_feature_size(features, "features", centers)
    labels = _labels(
        labels, features.shape[0], centers.shape[0], arrays, f"features of shape {tuple(features.shape)}"
    )
    grad_out = _grad_out(grad_out, arrays, features=features, labels=labels, centers=centers)
    target, out_is_centers, (centers, labels, features) = _resolve_out(
        out, arrays, centers=centers, labels=labels, features=arrays.contiguous(features)
    )
    if grad_out is not None and target is not None and arrays.may_share_memory(grad_out, target):
        raise ValueError("grad_out overlaps out; pass a buffer of its own, or grad_out=None")
    return CenterLossInputs(features, labels, centers, alpha, rule, target, out_is_centers, grad_out)
