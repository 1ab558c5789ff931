"""Center loss for JAX: ``centerkern.jax.center_loss``, differentiable and usable under ``jax.jit``.

::

    def objective(params, centers, images, labels):
        embeddings = model(params, images)
        loss, new_centers = centerkern.jax.center_loss(embeddings, labels, centers, 0.5, rule="wen")
        return loss, new_centers

    (loss, centers), grads = jax.value_and_grad(objective, has_aux=True)(params, centers, images, labels)

On the CPU the step is one XLA FFI custom call (``centerkern._xla_ffi``): XLA hands the kernels
its buffers in place, and the new centers are written over the centers' own buffer, so that a
jitted step with the centers donated (``donate_argnums``) copies nothing of size K x D and never
leaves compiled code for a host callback. Without ``jax.ffi``, or with JAX on a GPU (unless
``CENTERKERN_JAX_GPU_CUSTOM_CALL=1``), the kernels run as a ``jax.pure_callback`` on the batch's
classes only (see ``centerkern._compact``): B rows cross to the host and back, never K.

The gradient with respect to ``features`` is the kernel's; the one with respect to ``centers``
(what rule ``pytorch`` trains) is ``-sum`` of the features' gradient per class. ``new_centers`` is
the rule's update, like an optimizer step: no gradient flows through it. Gradients of gradients
are not available (JAX raises). Costs are in ``benchmarks/jax_ffi.py`` and the README.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ._compact import check_shapes_and_dtypes, host_step
from ._rules import RULES, moves_centers
from ._validation import HOST_BACKENDS, check_choice, check_labels


def center_loss(features, labels, centers, alpha, rule: str = "facenet", *, backend: str = "numba"):
    """One center-loss step on JAX arrays: ``(loss, new_centers)``.

    Parameters
    ----------
    features : jax array, shape (B, D), float32 (or float64 with ``jax_enable_x64``)
    labels : integer jax array holding B values in [0, K), any shape (flattened)
    centers : jax array, shape (K, D), the dtype of ``features``
    alpha : float or 0-d array; see ``centerkern.center_loss``
    rule : {"facenet", "wen", "pytorch"}
    backend : {"numba", "numpy"}
        The host kernels the callback runs.

    Returns
    -------
    loss : 0-d array of the features' dtype, differentiable with respect to features and centers
    new_centers : (K, D) array, the centers after the rule's update (unchanged for ``pytorch``)
    """
    rule = check_choice(rule, "rule", RULES)
    backend = check_choice(backend, "backend", HOST_BACKENDS)
    features, centers = jnp.asarray(features), jnp.asarray(centers)
    labels = jnp.ravel(jnp.asarray(labels))
    check_shapes_and_dtypes(features, centers, labels.shape[0], labels.dtype)

    num_classes, batch_size = centers.shape[0], features.shape[0]
    if not isinstance(labels, jax.core.Tracer):  # concrete labels: SPEC's IndexError right here
        check_labels(np.asarray(labels), batch_size, num_classes, f"features of shape {features.shape}")
    alpha = jnp.asarray(alpha, dtype=features.dtype)
    step = _ffi_step_or_none(rule, backend)
    if step is not None:
        loss, new_centers = step(features, labels, centers, alpha)
        return loss, jax.lax.stop_gradient(new_centers)
    # size=B keeps the shapes static under jit; the padding class K is out of range, so reading
    # it fills zeros and writing it is dropped. The classes are found in the widest integer type
    # JAX has in this mode: in a narrow label dtype (uint8, K = 256) K would wrap onto a real class.
    wide_labels = labels.astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    classes, index = jnp.unique(wide_labels, return_inverse=True, size=batch_size, fill_value=num_classes)
    rows = centers.at[classes].get(mode="fill", fill_value=0)
    step = _differentiable_step(rule, backend, num_classes)
    loss, new_rows = step(features, labels, index.reshape(-1), rows, alpha)
    if moves_centers(rule):
        new_centers = centers.at[classes].set(new_rows, mode="drop")
    else:
        new_centers = centers
    return loss, jax.lax.stop_gradient(new_centers)


# --------------------------------------------------------------------------- XLA FFI


_ffi_state: dict = {}


# The custom call on the GPU (the cuda kernels on XLA's stream, on XLA's device buffers) has not
# yet run on a GPU: until it has, it is taken only when asked for, and JAX on a GPU otherwise
# keeps the host callback.
GPU_CUSTOM_CALL_SWITCH = "CENTERKERN_JAX_GPU_CUSTOM_CALL"


def _gpu_custom_call_asked() -> bool:
    return os.environ.get(GPU_CUSTOM_CALL_SWITCH) == "1"


def ffi_path_available() -> bool:
    """Whether steps run as an XLA FFI custom call rather than a host callback: where jax.ffi
    exists and JAX computes on the CPU (or on a GPU, with ``CENTERKERN_JAX_GPU_CUSTOM_CALL=1``)."""
    if "available" not in _ffi_state:
        platform = jax.default_backend()
        _ffi_state["available"] = (hasattr(jax, "ffi") and hasattr(jax.ffi, "ffi_call")
                                   and (platform == "cpu" or (platform == "gpu" and _gpu_custom_call_asked())))
    return _ffi_state["available"]


def step_path() -> str:
    """How ``center_loss`` runs the kernels here, for ``python -m centerkern info``."""
    if ffi_path_available():
        return f"XLA FFI custom call on the {jax.default_backend().upper()} (in place, no host callback)"
    if not hasattr(jax, "ffi"):
        return "jax.pure_callback (this jaxlib has no jax.ffi)"
    if "refused" in _ffi_state:
        return f"jax.pure_callback (XLA refused the custom call: {_ffi_state['refused']})"
    return (f"jax.pure_callback (JAX computes on {jax.default_backend()}; {GPU_CUSTOM_CALL_SWITCH}=1 takes "
            "the custom call there, not yet run on a GPU)")


# XLA holds pointers to the registered handlers: they must live as long as the process (kept
# apart from _ffi_state, which tests reset, and kept across a reload of this module)
_REGISTERED: dict = globals().get("_REGISTERED", {})


def _ffi_step_or_none(rule: str, backend: str):
    """The custom-call step, or None where the host callback must serve: jax.ffi missing, JAX on
    a GPU without the switch, or XLA refusing the registration (its reason kept for ``info``)."""
    if not ffi_path_available():
        return None
    try:
        return _ffi_step(rule, backend)
    except Exception as error:  # e.g. a jaxlib that no longer accepts this API version
        _ffi_state.update(available=False, refused=f"{type(error).__name__}: {error}")
        return None


def _ffi_target(rule: str, backend: str) -> str:
    """The FFI target of ``rule``, registered with XLA on first use: on the CPU the host
    ``backend``'s kernels on host buffers, on a GPU the cuda kernels on device buffers."""
    name = f"centerkern_center_loss_{rule}_{backend}"
    if name not in _REGISTERED:
        from ._xla_ffi import handler

        host = handler(functools.partial(_host_custom_call, rule=rule, backend=backend))
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(host), platform="cpu")
        kept = [host]
        if jax.default_backend() == "gpu" and _gpu_custom_call_asked():
            device = handler(functools.partial(_device_custom_call, rule=rule))
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(device), platform="CUDA")
            kept.append(device)
        _REGISTERED[name] = kept
    return name


