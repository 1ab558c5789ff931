"""Each framework's stream and allocator, for one call's results and its one temporary.

A call on device arrays is one more piece of work queued on the caller's GPU stream, with memory
from the caller's allocator, like any op of the caller's framework:

========== =========================================== ==========================================
framework  stream                                      results, and the call's one temporary
========== =========================================== ==========================================
torch      ``torch.cuda.current_stream(device)``       torch's caching allocator (current stream)
CuPy       the current stream of the array's device    CuPy's allocator (that stream)
other      ``stream=`` (a Numba stream or a            centerkern's own stream-ordered pool of
           ``CUstream`` handle); Numba's default       the device (``cuMemAllocFromPoolAsync``,
                                                       ``cuMemFreeAsync``): results are Numba
                                                       device arrays over it, given back in
                                                       stream order when dropped
========== =========================================== ==========================================

A call's temporary is made per call and given back when the call has queued its kernels: torch's
and CuPy's allocators hand a block given back on a stream only to later work on that same
stream, and a stream-ordered free waits for the work queued before it. So calls share no memory,
on one stream or several, from one host thread or several. Nothing is ever allocated or freed
with the synchronous ``cuMemAlloc``/``cuMemFree``, which wait for the device.

The pool of Numba arrays is centerkern's own (``pool``).

Graph capture takes memory from allocators that serve graphs: torch's (its graph pool), and
CuPy's only where it is stream-ordered (``cupy.cuda.MemoryAsyncPool``). CuPy's default pool
hands freed blocks to later allocations without regard to graphs, so that a graph would replay
into memory that eager arrays own since: such a capture is refused.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from .._core.interop import framework_of
from .launcher import driver_stream
from .pool import PooledBlock, allocate, free_later
from .views import contiguous_strides, numpy_dtypes_of_torch, simulated

# --------------------------------------------------------------------------- streams


_streams: dict[int, Any] = {}


def _external_stream(handle: int) -> Any:
    """A Numba stream object for a ``CUstream`` handle (a wrapper that owns nothing)."""
    stream = _streams.get(handle)
    if stream is None:
        if len(_streams) >= 256:  # a program that makes streams without end
            _streams.clear()
        stream = cuda.default_stream() if handle == 0 or simulated() else cuda.external_stream(handle)
        _streams[handle] = stream
    return stream


def stream_handle(stream: Any) -> int:
    """The ``CUstream`` handle of a Numba stream, a torch or CuPy stream, or an integer."""
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
        return int(stream)
    for attribute in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
        if isinstance(getattr(stream, attribute, None), int):
            return getattr(stream, attribute)
    handle = getattr(stream, "handle", None)  # a Numba stream
    if handle is not None:
        return int(getattr(handle, "value", handle) or 0)
    raise TypeError(f"stream must be a Numba stream or an integer CUstream handle, got {type(stream).__name__}")


def _numba_stream(stream: Any) -> tuple[int, Any]:
    """(handle, Numba stream object) for the ``stream=`` keyword."""
    if stream is None:
        default = cuda.default_stream()  # the legacy stream, or the per-thread one if Numba is set so
        return (0 if simulated() else stream_handle(default)), default
    if simulated() and hasattr(stream, "synchronize"):
        return id(stream), stream  # the simulator's streams have no handle; it runs everything in order
    handle = stream_handle(stream)
    if simulated() or not _is_numba_stream(stream):
        return handle, _external_stream(handle)
    return handle, stream


def _is_numba_stream(stream: Any) -> bool:
    from numba.cuda.cudadrv.driver import Stream

    return isinstance(stream, Stream)


def _framework_stream(stream: Any, current: int, how: str) -> int:
    """The caller framework's current stream; ``stream=`` may only name that same stream, since the
    framework's allocator orders its memory by its current stream."""
    if stream is not None and stream_handle(stream) != current:
        raise ValueError(
            f"stream= names stream {stream_handle(stream):#x}, but these arrays' framework works on its "
            f"current stream {current:#x}: make the stream current ({how}) instead of passing stream="
        )
    return current


def is_capturing(handle: int) -> bool:
    """Whether the stream is under CUDA graph capture (where nothing may wait for the GPU)."""
    if simulated():
        return False
    from cuda.bindings import driver as cuda_driver

    error, status = cuda_driver.cuStreamIsCapturing(driver_stream(handle))
    if error != 0:  # e.g. the legacy stream while another captures
        raise RuntimeError(f"cannot queue work on stream {handle:#x}: {error.name}")
    return status != cuda_driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE


# --------------------------------------------------------------------------- frameworks


