"""The ``cuda`` backend's real host path, run without a GPU: every CUDA driver call answered by a stub.

What runs is what runs on a GPU, up to the driver: the public functions, their validation,
``DeviceArrays``, the launch plans, the allocators' calls, the error record's reads. What the
stub replaces, and how:

* the driver calls of ``cuda.bindings.driver`` the backend makes (stream capture query, current
  context, pool allocation and stream-ordered free, memset, the launch itself, copies, stream
  synchronisation): each a Python function that counts itself and returns success, about the
  cost of a call into the bindings without the driver's own work. The pool hands out device
  addresses that nothing dereferences (no kernel runs); what the host itself reads (the error
  record's pinned memory) is real memory; a copy of a verdict back to the host reads "no bad
  label";
* Numba's device, context and stream objects (``numba.cuda``): stand-ins that own nothing;
* compiling a kernel: a kernel handle is a number (the kernels are compiled for real by the
  PTX tests);
* torch: CPU tensors stand for CUDA tensors (``Tensor.is_cuda`` reads True, so torch's own
  ``__cuda_array_interface__`` code runs on them), torch's current stream is handle 0, and
  allocations are torch's CPU allocator's.

Numba device arrays are real ``DeviceNDArray`` objects over the stub's host memory.

``install()`` patches all of this into the running process for good (a benchmark or test
process of its own): ``Counts`` says what the driver was asked to do.
"""

from __future__ import annotations

import collections
import ctypes
from typing import Any

import numpy as np

RECORDED = ("cuLaunchKernel", "cuMemsetD32Async", "cuMemAllocFromPoolAsync", "cuMemFreeAsync", "cuMemcpyDtoHAsync",
            "cuStreamSynchronize", "cuStreamIsCapturing", "cuCtxGetCurrent", "cuCtxGetId", "cuCtxGetDevice",
            "cuMemHostAlloc", "cuMemPoolCreate", "cuThreadExchangeStreamCaptureMode", "cuCtxPushCurrent",
            "cuCtxPopCurrent")


class Counts(collections.Counter):
    """Driver calls by name since the last ``clear()``."""


counts = Counts()
capturing = {"on": False}  # what cuStreamIsCapturing answers
_host_memory: list = []  # the host memory the stub hands out where the host reads it, kept alive
_next_address = [1 << 40]  # device addresses the stub hands out: never dereferenced, since no kernel runs


def _host_block(size: int) -> int:
    """Real host memory, for what the host itself reads (the error record, a Numba array's data)."""
    block = np.zeros(max(8, size), np.uint8)
    _host_memory.append(block)
    return block.ctypes.data