def _step_in_custom_call(*args, **kwargs):
    """``center_loss`` inside a custom call: a bad label becomes the call's OUT_OF_RANGE error."""
    from . import _api
    from ._xla_ffi import ERROR_OUT_OF_RANGE, CallError

    try:
        return _api.center_loss(*args, **kwargs)
    except IndexError as error:
        raise CallError(str(error), ERROR_OUT_OF_RANGE) from error


def _host_custom_call(frame, arguments, results, *, rule, backend):
    features, labels, centers, alpha = (buffer.host_array() for buffer in arguments)
    loss, grad, *moved = (buffer.host_array() for buffer in results)
    # new centers go into centers' own buffer (input_output_aliases): the in-place path, every
    # check before the first write, so a bad label leaves it as it was. Rule pytorch moves no
    # center: out=centers is only read
    result = _step_in_custom_call(features, labels, centers, float(alpha), rule=rule,
                                  out=moved[0] if moved else centers, grad_out=grad, backend=backend)
    loss[...] = result.loss


class _XlaDeviceBuffer:
    """An XLA device buffer as a CUDA Array Interface object, for the cuda backend (no copy)."""

    def __init__(self, buffer):
        self.__cuda_array_interface__ = {"shape": buffer.shape, "typestr": buffer.dtype.str, "strides": None,
                                         "data": (buffer.pointer, False), "version": 3}


