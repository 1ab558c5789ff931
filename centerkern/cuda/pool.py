"""centerkern's own stream-ordered memory pool, one per device: the memory of Numba arrays' calls.

Results of calls on Numba device arrays, and the temporaries of those calls, are allocated here
with ``cuMemAllocFromPoolAsync`` on the call's stream and given back with ``cuMemFreeAsync``:
a temporary once the call has queued its kernels, a result when the caller drops it (the
finalizer of its Numba array). Neither waits for the device, as the synchronous ``cuMemAlloc``
and ``cuMemFree`` of Numba's own allocations do. The pool is centerkern's own, so that another
library's settings of the device's default pool (its release threshold) never make a step wait,
and its blocks are never shared with that library; it keeps freed memory for reuse.
"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import Any

from .views import bindings, driver_stream

_pools: dict[int, Any] = {}
_making_a_pool = threading.Lock()  # two threads must not each make one for a device


def _check(error: Any, what: str) -> None:
    if error != 0:
        raise MemoryError(f"{what} failed: {getattr(error, 'name', error)}")


def _private_pool(device_ordinal: int) -> Any:
    """centerkern's own stream-ordered memory pool on the device, made on first use (the caller
    holds the device's context current, with capture relaxed)."""
    with _making_a_pool:
        return _pools.get(device_ordinal) or _make_pool(device_ordinal)


def _make_pool(device_ordinal: int) -> Any:
    cuda_driver = bindings()
    properties = cuda_driver.CUmemPoolProps()
    properties.allocType = cuda_driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    properties.handleTypes = cuda_driver.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
    properties.location.type = cuda_driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    properties.location.id = device_ordinal
    error, pool = cuda_driver.cuMemPoolCreate(properties)
    _check(error, f"cuMemPoolCreate on device {device_ordinal}")
    keep_everything = cuda_driver.cuuint64_t(2**64 - 1)  # freed memory stays in the pool for reuse
    _check(cuda_driver.cuMemPoolSetAttribute(
        pool, cuda_driver.CUmemPool_attribute.CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, keep_everything)[0],
        "cuMemPoolSetAttribute")
    _pools[device_ordinal] = pool
    return pool


def allocate(size: int, device_ordinal: int, stream_handle: int) -> int:
    pool = _pools.get(device_ordinal) or _private_pool(device_ordinal)
    error, pointer = bindings().cuMemAllocFromPoolAsync(max(1, size), pool, driver_stream(stream_handle))
    if error != 0:
        _check(error, f"cuMemAllocFromPoolAsync of {size} bytes on stream {stream_handle:#x}")
    return int(pointer)


def _free_in_stream_order(pointer: int, stream_handle: int) -> None:
    """Give memory back to its pool after the work queued on ``stream_handle``."""
    error = bindings().cuMemFreeAsync(pointer, driver_stream(stream_handle))[0]
    if error != 0 and error != _DEINITIALIZED:  # (the driver shutting down frees everything itself)
        warnings.warn(f"cuMemFreeAsync of device memory at {pointer:#x} failed ({getattr(error, 'name', error)}): "
                      "the memory stays allocated", RuntimeWarning, stacklevel=2)


class PooledBlock:
    """A temporary from the private pool: raw memory with an array interface, given back in stream
    order by ``release``."""

    def __init__(self, size: int, device_ordinal: int, stream_handle: int):
        self.pointer = allocate(size, device_ordinal, stream_handle)
        self.stream_handle = stream_handle
        self.__cuda_array_interface__ = {"shape": (max(1, size),), "typestr": "|u1", "strides": None,
                                         "data": (self.pointer, False), "version": 3, "stream": None}

    def release(self) -> None:
        if self.pointer is not None:
            _free_in_stream_order(self.pointer, self.stream_handle)
            self.pointer = None


class ResultBlock:
    """The pool's memory of one Numba result, given back when the result is dropped: the owner of
    its Numba ``MemoryPointer``, freed by ``__del__`` (cheaper than Numba's finalizer, and never
    run at exit, where the driver frees everything itself).

    It frees in the context the result was made in (pushed for the free where another is current,
    or none: a result may be dropped in another thread), after the work queued before it on the
    stream the result was made on: for Numba's default streams (the legacy one, or a per-thread
    one, which may be another thread's) the legacy stream, which waits for every blocking
    stream's work; for a stream of the caller's, that stream, which must therefore outlive the
    results made on it."""

    __slots__ = ("pointer", "stream_handle", "context")

    def __init__(self, size: int, device_ordinal: int, stream_handle: int, context: Any):
        self.pointer = allocate(size, device_ordinal, stream_handle)
        self.context = context
        self.stream_handle = 0 if stream_handle in _DEFAULT_STREAM_HANDLES else stream_handle

    def free(self) -> None:
        pointer, self.pointer = self.pointer, None
        if pointer is None:
            return
        cuda_driver = bindings()
        # most often dropped where it was made, its context current: pushed only where it is not
        pushed = (int(cuda_driver.cuCtxGetCurrent()[1]) != int(self.context)
                  and cuda_driver.cuCtxPushCurrent(self.context)[0] == 0)
        try:
            _free_in_stream_order(pointer, self.stream_handle)
        finally:
            if pushed:
                cuda_driver.cuCtxPopCurrent()

    def __del__(self) -> None:
        if not sys.is_finalizing():
            self.free()


_DEFAULT_STREAM_HANDLES = (0, 1, 2)  # the NULL stream, CU_STREAM_LEGACY, CU_STREAM_PER_THREAD
_DEINITIALIZED = 4  # CUDA_ERROR_DEINITIALIZED