def _device_address(size: int) -> int:
    address = _next_address[0]
    _next_address[0] += -(-max(1, size) // 256) * 256
    return address


def _stub_driver(driver: Any) -> None:
    success = driver.CUresult.CUDA_SUCCESS
    none = driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE
    active = driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE
    context = driver.CUcontext(1)

    def counted(name, result):
        """The stub of driver call ``name``: ``result``, a constant (the stub's own time kept as
        small as a Python call can be: it is not centerkern's) or a function of the arguments."""
        if callable(result):
            def call(*args):
                counts[name] += 1
                return result(*args)
        else:
            def call(*args):
                counts[name] += 1
                return result

        call.__name__ = name
        setattr(driver, name, call)

    def allocate(size, pool, stream):
        return success, _device_address(int(size))

    def copy_verdict(host, device, size, stream):
        # the stub's device finds every label good: the verdict reads "no bad row"
        from centerkern.cuda import kernels

        ctypes.c_int64.from_address(int(host)).value = int(kernels.NO_ROW)  # (its first field)
        return (success,)

    def host_alloc(size, flags):
        return success, _host_block(int(size))

    mode = {"now": driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL}

    def exchange_capture_mode(new):
        previous, mode["now"] = mode["now"], new
        return success, previous

    counted("cuStreamIsCapturing", lambda stream: (success, active if capturing["on"] else none))
    counted("cuCtxGetCurrent", (success, context))
    counted("cuCtxGetId", (success, 1))
    counted("cuCtxGetDevice", (success, 0))
    counted("cuLaunchKernel", (success,))
    counted("cuMemsetD32Async", (success,))
    counted("cuMemAllocFromPoolAsync", allocate)
    counted("cuMemFreeAsync", (success,))
    counted("cuMemcpyDtoHAsync", copy_verdict)
    counted("cuStreamSynchronize", (success,))
    counted("cuMemHostAlloc", host_alloc)
    counted("cuMemHostGetDevicePointer", lambda pointer, flags: (success, pointer))
    counted("cuMemPoolCreate", lambda properties: (success, driver.CUmemoryPool(1)))
    counted("cuMemPoolSetAttribute", (success,))
    counted("cuThreadExchangeStreamCaptureMode", exchange_capture_mode)
    counted("cuCtxPushCurrent", (success,))
    counted("cuCtxPopCurrent", (success, context))


class _Stream:
    """Numba's stream object, standing for a handle."""

    def __init__(self, handle: int = 0):
        self.handle = ctypes.c_void_p(handle)

    def __int__(self) -> int:
        return self.handle.value or 0

    def synchronize(self) -> None:
        counts["cuStreamSynchronize"] += 1


class _Device:
    id = 0
    compute_capability = (9, 0)


class _Context:
    device = _Device()


class _Gpus:
    """``numba.cuda.gpus``: a device is a context manager that makes its context current."""

    def __getitem__(self, ordinal):
        import contextlib

        return contextlib.nullcontext()

    def __len__(self) -> int:
        return 1


def _stub_numba(cuda: Any) -> None:
    context = _Context()
    cuda.is_available = lambda: True
    cuda.get_current_device = lambda: _Device()
    cuda.current_context = lambda: context
    cuda.gpus = _Gpus()
    cuda.default_stream = lambda: _Stream(0)
    cuda.external_stream = lambda handle: _Stream(int(handle))
    cuda.synchronize = lambda: counts.update(["cuCtxSynchronize"])


def _stub_torch() -> None:
    import torch

    torch.Tensor.is_cuda = property(lambda self: True)
    torch._C._cuda_getCurrentRawStream = lambda device: 0
    torch.cuda.current_device = lambda: 0


def _stub_compiler() -> None:
    from centerkern.cuda import launcher

    handles: dict = {}

    def kernel_handle(dispatcher, signature, context_id, capturing):
        return handles.setdefault((dispatcher, signature), len(handles) + 1)

    launcher._kernel_handle = kernel_handle


def numba_array(host: np.ndarray) -> Any:
    """A Numba ``DeviceNDArray`` over a copy of ``host`` in the stub's memory."""
    from numba import cuda
    from numba.cuda.cudadrv import devicearray
    from numba.cuda.cudadrv import driver as numba_driver

    pointer = _host_block(host.nbytes)
    ctypes.memmove(pointer, host.ctypes.data, host.nbytes)
    memory = numba_driver.MemoryPointer(cuda.current_context(), numba_driver.binding.CUdeviceptr(pointer),
                                        max(1, host.nbytes))
    return devicearray.DeviceNDArray(host.shape, host.strides, host.dtype, gpu_data=memory)


def install() -> None:
    """Stub the driver, Numba's CUDA objects, the kernel compiler and torch's CUDA hooks, for
    the rest of this process. Must run before ``centerkern.cuda`` is first used."""
    import os

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        raise RuntimeError("the stubbed driver runs the real cuda path: unset NUMBA_ENABLE_CUDASIM")
    from cuda.bindings import driver
    from numba import cuda

    _stub_driver(driver)
    _stub_numba(cuda)
    _stub_compiler()
    try:
        _stub_torch()
    except ImportError:
        pass
