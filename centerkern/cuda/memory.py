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
from .launcher import bindings, context_handle, driver_stream
from .pool import PooledBlock, ResultBlock
from .views import SIMULATED, contiguous_strides, data_pointer, made_once, numpy_dtypes_of_torch, simulated

# --------------------------------------------------------------------------- streams


_streams: dict[int, Any] = {}


def _external_stream(handle: int) -> Any:
    """A Numba stream object for a ``CUstream`` handle (a wrapper that owns nothing)."""
    return made_once(_streams, handle, lambda: cuda.default_stream() if handle == 0 or simulated()
                     else cuda.external_stream(handle))


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
    """(handle, Numba stream object) for the ``stream=`` keyword; for None (Numba's default
    stream), the object is made when first needed (see ``_NumbaMemory.stream``)."""
    if stream is None:
        return (0 if SIMULATED else _default_stream_handle()), None
    if simulated() and hasattr(stream, "synchronize"):
        return id(stream), stream  # the simulator's streams have no handle; it runs everything in order
    handle = stream_handle(stream)
    if simulated() or not _is_numba_stream(stream):
        return handle, _external_stream(handle)
    return handle, stream


_PER_THREAD_DEFAULT_STREAM = 2  # CU_STREAM_PER_THREAD


def _default_stream_handle() -> int:
    """The handle of Numba's default stream: the legacy stream (0), or the per-thread one where
    Numba is set so (``NUMBA_CUDA_PER_THREAD_DEFAULT_STREAM``)."""
    from numba.cuda import config

    return _PER_THREAD_DEFAULT_STREAM if config.CUDA_PER_THREAD_DEFAULT_STREAM else 0


_default_streams: dict[Any, Any] = {}


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
    cuda_driver = bindings()
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
        self.stream_handle, self._stream = _numba_stream(stream)
        self.device_ordinal = None  # set by DeviceArrays once it knows whether the stream captures
        self.context_id = None
        self.pooled: list[PooledBlock] = []

    @property
    def stream(self) -> Any:
        """The call's Numba stream object; for Numba's default stream, one per context, made once
        (Numba makes a new object at each ``cuda.default_stream()``, in microseconds)."""
        if self._stream is None:
            self._stream = _default_streams.get(self.context_id)
            if self._stream is None:
                self._stream = cuda.default_stream()
                if self.context_id is not None:
                    _default_streams[self.context_id] = self._stream
        return self._stream

    def set_device(self, current: int | None) -> None:
        """Numba's current device: ``current``, the device of this thread's current context (None
        where none is current yet: Numba's, made current)."""
        if simulated():
            self.device_ordinal = 0
            return
        self.device_ordinal = cuda.get_current_device().id if current is None else current

    def bind_context(self, context_id: int) -> None:
        self.context_id = context_id
        if not SIMULATED:
            self.numba_context = _numba_context(context_id)
            self.context_handle = context_handle(context_id)

    def empty(self, shape, dtype):
        if SIMULATED:  # the simulator's memory is NumPy's
            return cuda.device_array(shape, dtype=dtype, stream=self.stream)
        numba_driver, _ = _numba_modules or _numba_memory_types()
        dtype = np.dtype(dtype)
        size = math.prod(shape) * dtype.itemsize
        block = ResultBlock(size, self.device_ordinal, self.stream_handle, self.context_handle)
        memory = numba_driver.MemoryPointer(self.numba_context, numba_driver.binding.CUdeviceptr(block.pointer),
                                            max(1, size), owner=block)  # the block goes with the last of its users
        return _device_array(shape, dtype, self.stream, memory)

    def temporary(self, size: int):
        if SIMULATED:
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


def empty_many(memory: Any, shapes_and_dtypes) -> tuple[list, list]:
    """Several results of ``memory``, (arrays, their device addresses): each its own allocation
    (one block for all would keep a call's large results alive as long as its loss)."""
    arrays = [memory.empty(shape, dtype) for shape, dtype in shapes_and_dtypes]
    return arrays, [data_pointer(array) for array in arrays]


_numba_contexts: dict[int, Any] = {}
_numba_modules: list = []


