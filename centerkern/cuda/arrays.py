"""Device arrays, streams and allocation, per framework.

A call on device arrays is one more piece of work queued on the caller's GPU stream, with memory
from the caller's allocator, like any op of the caller's framework:

========== =========================================== ==========================================
framework  stream                                      memory for results and temporaries
========== =========================================== ==========================================
torch      ``torch.cuda.current_stream(device)``       torch's caching allocator (current stream)
CuPy       ``cupy.cuda.get_current_stream()``          CuPy's memory pool
other      ``stream=`` (a Numba stream or a            Numba (``cuda.device_array``)
           ``CUstream`` handle); Numba's default
========== =========================================== ==========================================

The kernels see a ``DeviceView``: pointer, shape, strides and dtype read once from the CUDA Array
Interface, and the object that owns the memory, which is what a result gives back to the caller.
``DeviceArrays`` is the twin of ``_validation.HostArrays``: the same methods, for one call's
device arrays.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from .._interop import Owned, framework_of
from .._validation import HostArrays, is_device_array


def _interface(array: Any) -> dict:
    """The array's CUDA Array Interface. The simulator's device arrays are NumPy arrays in
    disguise and offer NumPy's array interface instead, which has the same keys."""
    if hasattr(array, "__cuda_array_interface__"):
        return array.__cuda_array_interface__
    return array.__array_interface__


def contiguous_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class DeviceView(Owned):
    """A device array as the kernels see it. ``owner`` is the framework's array holding the
    memory (kept alive by the view); ``numba()`` is the same memory as a Numba device array, for
    launches through Numba's own launch path (the simulator's)."""

    __slots__ = ("pointer", "shape", "strides", "dtype", "readonly", "arrays", "fresh", "parameters", "_numba",
                 "_derive")

    def __init__(self, owner, pointer, shape, strides, dtype, readonly, arrays, numba_array=None, derive=None):
        self.owner = owner
        self.pointer, self.shape, self.strides = pointer, tuple(shape), tuple(strides)
        self.dtype, self.readonly, self.arrays = dtype, readonly, arrays
        self.fresh = False  # allocated by the backend for this call's results, not the caller's memory
        self.parameters = None  # the kernel parameters of this array, flattened once (see launcher)
        self._numba, self._derive = numba_array, derive

    @classmethod
    def of(cls, owner: Any, arrays: "DeviceArrays") -> "DeviceView":
        described = _describe_torch_tensor(owner)
        if described is not None:
            return cls(owner, *described, arrays)
        interface = _interface(owner)
        dtype = np.dtype(interface["typestr"])
        shape = tuple(interface["shape"])
        strides = interface.get("strides") or contiguous_strides(shape, dtype.itemsize)
        pointer, readonly = interface["data"]
        numba_array = owner if getattr(owner, "__cuda_ndarray__", False) else None
        return cls(owner, pointer, shape, strides, dtype, bool(readonly), arrays, numba_array)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def is_c_contiguous(self) -> bool:
        return self.size == 0 or self.strides == contiguous_strides(self.shape, self.dtype.itemsize)

    def reshape(self, shape: tuple[int, ...]) -> "DeviceView":
        """The same contiguous memory in another shape."""
        assert self.is_c_contiguous() and math.prod(shape) == self.size
        return DeviceView(self.owner, self.pointer, shape, contiguous_strides(shape, self.dtype.itemsize),
                          self.dtype, self.readonly, self.arrays, derive=(self, shape))

    def numba(self) -> Any:
        if self._numba is None:
            if self._derive is not None:
                parent, shape = self._derive
                self._numba = parent.numba().reshape(shape)
            else:
                # a zero-copy view (torch, CuPy); no wait for the stream the owner names, since
                # the call's kernels are queued on that same stream
                self._numba = cuda.as_cuda_array(self.owner, sync=False)
        return self._numba

    def extent(self) -> tuple[int, int]:
        """[start, end) of the bytes the view may touch."""
        if self.size == 0:
            return self.pointer, self.pointer
        low = sum(s * (n - 1) for s, n in zip(self.strides, self.shape) if s < 0)
        high = sum(s * (n - 1) for s, n in zip(self.strides, self.shape) if s > 0)
        return self.pointer + low, self.pointer + high + self.dtype.itemsize