class _NumbaMemory:
    """Arrays that are not torch's or CuPy's: Numba device arrays over the private pool, the
    ``stream=`` keyword."""

    name = "numba"

    def __init__(self, like: Any, stream: Any):
        self.stream_handle, self.stream = _numba_stream(stream)
        self.device_ordinal = None  # set by DeviceArrays once it knows whether the stream captures
        self.pooled: list[PooledBlock] = []

    def set_device(self) -> None:
        self.device_ordinal = 0 if simulated() else cuda.get_current_device().id

    def empty(self, shape, dtype):
        if simulated():  # the simulator's memory is NumPy's
            return cuda.device_array(shape, dtype=dtype, stream=self.stream)
        from numba.cuda.cudadrv import devicearray
        from numba.cuda.cudadrv import driver as numba_driver

        dtype = np.dtype(dtype)
        size = math.prod(shape) * dtype.itemsize
        pointer = allocate(size, self.device_ordinal, self.stream_handle)
        memory = numba_driver.MemoryPointer(cuda.current_context(), numba_driver.binding.CUdeviceptr(pointer),
                                            max(1, size), finalizer=free_later(pointer, self.stream_handle))
        return devicearray.DeviceNDArray(shape, contiguous_strides(shape, dtype.itemsize), dtype, stream=self.stream,
                                         gpu_data=memory)

    def temporary(self, size: int):
        if simulated():
            return cuda.device_array(max(1, size), dtype=np.uint8, stream=self.stream)
        block = PooledBlock(size, self.device_ordinal, self.stream_handle)
        self.pooled.append(block)
        return block

    def release(self) -> None:
        for block in self.pooled:
            block.release()
        self.pooled.clear()

    def from_host(self, host):
        return cuda.to_device(host, stream=self.stream)

    def flat(self, view):
        # rare (labels of three or more dimensions, strided): through the host, on the call's stream
        host = np.ascontiguousarray(view.numba().copy_to_host(stream=self.stream)).reshape(-1)
        return cuda.to_device(host, stream=self.stream)


class _TorchMemory:
    name = "torch"

    def __init__(self, like: Any, stream: Any):
        import torch

        self.torch, self.device = torch, like.device
        self.device_ordinal = self.device.index if self.device.index is not None else torch.cuda.current_device()
        current = torch_stream_handle(torch, self.device_ordinal)
        self.stream_handle = _framework_stream(stream, current, "torch.cuda.stream(...)")
        self.stream = _external_stream(self.stream_handle)

    def set_device(self) -> None:
        pass

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=_torch_dtype(dtype), device=self.device)

    def temporary(self, size: int):
        # given back to the caching allocator when the call drops it
        return self.torch.empty(max(1, size), dtype=self.torch.uint8, device=self.device)

    def release(self) -> None:
        pass

    def from_host(self, host):
        return self.torch.as_tensor(host, device=self.device)  # copied on torch's current stream

    def flat(self, view):
        return view.owner.reshape(-1)  # a copy on torch's current stream, from its allocator


def torch_stream_handle(torch: Any, device_ordinal: int) -> int:
    """The handle of torch's current stream on the device, without making a Stream object."""
    return int(torch._C._cuda_getCurrentRawStream(device_ordinal))


def _torch_dtype(dtype) -> Any:
    for torch_dtype, numpy_dtype in numpy_dtypes_of_torch().items():
        if numpy_dtype == dtype:
            return torch_dtype
    raise TypeError(f"torch has no dtype {np.dtype(dtype)}")


class _CupyMemory:
    name = "cupy"

    def __init__(self, like: Any, stream: Any):
        import cupy

        self.cupy, self.device_ordinal = cupy, like.device.id
        with cupy.cuda.Device(self.device_ordinal):  # the current stream is per device
            current = cupy.cuda.get_current_stream()
        self.stream_handle = _framework_stream(stream, int(current.ptr), "with cupy.cuda.Stream(...)")
        self.stream = _external_stream(self.stream_handle)

    def set_device(self) -> None:
        pass

    def graph_safe(self) -> bool:
        """Whether CuPy allocates in stream order (``MemoryAsyncPool``), which graph capture needs."""
        allocator = self.cupy.cuda.get_allocator()
        return isinstance(getattr(allocator, "__self__", None), self.cupy.cuda.MemoryAsyncPool)

    def _on_device(self):
        return self.cupy.cuda.Device(self.device_ordinal)  # and with it, that device's current stream

    def empty(self, shape, dtype):
        with self._on_device():
            return self.cupy.empty(shape, dtype=dtype)

    def temporary(self, size: int):
        with self._on_device():  # given back to CuPy's allocator when the call drops it
            return self.cupy.empty(max(1, size), dtype=np.uint8)

    def release(self) -> None:
        pass

    def from_host(self, host):
        with self._on_device():
            return self.cupy.asarray(host)

    def flat(self, view):
        with self._on_device():
            return view.owner.reshape(-1)  # a copy on CuPy's current stream, from its pool


_PLAIN_TORCH_TYPES = ("Tensor", "Parameter", "Buffer")


def plain_framework(x: Any) -> str | None:
    """``torch``, ``cupy`` or ``numba`` for a plain device array of that framework, else None."""
    kind = type(x)
    if getattr(kind, "__cuda_ndarray__", False):
        return "numba"
    framework = framework_of(x)
    if framework == "torch" and kind.__name__ in _PLAIN_TORCH_TYPES and x.is_cuda:
        return "torch"
    if framework == "cupy" and kind.__name__ == "ndarray":
        return "cupy"
    return None


def memory_for(like: Any, stream: Any):
    framework = framework_of(like)
    if framework == "torch":
        return _TorchMemory(like, stream)
    if framework == "cupy":
        return _CupyMemory(like, stream)
    return _NumbaMemory(like, stream)


