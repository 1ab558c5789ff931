"""Device arrays as the kernels see them: pointer, shape, strides and dtype, read once; and the
CUDA driver's bindings, with the stream handles they take.

The bottom of the ``cuda`` package: it imports nothing of the package, and the launcher, the
frameworks' memory, the pool and the driver all build on it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from .._core.interop import Owned


def _read_simulator_switch() -> bool:
    from numba.cuda import config

    return bool(config.ENABLE_CUDASIM)  # read by Numba once, when it is imported


SIMULATED = _SIMULATED = _read_simulator_switch()  # constant for the process: read it, not simulated(), in hot paths


def simulated() -> bool:
    """Whether Numba runs its CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) instead of a GPU."""
    return _SIMULATED


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

    __slots__ = ("pointer", "shape", "strides", "dtype", "readonly", "arrays", "fresh", "cleared", "size", "_numba",
                 "_derive", "_extent", "_contiguous")

    def __init__(self, owner, pointer, shape: tuple, strides: tuple, dtype, readonly, arrays, derive=None):
        self.owner = owner
        self.pointer, self.shape, self.strides = pointer, shape, strides
        self.dtype, self.readonly, self.arrays = dtype, readonly, arrays
        self.size = math.prod(self.shape)
        self.fresh = False  # allocated by the backend for this call's results, not the caller's memory
        self.cleared = False  # a fresh result the call zeroes (see DeviceArrays.zeros)
        self._numba, self._derive, self._extent = None, derive, None
        self._contiguous = None  # C-contiguous: None where not known yet

    @classmethod
    def contiguous(cls, owner: Any, pointer: int, shape: tuple[int, ...], dtype: np.dtype, arrays: Any,
                   fresh: bool = False) -> "DeviceView":
        """A C-contiguous array of the backend's own making, whose layout it knows already."""
        view = cls(owner, pointer, shape, contiguous_strides(shape, dtype.itemsize), dtype, False, arrays)
        view.fresh, view._contiguous = fresh, True
        return view

    @classmethod
    def of(cls, owner: Any, arrays: Any) -> "DeviceView":
        described = _describe_torch_tensor(owner)
        if described is not None:
            *described, contiguous = described
            view = cls(owner, *described, arrays)
            view._contiguous = contiguous
            return view
        described = _describe_numba_array(owner)
        if described is not None:
            return cls(owner, *described, arrays)
        interface = _interface(owner)
        dtype = np.dtype(interface["typestr"])
        shape = tuple(interface["shape"])
        strides = tuple(interface.get("strides") or contiguous_strides(shape, dtype.itemsize))
        pointer, readonly = interface["data"]
        return cls(owner, pointer, shape, strides, dtype, bool(readonly), arrays)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def is_c_contiguous(self) -> bool:
        if self._contiguous is None:
            self._contiguous = self.size == 0 or self.strides == contiguous_strides(self.shape, self.dtype.itemsize)
        return self._contiguous

    def reshape(self, shape: tuple[int, ...]) -> "DeviceView":
        """The same contiguous memory in another shape."""
        assert math.prod(shape) == self.size
        return self.part(0, shape, self.dtype)

    def part(self, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> "DeviceView":
        """The ``dtype`` array of ``shape`` at byte ``offset`` of this contiguous array: one
        allocation carved into a call's temporaries."""
        dtype = np.dtype(dtype)
        view = DeviceView(self.owner, self.pointer + offset, shape, contiguous_strides(shape, dtype.itemsize), dtype,
                          self.readonly, self.arrays, derive=(self, offset, shape))
        view._contiguous = True
        return view

    def origin(self) -> tuple["DeviceView", int]:
        """The array this view was carved from (itself, if none), and its byte offset in it."""
        if self._derive is None:
            return self, 0
        parent, offset, _ = self._derive
        root, start = parent.origin()
        return root, start + offset

    def numba(self) -> Any:
        if self._numba is None:
            if self._derive is not None:
                parent, offset, shape = self._derive
                flat = parent.numba().reshape(-1).view(np.uint8)
                size = math.prod(shape) * self.dtype.itemsize
                self._numba = flat[offset:offset + size].view(self.dtype).reshape(shape)
            elif getattr(self.owner, "__cuda_ndarray__", False):
                self._numba = self.owner  # a Numba device array already (the simulator's are, too)
            else:
                # a zero-copy view (torch, CuPy); no wait for the stream the owner names, since
                # the call's kernels are queued on that same stream
                self._numba = cuda.as_cuda_array(self.owner, sync=False)
            if self._numba.shape != self.shape:  # a 0-d owner seen as a vector of one (a loss)
                self._numba = self._numba.reshape(self.shape)
        return self._numba

    def extent(self) -> tuple[int, int]:
        """[start, end) of the bytes the view may touch."""
        if self._extent is None:
            if self.size == 0:
                self._extent = self.pointer, self.pointer
            elif self._contiguous:
                self._extent = self.pointer, self.pointer + self.size * self.dtype.itemsize
            else:
                low = high = 0
                for stride, length in zip(self.strides, self.shape):
                    if stride < 0:
                        low += stride * (length - 1)
                    else:
                        high += stride * (length - 1)
                self._extent = self.pointer + low, self.pointer + high + self.dtype.itemsize
        return self._extent


_NUMPY_DTYPE_OF_TORCH: dict = {}


def numpy_dtypes_of_torch() -> dict:
    if not _NUMPY_DTYPE_OF_TORCH:
        import torch

        for name in ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                     "uint64", "bool", "float16"):
            if hasattr(torch, name):
                _NUMPY_DTYPE_OF_TORCH[getattr(torch, name)] = np.dtype(name)
    return _NUMPY_DTYPE_OF_TORCH


