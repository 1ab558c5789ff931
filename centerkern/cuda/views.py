"""Device arrays as the kernels see them: pointer, shape, strides and dtype, read once.

The bottom of the ``cuda`` package: it imports nothing of the package, and the launcher, the
frameworks' memory (``arrays``) and the driver all build on it.
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


_SIMULATED = _read_simulator_switch()


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
    def of(cls, owner: Any, arrays: Any) -> "DeviceView":
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
        assert math.prod(shape) == self.size
        return self.part(0, shape)

    def part(self, start: int, shape: tuple[int, ...]) -> "DeviceView":
        """Elements ``start`` to ``start + prod(shape)`` of this contiguous array, in ``shape``:
        one allocation carved into several of a call's temporaries."""
        assert self.is_c_contiguous() and start + math.prod(shape) <= self.size
        return DeviceView(self.owner, self.pointer + start * self.dtype.itemsize, shape,
                          contiguous_strides(shape, self.dtype.itemsize), self.dtype, self.readonly, self.arrays,
                          derive=(self, start, shape))

    def numba(self) -> Any:
        if self._numba is None:
            if self._derive is not None:
                parent, start, shape = self._derive
                self._numba = parent.numba().reshape(-1)[start:start + math.prod(shape)].reshape(shape)
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


def numpy_dtypes_of_torch() -> dict:
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
    dtype = numpy_dtypes_of_torch().get(owner.dtype)
    if dtype is None:
        return None
    strides = tuple(step * dtype.itemsize for step in owner.stride())
    return owner.data_ptr(), tuple(owner.shape), strides, dtype, False
