"""Device arrays, streams and allocation, per framework.

A call on device arrays is one more piece of work queued on the caller's GPU stream, with memory
from the caller's allocator, like any op of the caller's framework:

========== =========================================== ==========================================
framework  stream                                      results, and the call's temporaries
========== =========================================== ==========================================
torch      ``torch.cuda.current_stream(device)``       torch's caching allocator (current stream)
CuPy       the current stream of the array's device    CuPy's memory pool (that stream)
other      ``stream=`` (a Numba stream or a            results: Numba (``cuda.device_array``);
           ``CUstream`` handle); Numba's default       temporaries: the device's stream-ordered
                                                       pool (``cuMemAllocAsync``/``FreeAsync``)
========== =========================================== ==========================================

Temporaries are made per call and given back when the call has queued its kernels: torch's and
CuPy's allocators hand a block given back on a stream only to later work on that same stream,
and a stream-ordered free waits for the work queued before it. So calls share no memory, on one
stream or several, from one host thread or several.

``DeviceArrays`` is the twin of ``validation.HostArrays``: the same methods, for one call's
device arrays, plus the call's stream, device and ``sync`` choice.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import numpy as np
from numba import cuda

from .._core.interop import framework_of
from .._core.interop import is_device_array
from .._core.validation import HostArrays
from . import kernels
from .launcher import prepare
from .views import DeviceView, numpy_dtypes_of_torch, simulated

GRID_STRIDE_BLOCKS = 1024  # blocks for the 1-D grid-stride kernels
THREADS_1D = 256
ROW_BLOCKS = 8192  # most blocks along the rows (or tiles) of the 2-D grid-stride kernels


def grid_1d(size: int) -> int:
    return max(1, min(GRID_STRIDE_BLOCKS, math.ceil(size / THREADS_1D)))


def launch_1d(size: int) -> tuple[int, int]:
    """(grid, block) of a 1-D grid-stride kernel over ``size`` items."""
    return grid_1d(size), THREADS_1D


def row_threads(width: int) -> int:
    return max(1, min(kernels.COLUMNS_PER_BLOCK, width))


def row_blocks(rows: int) -> int:
    return max(1, min(ROW_BLOCKS, rows))


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

    error, status = cuda_driver.cuStreamIsCapturing(cuda_driver.CUstream(handle))
    if error != cuda_driver.CUresult.CUDA_SUCCESS:  # e.g. the legacy stream while another captures
        raise RuntimeError(f"cannot queue work on stream {handle:#x}: {error.name}")
    return status != cuda_driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE


# --------------------------------------------------------------------------- frameworks


class _StreamOrderedBuffer:
    """Device memory of the current device's stream-ordered pool (``cuMemAllocAsync``), made and
    given back on one stream: no host wait either way, and legal under graph capture."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, handle: int):
        from cuda.bindings import driver as cuda_driver

        self._driver, self._stream = cuda_driver, cuda_driver.CUstream(handle)
        size = max(1, math.prod(shape) * dtype.itemsize)
        error, pointer = cuda_driver.cuMemAllocAsync(size, self._stream)
        if error != cuda_driver.CUresult.CUDA_SUCCESS:
            raise MemoryError(f"cuMemAllocAsync of {size} bytes on stream {handle:#x} failed: {error.name}")
        self._pointer = pointer
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": dtype.str, "strides": None,
                                         "data": (int(pointer), False), "version": 3, "stream": None}

    def release(self) -> None:
        if self._pointer is not None:
            self._driver.cuMemFreeAsync(self._pointer, self._stream)  # after the work queued on the stream
            self._pointer = None