_NUMPY_DTYPE_OF_TORCH: dict = {}


def _numpy_dtypes_of_torch() -> dict:
    if not _NUMPY_DTYPE_OF_TORCH:
        import torch

        for name in ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                     "uint64", "bool", "float16"):
            if hasattr(torch, name):
                _NUMPY_DTYPE_OF_TORCH[getattr(torch, name)] = np.dtype(name)
    return _NUMPY_DTYPE_OF_TORCH


def _describe_torch_tensor(owner: Any):
    """(pointer, shape, strides, dtype, readonly) of a torch tensor from its own attributes:
    torch's ``__cuda_array_interface__`` is Python code that costs several microseconds per
    tensor, on every call. None for anything else (and for dtypes NumPy does not have)."""
    if not type(owner).__module__.startswith("torch"):
        return None
    dtype = _numpy_dtypes_of_torch().get(owner.dtype)
    if dtype is None:
        return None
    strides = tuple(step * dtype.itemsize for step in owner.stride())
    return owner.data_ptr(), tuple(owner.shape), strides, dtype, False


# --------------------------------------------------------------------------- frameworks


class _NumbaMemory:
    """Arrays that are not torch's or CuPy's: Numba allocations, the ``stream=`` keyword."""

    name = "numba"

    def __init__(self, stream: Any):
        self.stream_handle, self.stream = _numba_stream(stream)

    def device_ordinal(self, like: Any) -> int:
        return 0 if _simulated() else cuda.get_current_device().id

    def empty(self, shape, dtype):
        return cuda.device_array(shape, dtype=dtype, stream=self.stream)

    def zeros(self, shape, dtype):
        return None  # filled by a kernel on the call's stream (see DeviceArrays.zeros)

    def flat(self, view):
        # rare (labels of three or more dimensions, strided): through the host
        host = np.ascontiguousarray(view.numba().copy_to_host(stream=self.stream)).reshape(-1)
        return cuda.to_device(host, stream=self.stream)



class _TorchMemory:
    name = "torch"

    def __init__(self, like: Any, stream: Any):
        import torch

        self.torch, self.device = torch, like.device
        current = torch.cuda.current_stream(self.device)
        self.stream_handle = _framework_stream(stream, int(current.cuda_stream), "torch.cuda.stream(...)")
        self.stream = _external_stream(self.stream_handle)

    def device_ordinal(self, like: Any) -> int:
        return self.device.index if self.device.index is not None else self.torch.cuda.current_device()

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=_torch_dtype(dtype), device=self.device)

    def zeros(self, shape, dtype):
        return self.torch.zeros(shape, dtype=_torch_dtype(dtype), device=self.device)

    def flat(self, view):
        return view.owner.reshape(-1)  # a copy on torch's current stream, from its allocator


def _torch_dtype(dtype) -> Any:
    for torch_dtype, numpy_dtype in _numpy_dtypes_of_torch().items():
        if numpy_dtype == dtype:
            return torch_dtype
    raise TypeError(f"torch has no dtype {np.dtype(dtype)}")


class _CupyMemory:
    name = "cupy"

    def __init__(self, like: Any, stream: Any):
        import cupy

        self.cupy, self.device_id = cupy, like.device.id
        current = cupy.cuda.get_current_stream()
        self.stream_handle = _framework_stream(stream, int(current.ptr), "with cupy.cuda.Stream(...)")
        self.stream = _external_stream(self.stream_handle)

    def device_ordinal(self, like: Any) -> int:
        return self.device_id

    def empty(self, shape, dtype):
        with self.cupy.cuda.Device(self.device_id):
            return self.cupy.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        with self.cupy.cuda.Device(self.device_id):
            return self.cupy.zeros(shape, dtype=dtype)

    def flat(self, view):
        with self.cupy.cuda.Device(self.device_id):
            return view.owner.reshape(-1)  # a copy on CuPy's current stream, from its pool


def _simulated() -> bool:
    return _SIMULATED


def _read_simulator_switch() -> bool:
    from numba.cuda import config

    return bool(config.ENABLE_CUDASIM)  # read by Numba once, when it is imported


_SIMULATED = _read_simulator_switch()


_streams: dict[int, Any] = {}


