"""What ``centerkern.jax`` registers as XLA FFI targets: functions of ``(frame, arguments,
results)`` (``xla_ffi.handler`` wraps them) that run on XLA's buffers where they are.

- ``host_center_loss``: the step on host buffers with a host backend's kernels, the new centers
  written over the centers' own buffer;
- ``device_center_loss``: the same step on a GPU's buffers with the cuda kernels, on XLA's stream;
- ``host_function``: any function of NumPy arrays (the data-parallel step's partials and their
  sum, the labels' check across shards) as a target on host buffers.

None of them imports JAX: they see buffers, not arrays, and the registration (which target
serves which rule and platform) stays with ``centerkern.jax``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .. import _api
from .xla_ffi import ERROR_OUT_OF_RANGE, CallError, stream


def _step_in_custom_call(*args, **kwargs):
    """``center_loss`` inside a custom call: a bad label becomes the call's OUT_OF_RANGE error."""
    try:
        return _api.center_loss(*args, **kwargs)
    except IndexError as error:
        raise CallError(str(error), ERROR_OUT_OF_RANGE) from error


def host_center_loss(frame, arguments, results, *, rule: str, backend: str) -> None:
    """Arguments ``(features, labels, centers, alpha)``, results ``(loss, grad[, new_centers])``,
    in host memory: the step of ``rule`` with ``backend``'s kernels."""
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


def device_center_loss(frame, arguments, results, *, rule: str) -> None:
    """``host_center_loss`` on XLA's device buffers, queued on XLA's stream by the cuda backend.
    It waits for the label check (sync=True) so that a bad label is returned as this call's error."""
    from numba import cuda

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


def host_function(key: str, function: Callable[..., tuple]):
    """``function(*arrays) -> tuple of arrays`` as a target on host buffers: the arguments as
    NumPy views, each value written into its result buffer. ``key`` names it in errors."""

    def call(frame, arguments, results):
        values = function(*(buffer.host_array() for buffer in arguments))
        if len(values) != len(results):
            raise RuntimeError(f"{key}: {len(values)} results for {len(results)} buffers")
        for buffer, value in zip(results, values):
            buffer.host_array()[...] = value

    return call