def data_pointer(owner: Any) -> int:
    """The device address of a fresh array of the backend's own (a torch tensor, a CuPy or Numba
    array, a pooled block)."""
    if hasattr(owner, "data_ptr"):
        return owner.data_ptr()
    pointer = getattr(owner, "pointer", None)  # a block of the pool
    if pointer is not None:
        return pointer
    if getattr(owner, "__cuda_ndarray__", False) and not _SIMULATED:
        return owner.device_ctypes_pointer.value or 0
    pointer = getattr(getattr(owner, "data", None), "ptr", None)  # a CuPy array's memory
    if isinstance(pointer, int):
        return pointer
    return _interface(owner)["data"][0]


def _describe_torch_tensor(owner: Any):
    """(pointer, shape, strides, dtype, readonly) of a torch tensor from its own attributes:
    torch's ``__cuda_array_interface__`` is Python code that costs several microseconds per
    tensor, on every call. None for anything else (and for dtypes NumPy does not have)."""
    if not type(owner).__module__.startswith("torch"):
        return None
    dtype = (_NUMPY_DTYPE_OF_TORCH or numpy_dtypes_of_torch()).get(owner.dtype)
    if dtype is None:
        return None
    itemsize = dtype.itemsize
    return (owner.data_ptr(), tuple(owner.shape), tuple([step * itemsize for step in owner.stride()]), dtype, False,
            owner.is_contiguous())


_NUMBA_DEVICE_ARRAY = None


def _describe_numba_array(owner: Any):
    """The same of a Numba device array (a GPU's, not the simulator's), from its attributes:
    its ``__cuda_array_interface__`` property builds a dictionary on every read."""
    global _NUMBA_DEVICE_ARRAY
    if _SIMULATED:
        return None
    if _NUMBA_DEVICE_ARRAY is None:
        from numba.cuda.cudadrv.devicearray import DeviceNDArray

        _NUMBA_DEVICE_ARRAY = DeviceNDArray
    if type(owner) is not _NUMBA_DEVICE_ARRAY:
        return None
    return owner.device_ctypes_pointer.value or 0, owner.shape, owner.strides, owner.dtype, False


# --------------------------------------------------------------------------- the driver's bindings

_bindings = None


def bindings():
    """``cuda.bindings.driver``, imported once (an import statement in a function costs each call)."""
    global _bindings
    if _bindings is None:
        from cuda.bindings import driver

        _bindings = driver
    return _bindings


_driver_streams: dict[int, Any] = {}


def made_once(cache: dict, key: Any, make) -> Any:
    """``cache[key]``, made by ``make()`` the first time; the cache is emptied at 256 entries, so
    that a program making streams (or shapes) without end does not grow it without end."""
    made = cache.get(key)
    if made is None:
        if len(cache) >= 256:
            cache.clear()
        made = cache[key] = make()
    return made


def driver_stream(handle: int) -> Any:
    """The ``CUstream`` object of a handle, made once per handle (a wrapper that owns nothing)."""
    stream = _driver_streams.get(handle)  # (the common case, without a call)
    return stream if stream is not None else made_once(_driver_streams, handle, lambda: bindings().CUstream(handle))