def _external_stream(handle: int) -> Any:
    """A Numba stream object for a ``CUstream`` handle (created once per handle)."""
    stream = _streams.get(handle)
    if stream is None:
        stream = cuda.default_stream() if handle == 0 or _simulated() else cuda.external_stream(handle)
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
        return 0, cuda.default_stream()
    if _simulated() and hasattr(stream, "synchronize"):
        return id(stream), stream  # the simulator's streams have no handle; it runs everything in order
    handle = stream_handle(stream)
    if _simulated() or not _is_numba_stream(stream):
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


def _memory_for(like: Any, stream: Any):
    framework = framework_of(like)
    if framework == "torch":
        return _TorchMemory(like, stream)
    if framework == "cupy":
        return _CupyMemory(like, stream)
    return _NumbaMemory(stream)


# --------------------------------------------------------------------------- one call's arrays


class DeviceArrays:
    """Conversion and inspection of one call's device arrays, the twin of ``HostArrays``;
    also where the call's stream, device, allocator and ``sync`` choice live."""

    name = "device"

    def __init__(self, like: Any, *, stream: Any = None, sync: bool = True):
        self.memory = _memory_for(like, stream)
        self.stream = self.memory.stream
        self.stream_handle = self.memory.stream_handle
        self.device_ordinal = self.memory.device_ordinal(like)
        self.sync = bool(sync)

    def asarray(self, x: Any, what: str) -> DeviceView:
        if isinstance(x, DeviceView):
            return x
        if is_device_array(x):
            return DeviceView.of(x, self)  # the caller's own memory, no copy
        host = np.ascontiguousarray(HostArrays.asarray(x, what))
        return DeviceView.of(cuda.to_device(host, stream=self.stream), self)

    @staticmethod
    def holds(x: Any) -> bool:
        return is_device_array(x)

    def flat_labels(self, labels: DeviceView) -> DeviceView:
        if labels.ndim == 1:
            return labels
        if labels.is_c_contiguous():
            return labels.reshape((labels.size,))
        return DeviceView.of(self.memory.flat(labels), self)  # rare: strided N-D labels

    @staticmethod
    def first_out_of_range(labels: DeviceView, num_classes: int) -> None:
        """Deferred: the range check runs on the device, in the call's first kernel (see
        ``centerkern.cuda.kernels``), so that the host never waits for the labels."""
        return None

    @staticmethod
    def as_label_vector(labels: DeviceView) -> DeviceView:
        return labels  # the kernels read any integer dtype, at any stride

    @staticmethod
    def contiguous(x: DeviceView) -> DeviceView:
        return x  # the kernels index with strides; copying would cost more than it saves

    @staticmethod
    def is_writable(x: DeviceView) -> bool:
        return not x.readonly

    @staticmethod
    def strides(x: DeviceView) -> tuple[int, ...]:
        return x.strides

    @staticmethod
    def same_memory(a: DeviceView, b: DeviceView) -> bool:
        return a.pointer == b.pointer and a.shape == b.shape and a.strides == b.strides

    @staticmethod
    def may_share_memory(a: DeviceView, b: DeviceView) -> bool:
        start_a, end_a = a.extent()
        start_b, end_b = b.extent()
        return start_a < end_b and start_b < end_a

    def empty(self, shape: tuple[int, ...], dtype) -> DeviceView:
        view = DeviceView.of(self.memory.empty(tuple(shape), np.dtype(dtype)), self)
        view.fresh = True
        return view

    def zeros(self, shape: tuple[int, int], dtype) -> DeviceView:
        owner = self.memory.zeros(tuple(shape), np.dtype(dtype))
        if owner is None:
            from . import driver

            view = self.empty(shape, dtype)
            driver.fill(view, 0, self)
            return view
        view = DeviceView.of(owner, self)
        view.fresh = True
        return view

    def copy(self, x: DeviceView) -> DeviceView:
        from . import driver

        out = self.empty(x.shape, x.dtype)
        driver.copy(x, out)
        return out

    def new_loss(self) -> DeviceView:
        """A float64 0-d array of the caller's framework (the view's owner, given back to the
        caller), seen by the kernels as a vector of one."""
        return DeviceView.of(self.memory.empty((), np.dtype(np.float64)), self).reshape((1,))