class _NumbaMemory:
    """Arrays that are not torch's or CuPy's: Numba allocations, the ``stream=`` keyword."""

    name = "numba"

    def __init__(self, like: Any, stream: Any):
        self.stream_handle, self.stream = _numba_stream(stream)
        self.device_ordinal = 0 if simulated() else cuda.get_current_device().id
        self.pooled: list[_StreamOrderedBuffer] = []

    def empty(self, shape, dtype):
        return cuda.device_array(shape, dtype=dtype, stream=self.stream)

    def temporary(self, shape, dtype):
        if simulated():  # the simulator's memory is NumPy's
            return cuda.device_array(shape, dtype=dtype, stream=self.stream)
        buffer = _StreamOrderedBuffer(shape, dtype, self.stream_handle)
        self.pooled.append(buffer)
        return buffer

    def zeros(self, shape, dtype):
        return None  # filled by a kernel on the call's stream (see DeviceArrays.zeros)

    def release(self) -> None:
        for buffer in self.pooled:
            buffer.release()
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
        current = torch.cuda.current_stream(self.device)
        self.stream_handle = _framework_stream(stream, int(current.cuda_stream), "torch.cuda.stream(...)")
        self.stream = _external_stream(self.stream_handle)
        self.device_ordinal = self.device.index if self.device.index is not None else torch.cuda.current_device()

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=_torch_dtype(dtype), device=self.device)

    temporary = empty  # given back to the caching allocator when the call drops it

    def zeros(self, shape, dtype):
        return self.torch.zeros(shape, dtype=_torch_dtype(dtype), device=self.device)

    def release(self) -> None:
        pass

    def from_host(self, host):
        return self.torch.as_tensor(host, device=self.device)  # copied on torch's current stream

    def flat(self, view):
        return view.owner.reshape(-1)  # a copy on torch's current stream, from its allocator


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

    def _on_device(self):
        return self.cupy.cuda.Device(self.device_ordinal)  # and with it, that device's current stream

    def empty(self, shape, dtype):
        with self._on_device():
            return self.cupy.empty(shape, dtype=dtype)

    temporary = empty  # given back to CuPy's pool when the call drops it

    def zeros(self, shape, dtype):
        with self._on_device():
            return self.cupy.zeros(shape, dtype=dtype)

    def release(self) -> None:
        pass

    def from_host(self, host):
        with self._on_device():
            return self.cupy.asarray(host)

    def flat(self, view):
        with self._on_device():
            return view.owner.reshape(-1)  # a copy on CuPy's current stream, from its pool


def _memory_for(like: Any, stream: Any):
    framework = framework_of(like)
    if framework == "torch":
        return _TorchMemory(like, stream)
    if framework == "cupy":
        return _CupyMemory(like, stream)
    return _NumbaMemory(like, stream)


# --------------------------------------------------------------------------- one call's arrays