def _device_custom_call(frame, arguments, results, *, rule):
    """The step on XLA's device buffers, queued on XLA's stream by the cuda backend. It waits for
    the label check (sync=True) so that a bad label is returned as this call's error."""
    from numba import cuda

    from ._xla_ffi import stream

    handle = stream(frame)
    on_stream = cuda.external_stream(handle) if handle else cuda.default_stream()
    features, labels, centers, alpha = (_XlaDeviceBuffer(buffer) for buffer in arguments)
    loss, grad, *moved = (_XlaDeviceBuffer(buffer) for buffer in results)
    alpha_host = cuda.as_cuda_array(alpha, sync=False).copy_to_host(stream=on_stream)
    on_stream.synchronize()  # the copy is queued on XLA's stream: read alpha once it has run
    result = _step_in_custom_call(features, labels, centers, float(alpha_host), rule=rule,
                                  out=moved[0] if moved else centers, grad_out=grad, backend="cuda", stream=handle,
                                  sync=True)
    value = np.asarray(result.loss.copy_to_host(stream=on_stream), dtype=arguments[0].dtype)
    cuda.as_cuda_array(loss, sync=False).copy_to_device(value, stream=on_stream)
    on_stream.synchronize()  # the host value above must not be freed before the copy has read it


@functools.lru_cache(maxsize=None)
def _ffi_step(rule: str, backend: str):
    """``(features, labels, centers, alpha) -> (loss, new_centers)`` as one custom call, with its VJP."""
    target = _ffi_target(rule, backend)

    def run(features, labels, centers, alpha):
        shapes = (jax.ShapeDtypeStruct((), features.dtype), jax.ShapeDtypeStruct(features.shape, features.dtype))
        if not moves_centers(rule):  # pytorch: the centers stay as they are, and no buffer is written
            loss, grad = jax.ffi.ffi_call(target, shapes, vmap_method="sequential")(features, labels, centers, alpha)
            return loss, grad, centers
        # the new centers are written over the centers' buffer: with the centers donated
        # (jax.jit(..., donate_argnums)) no K x D copy is made
        call = jax.ffi.ffi_call(target, (*shapes, jax.ShapeDtypeStruct(centers.shape, centers.dtype)),
                                vmap_method="sequential", input_output_aliases={2: 2})
        return call(features, labels, centers, alpha)

    @jax.custom_vjp
    def step(features, labels, centers, alpha):
        loss, _, new_centers = run(features, labels, centers, alpha)
        return loss, new_centers

    def forward(features, labels, centers, alpha):
        loss, grad, new_centers = run(features, labels, centers, alpha)
        return (loss, new_centers), (grad, labels, centers.shape[0])

    def backward(residuals, cotangents):
        grad, labels, num_classes = residuals
        grad_loss, _ = cotangents  # new_centers is the rule's update: not differentiated
        # d loss / d c_j = -sum of d loss / d f_i over the samples of class j
        grad_centers = -grad_loss * jax.ops.segment_sum(grad, labels, num_segments=num_classes)
        return grad_loss * grad, None, grad_centers, None

    step.defvjp(forward, backward)
    return step


@functools.lru_cache(maxsize=None)
def _differentiable_step(rule: str, backend: str, num_classes: int):
    """``(features, labels, index, rows, alpha) -> (loss, new_rows)`` with its VJP."""
    callback = functools.partial(host_step, num_classes=num_classes, rule=rule, backend=backend)

    def run(features, labels, index, rows, alpha):
        shapes = (
            jax.ShapeDtypeStruct((), features.dtype),
            jax.ShapeDtypeStruct(features.shape, features.dtype),
            jax.ShapeDtypeStruct(rows.shape, rows.dtype),
        )
        return jax.pure_callback(callback, shapes, features, labels, index, rows, alpha, vmap_method="sequential")

    @jax.custom_vjp
    def step(features, labels, index, rows, alpha):
        loss, _, new_rows = run(features, labels, index, rows, alpha)
        return loss, new_rows

    def forward(features, labels, index, rows, alpha):
        loss, grad, new_rows = run(features, labels, index, rows, alpha)
        return (loss, new_rows), (grad, index)

    def backward(residuals, cotangents):
        grad, index = residuals
        grad_loss, _ = cotangents  # new_rows is the rule's update: not differentiated
        grad_features = grad_loss * grad
        # d loss / d c_j = -sum of d loss / d f_i over the samples of class j (one row per class)
        grad_rows = -grad_loss * jax.ops.segment_sum(grad, index, num_segments=grad.shape[0])
        return grad_features, None, None, grad_rows, None

    step.defvjp(forward, backward)
    return step