def _numba_context(context_id: int) -> Any:
    """Numba's object for the current context (whose unique id is ``context_id``), asked of Numba
    once per context: Numba's own lookup is Python code that costs microseconds a call."""
    context = _numba_contexts.get(context_id)
    if context is None:
        context = _numba_contexts[context_id] = cuda.current_context()
    return context


_array_templates: dict[tuple, Any] = {}


def _device_array(shape: tuple[int, ...], dtype: np.dtype, stream: Any, memory: Any) -> Any:
    """A C-contiguous Numba ``DeviceNDArray`` over ``memory``. Numba's constructor rebuilds the
    array's layout description on every call (microseconds); what it computes depends on the
    shape and dtype alone, so it is made once per shape and dtype, and each array is a copy of
    that template's attributes with its own memory and stream."""
    key = (shape, dtype)
    template = _array_templates.get(key)
    numba_driver, devicearray = _numba_modules or _numba_memory_types()
    if template is None:
        if len(_array_templates) >= 256:
            _array_templates.clear()
        nowhere = numba_driver.MemoryPointer(memory.context, numba_driver.binding.CUdeviceptr(0), memory.size)
        template = _array_templates[key] = devicearray.DeviceNDArray(
            shape, contiguous_strides(shape, dtype.itemsize), dtype, gpu_data=nowhere)
    array = devicearray.DeviceNDArray.__new__(devicearray.DeviceNDArray)
    array.__dict__.update(template.__dict__)
    array.gpu_data, array.stream = memory, stream
    return array


def _numba_memory_types():
    """Numba's driver module (``MemoryPointer``) and ``devicearray`` module, imported once."""
    if not _numba_modules:
        from numba.cuda.cudadrv import devicearray
        from numba.cuda.cudadrv import driver as numba_driver

        _numba_modules[:] = [numba_driver, devicearray]
    return _numba_modules


class _FrameworkMemory:
    """What torch's and CuPy's memory share: the framework's current stream, on the arrays' own
    device, whose context needs nothing of the call."""

    stream_handle: int

    @property
    def stream(self) -> Any:
        return _external_stream(self.stream_handle)

    def set_device(self, current: int | None) -> None:
        pass  # the arrays' own device

    def bind_context(self, context_id: int) -> None:
        pass


class _TorchMemory(_FrameworkMemory):
    name = "torch"

    def __init__(self, like: Any, stream: Any):
        import torch

        self.torch, self.device = torch, like.device
        self.device_ordinal = self.device.index if self.device.index is not None else torch.cuda.current_device()
        current = torch_stream_handle(torch, self.device_ordinal)
        self.stream_handle = _framework_stream(stream, current, "torch.cuda.stream(...)")

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


_TORCH_DTYPE_OF_NUMPY: dict = {}


def _torch_dtype(dtype) -> Any:
    if not _TORCH_DTYPE_OF_NUMPY:
        _TORCH_DTYPE_OF_NUMPY.update((numpy_dtype, torch_dtype) for torch_dtype, numpy_dtype in
                                     numpy_dtypes_of_torch().items())
    torch_dtype = _TORCH_DTYPE_OF_NUMPY.get(np.dtype(dtype))
    if torch_dtype is None:
        raise TypeError(f"torch has no dtype {np.dtype(dtype)}")
    return torch_dtype


class _CupyMemory(_FrameworkMemory):
    name = "cupy"

    def __init__(self, like: Any, stream: Any):
        import cupy

        self.cupy, self.device_ordinal = cupy, like.device.id
        with cupy.cuda.Device(self.device_ordinal):  # the current stream is per device
            current = cupy.cuda.get_current_stream()
        self.stream_handle = _framework_stream(stream, int(current.ptr), "with cupy.cuda.Stream(...)")

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


def _torch_strided() -> Any:
    import torch

    return torch.strided


def plain_framework(x: Any) -> str | None:
    """``torch``, ``cupy`` or ``numba`` for a plain device array of that framework, else None."""
    kind = type(x)
    if getattr(kind, "__cuda_ndarray__", False):
        return "numba"
    framework = framework_of(x)
    if framework == "torch" and kind.__name__ in _PLAIN_TORCH_TYPES and x.is_cuda:
        # a sparse tensor, or a dtype NumPy has not (bfloat16, complex), takes the full validation
        if x.layout is _torch_strided() and x.dtype in numpy_dtypes_of_torch():
            return "torch"
        return None
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