class DeviceArrays:
    """Conversion and inspection of one call's device arrays (what the host inputs' checks do,
    for device arrays); also where the call's stream, device, allocator and ``sync`` choice live.

    ``centerkern.center_loss`` and its siblings make one for each call on device arrays, from
    the first device array among the inputs, and check and convert every input with it
    (``asarray``): the arrays the backend functions of ``centerkern.cuda`` then receive are its
    ``DeviceView`` objects, which keep a call's results on the device and, with ``sync=False``,
    let the call return without waiting for the GPU.

    Parameters
    ----------
    like : array or None
        A device array of the call. Its framework decides the stream and the allocator: for a
        torch tensor, torch's current stream and caching allocator; for a CuPy array, CuPy's
        current stream and memory pool; for other arrays (Numba's) and for None, ``stream``,
        Numba's allocations for results and the device's stream-ordered pool for temporaries.
    stream : None, Numba stream or int, optional
        For arrays that are not torch's or CuPy's: the stream to queue the call's kernels on, a
        Numba stream or an integer ``CUstream`` handle; None (the default) is Numba's default
        stream. For torch tensors and CuPy arrays it may only name their framework's current
        stream.
    sync : bool, optional
        Whether the call waits for the GPU and raises a bad label's ``IndexError`` itself (True,
        the default), or returns at once (see ``centerkern.center_loss``).

    Attributes
    ----------
    name : str
        ``"device"``: where the arrays live, as the validation's messages name it.
    stream : Numba stream
        The call's stream.
    stream_handle : int
        Its ``CUstream`` handle.
    device_ordinal : int
        The device of the arrays.
    sync : bool
        The ``sync`` choice.
    capturing : bool
        Whether the stream is under CUDA graph capture.

    Raises
    ------
    ValueError
        If ``stream`` names another stream than the current one of the torch tensors or CuPy
        arrays, or the stream is under CUDA graph capture and ``sync`` is True or the arrays are
        Numba's (whose allocations a capture cannot make).
    TypeError
        If ``stream`` is neither a stream nor an integer handle.
    RuntimeError
        If the stream cannot take work (the driver cannot tell whether it is capturing: the
        legacy default stream while another stream captures, say).

    See Also
    --------
    centerkern.center_loss : Where its ``stream`` and ``sync`` choices come from.

    Examples
    --------
    This needs a CUDA GPU, or Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).

    >>> import numpy as np
    >>> from numba import cuda
    >>> import centerkern.cuda
    >>> centers = cuda.to_device(np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]))
    >>> arrays = centerkern.cuda.DeviceArrays(centers)
    >>> arrays.name, arrays.sync
    ('device', True)
    >>> arrays.holds(centers), arrays.holds(np.zeros(3))
    (True, False)

    ``asarray`` takes a device array as it is (the caller's memory, no copy) and copies a host
    array to the device; the backend functions keep results of such views on the device:

    >>> centers_view = arrays.asarray(centers, "centers")
    >>> centers_view.shape, centers_view.dtype
    ((3, 2), dtype('float64'))
    >>> labels_view = arrays.asarray(np.array([2, 0]), "labels")
    >>> rows = centerkern.cuda.gather_centers(centers_view, labels_view)
    >>> rows.numba().copy_to_host().tolist()
    [[4.0, 5.0], [0.0, 1.0]]
    """

    name = "device"

    def __init__(self, like: Any, *, stream: Any = None, sync: bool = True):
        self.memory = _memory_for(like, stream)
        self.stream = self.memory.stream
        self.stream_handle = self.memory.stream_handle
        self.device_ordinal = self.memory.device_ordinal
        self.sync = bool(sync)
        # Numba's current device may differ from the arrays' (torch's current device is its own)
        self._elsewhere = not simulated() and cuda.get_current_device().id != self.device_ordinal
        self.capturing = is_capturing(self.stream_handle)
        if self.capturing and self.sync:
            raise ValueError("sync=True waits for the GPU, which a stream under CUDA graph capture cannot; "
                             "pass sync=False to capture this call")
        if self.capturing and self.memory.name == "numba":
            raise ValueError(
                "a call on Numba device arrays cannot be captured in a CUDA graph: its results are Numba "
                "allocations (cuMemAlloc), which a capture cannot make; capture calls on torch tensors or CuPy "
                "arrays, whose allocators serve graphs"
            )

    def device_context(self):
        """Numba's context for the device of the call's arrays: kernels are bound, and Numba and
        the stream-ordered pool allocate, in the current context."""
        return cuda.gpus[self.device_ordinal] if self._elsewhere else nullcontext()

    def asarray(self, x: Any, what: str) -> DeviceView:
        """``x`` as a ``DeviceView``: a device array as it is (no copy), a host array copied to
        the device on the call's stream; ``what`` names it in error messages."""
        if isinstance(x, DeviceView):
            return x
        if is_device_array(x):
            return DeviceView.of(x, self)  # the caller's own memory, no copy
        host = np.ascontiguousarray(HostArrays.asarray(x, what))
        if self.capturing:
            raise ValueError(
                f"{what} is a host array, and a copy to the device cannot be captured in a CUDA graph (it waits "
                f"for the host's memory): move {what} to the device before capturing"
            )
        with self.device_context():
            return DeviceView.of(self.memory.from_host(host), self)

    @staticmethod
    def holds(x: Any) -> bool:
        """Whether ``x`` lives in device memory, where this backend computes."""
        return is_device_array(x)

    def flat_labels(self, labels: DeviceView) -> DeviceView:
        """The labels as a vector (a contiguous array reshaped; rare strided N-D labels copied)."""
        if labels.ndim == 1:
            return labels
        if labels.is_c_contiguous():
            return labels.reshape((labels.size,))
        if self.capturing and self.memory.name == "numba":
            raise ValueError("strided labels of two or more dimensions are flattened through the host, which a "
                             "stream under CUDA graph capture cannot do: pass contiguous labels")
        with self.device_context():
            return DeviceView.of(self.memory.flat(labels), self)  # rare: strided N-D labels

    @staticmethod
    def first_out_of_range(labels: DeviceView, num_classes: int) -> None:
        """Deferred: the range check runs on the device, in the call's first kernel (see
        ``centerkern.cuda.kernels``), so that the host never waits for the labels."""
        return None

    @staticmethod
    def as_label_vector(labels: DeviceView) -> DeviceView:
        """The labels as they are: no cast, no copy."""
        return labels  # the kernels read any integer dtype, at any stride

    @staticmethod
    def contiguous(x: DeviceView) -> DeviceView:
        """``x`` as it is, whatever its strides."""
        return x  # the kernels index with strides; copying would cost more than it saves

    @staticmethod
    def is_writable(x: DeviceView) -> bool:
        """Whether ``x`` may be written (its array interface does not say read-only)."""
        return not x.readonly

    @staticmethod
    def strides(x: DeviceView) -> tuple[int, ...]:
        """The strides of ``x``, in bytes."""
        return x.strides

    @staticmethod
    def same_memory(a: DeviceView, b: DeviceView) -> bool:
        """Whether ``a`` and ``b`` are the same array: same pointer, shape and strides."""
        return a.pointer == b.pointer and a.shape == b.shape and a.strides == b.strides

    @staticmethod
    def may_share_memory(a: DeviceView, b: DeviceView) -> bool:
        """Whether the byte ranges ``a`` and ``b`` may touch overlap."""
        start_a, end_a = a.extent()
        start_b, end_b = b.extent()
        return start_a < end_b and start_b < end_a

    # ----------------------------------------------------------------------- memory of the call

    def empty(self, shape: tuple[int, ...], dtype) -> DeviceView:
        """A result: the caller's framework's array, which the caller gets back."""
        with self.device_context():
            view = DeviceView.of(self.memory.empty(tuple(shape), np.dtype(dtype)), self)
        view.fresh = True
        return view

    def zeros(self, shape: tuple[int, ...], dtype) -> DeviceView:
        """A zeroed result, like ``empty`` (zeroed by a kernel on the call's stream where the
        framework has no zeros of its own)."""
        with self.device_context():
            owner = self.memory.zeros(tuple(shape), np.dtype(dtype))
        if owner is None:
            view = self.empty(shape, dtype)
            self.fill(view, 0)
            return view
        view = DeviceView.of(owner, self)
        view.fresh = True
        return view

    def temporary(self, shape: tuple[int, ...], dtype, zeroed: bool = False) -> DeviceView:
        """Memory for this call alone (see the module docstring); call ``release`` once the call's
        kernels are queued. The caller's device context must be current."""
        dtype = np.dtype(dtype)
        if zeroed:
            owner = self.memory.zeros(tuple(shape), dtype)
            if owner is not None:
                return DeviceView.of(owner, self)
        view = DeviceView.of(self.memory.temporary(tuple(shape), dtype), self)
        if zeroed:
            self.fill(view, 0)
        return view

    def release(self) -> None:
        """Give the call's temporaries back, in stream order (torch's and CuPy's go when dropped)."""
        self.memory.release()

    def copy(self, x: DeviceView) -> DeviceView:
        """A fresh copy of ``x``, made before the call's label check (validation's copies of an
        input that overlaps the output)."""
        out = self.empty(x.shape, x.dtype)
        with self.device_context():
            if x.ndim == 1:
                prepare(kernels.copy_vector, *launch_1d(x.size), self, x, out)()
            else:
                prepare(kernels.copy_matrix, row_blocks(x.shape[0]), row_threads(x.shape[1]), self, x, out)()
        return out

    def fill(self, view: DeviceView, value) -> None:
        """Fill an array of the backend's own, on the call's stream."""
        with self.device_context():
            if view.ndim == 1:
                prepare(kernels.fill_vector, *launch_1d(view.size), self, view, value)()
            else:
                prepare(kernels.fill_rows, row_blocks(view.shape[0]), row_threads(view.shape[1]), self, view,
                        value)()

    def new_loss(self) -> DeviceView:
        """A float64 0-d array of the caller's framework (the view's owner, given back to the
        caller), seen by the kernels as a vector of one."""
        with self.device_context():
            return DeviceView.of(self.memory.empty((), np.dtype(np.float64)), self).reshape((1,))
