"""Launching the compiled kernels on a stream, with as little host work as a launch allows.

Numba's own launch path (``kernel[grid, block, stream](*args)``) types every argument, wraps every
array in a device-array object and flattens it into kernel parameters on every call: tens of
microseconds per kernel. Here a call's kernels are described once per *launch signature* (the
shapes, strides and dtypes of its arrays, its scalars, its device context) as a ``LaunchPlan``:
the driver's handle of each compiled kernel, its grid, and its kernel parameters already laid
out as Numba's calling convention expects them (an array is meminfo, parent, item count, item
size, data pointer, shape, strides in bytes; a named tuple of scalars, ``RuleCoefficients`` or
``StepSettings``, its members in order), one 8-byte cell each, with an array of pointers to the
cells for ``cuLaunchKernel``. A later call with the same signature writes only its arrays' data
pointers into their cells (an array used by several kernels has one cell, shared) and calls
``cuLaunchKernel`` once per kernel, which copies the parameters as it queues the launch.

A plan's cells are rewritten by every call, so each host thread has plans of its own. One
compiled kernel serves every layout (all arrays are typed with layout "A": the kernels index with
strides); its handle is kept per device context, so that a context made again (after
``numba.cuda.close()``) loads its kernels again instead of launching freed ones.

Where that path cannot be set up (Numba's CUDA simulator has no driver; a numba-cuda whose
internals differ), launches go through Numba's own path, with the same kernels and arguments;
``launch_path()`` says which is in use, and ``CENTERKERN_CUDA_LAUNCH=numba`` in the environment
asks for Numba's path. ``@cuda.jit`` in ``kernels.py`` stays the only place kernels are written.
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import numpy as np
from numba import types
from numba.cuda.np import numpy_support

from .views import DeviceView, bindings, driver_stream, simulated

_DIRECT = "direct (compiled kernel handle, cuLaunchKernel)"
_path = {"name": None, "why": ""}


def launch_path() -> str:
    """Which launch path this process uses, and why, for ``python -m centerkern info``.

    Two paths: ``direct (compiled kernel handle, cuLaunchKernel)`` on a GPU with numba-cuda's
    ``cuda.bindings``; else ``numba dispatcher`` (Numba's own ``kernel[grid, block, stream](...)``),
    followed by the reason in parentheses: the CUDA simulator, ``CENTERKERN_CUDA_LAUNCH=numba``
    in the environment, or a numba-cuda without what the direct path needs. The path is chosen
    at the first launch of the process (or the first call of this function); the direct one
    gives way to Numba's where it cannot be set up for a kernel. Both launch the same kernels
    with the same arguments, and give the same results.

    Returns
    -------
    str
        The path's name, and why it was chosen where it is not the direct one.

    Examples
    --------
    This needs Numba's CUDA target (with a CUDA GPU, or Numba's CUDA simulator,
    ``NUMBA_ENABLE_CUDASIM=1``).

    >>> import centerkern.cuda
    >>> path = centerkern.cuda.launch_path()
    >>> path.startswith(("direct", "numba dispatcher"))
    True
    """
    if _path["name"] is None:
        _choose_path()
    return _path["name"] + (f" ({_path['why']})" if _path["why"] else "")


def _choose_path() -> None:
    if simulated():
        _path.update(name="numba dispatcher", why="the CUDA simulator has no driver to launch with")
        return
    if os.environ.get("CENTERKERN_CUDA_LAUNCH") == "numba":
        _path.update(name="numba dispatcher", why="asked for by CENTERKERN_CUDA_LAUNCH=numba")
        return
    try:
        from cuda.bindings import driver  # shipped with numba-cuda
    except ImportError as error:
        _path.update(name="numba dispatcher", why=f"cuda.bindings unavailable: {error}")
        return
    _path.update(name=_DIRECT, why="")


def is_direct() -> bool:
    """Whether calls launch through plans (the direct path)."""
    if _path["name"] is None:
        _choose_path()
    return _path["name"] == _DIRECT


def _fall_back(reason: str) -> None:
    _path.update(name="numba dispatcher", why=reason)


_NOTHING_TO_RELAX = nullcontext()


def setup_under_capture(capturing: bool):
    """One-time setup of a call under CUDA graph capture (Numba's context, loading a kernel's
    module, making the device's error record or memory pool): this thread's capture mode is
    relaxed while it runs, since such setup touches no stream but is among the calls that global
    capture mode forbids. Nothing queued on the capturing stream is affected. (Without capture,
    a context that does nothing, made once.)"""
    if not capturing or simulated():
        return _NOTHING_TO_RELAX
    return _relaxed_capture_mode()


@contextmanager
def _relaxed_capture_mode():
    from cuda.bindings import driver as cuda_driver

    relaxed = cuda_driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
    error, previous = cuda_driver.cuThreadExchangeStreamCaptureMode(relaxed)
    try:
        yield
    finally:
        if error == cuda_driver.CUresult.CUDA_SUCCESS:
            cuda_driver.cuThreadExchangeStreamCaptureMode(previous)


@contextmanager
def numba_launch_path(why: str = "asked for by numba_launch_path()"):
    """Launch through Numba's own path while the block runs, then as before: the first run on a
    GPU compares the direct launch with it, bit for bit."""
    if _path["name"] is None:
        _choose_path()
    saved = dict(_path)
    _path.update(name="numba dispatcher", why=why)
    try:
        yield
    finally:
        _path.update(saved)


# --------------------------------------------------------------------------- arguments


def _scalar_kind(value: Any) -> str:
    # exact types first: the abstract numbers.Integral and numbers.Real checks cost a microsecond
    kind = type(value)
    if kind is bool or kind is np.bool_:
        return "bool"
    if kind is int or isinstance(value, np.integer):
        return "int"
    if kind is float or isinstance(value, np.floating):
        return "float"
    raise TypeError(f"no kernel argument type for {type(value).__name__}")


_SCALAR_TYPES = {"bool": types.boolean, "int": types.int64, "float": types.float64}


def _is_named_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _numba_type(value: Any) -> types.Type:
    if isinstance(value, DeviceView):
        return types.Array(numpy_support.from_dtype(value.dtype), value.ndim, "A")
    if _is_named_tuple(value):
        # the type Numba's own launch gives the value (a NamedUniTuple where the members' types
        # are all one, else a NamedTuple), so that both paths compile the kernel once
        return types.BaseTuple.from_types([_SCALAR_TYPES[_scalar_kind(v)] for v in value], type(value))
    return _SCALAR_TYPES[_scalar_kind(value)]


def _scalar_parameter(value: Any) -> tuple[str, Any]:
    kind = _scalar_kind(value)
    if kind == "float":
        return "d", float(value)
    return "q", int(value)


def kernel_parameters(args: tuple) -> list[tuple[str, Any]]:
    """The kernel parameters of ``args`` as Numba's calling convention lays them out, each as
    (struct format, value): an array is (meminfo, parent, nitems, itemsize, data, *shape,
    *strides), a named tuple of scalars its members in order (Numba flattens a tuple argument),
    a scalar itself as int64, float64 or bool (which the kernel reads as the first byte of its
    cell)."""
    parameters = []
    for value in args:
        if isinstance(value, DeviceView):
            parameters += [("q", v) for v in (0, 0, value.size, value.dtype.itemsize, value.pointer, *value.shape,
                                              *value.strides)]
        elif _is_named_tuple(value):
            parameters += map(_scalar_parameter, value)
        else:
            parameters.append(_scalar_parameter(value))
    return parameters


_DATA_POINTER = 4  # an array's data pointer is its fifth parameter (after meminfo, parent, nitems, itemsize)


# --------------------------------------------------------------------------- what a call launches


class Launch(NamedTuple):
    """One kernel of a call: the ``@cuda.jit`` dispatcher, its grid and block, its arguments
    (``DeviceView`` objects, scalars, named tuples of scalars)."""

    kernel: Any
    grid: Any
    block: int
    args: tuple


def _dimensions(shape: Any) -> tuple[int, int, int]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return (*shape, *(1,) * (3 - len(shape)))


class LaunchPlan:
    """A call's kernels for one launch signature, ready to launch with new data pointers.

    ``roots`` names, in order, the arrays whose data pointers a call supplies (``run`` takes them
    in that order; None for an array the call does not have); every array argument of the
    launches is one of them or a part of one at a fixed byte offset (``DeviceView.part``).
    ``layout`` is the driver's description of the call's temporary (the root named
    ``"temporary"``), kept with the plan; its ``zero_bytes`` first bytes are cleared on the
    stream before the first kernel."""

    __slots__ = ("launches", "cells", "patches", "zero_words", "temporary", "layout")

    def __init__(self, launches: list[Launch], roots: dict[str, DeviceView], handles: list, layout: Any = None):
        formats, values, pointer_cells, starts = [], [], {}, []
        root_names = list(roots)
        # a root may itself be carved from an array (a reshaped view): arguments are placed by
        # the array they were all carved from, and their offset from the root
        root_of = {}
        for name, view in roots.items():
            if view is not None:
                origin, offset = view.origin()
                root_of[id(origin)] = (name, offset)
        for launch in launches:
            start = len(values)
            for value in launch.args:
                if isinstance(value, DeviceView):  # its data pointer is patched by every call
                    origin, offset = value.origin()
                    name, root_offset = root_of[id(origin)]
                    pointer_cells.setdefault((name, offset - root_offset), []).append(len(values) + _DATA_POINTER)
                for format_, parameter in kernel_parameters((value,)):
                    formats.append(format_)
                    values.append(parameter)
            starts.append((start, len(values)))
        self.cells = (ctypes.c_int64 * max(1, len(values)))()
        for index, (format_, value) in enumerate(zip(formats, values)):
            if format_ == "d":
                ctypes.c_double.from_buffer(self.cells, 8 * index).value = value
            else:
                self.cells[index] = value
        # (root, byte offset, the cells of every use): one address computed per array, not per use
        self.patches = tuple((root_names.index(name), offset, tuple(indices))
                             for (name, offset), indices in pointer_cells.items())
        base = ctypes.addressof(self.cells)
        self.launches = []
        for launch, handle, (start, end) in zip(launches, handles, starts):
            pointers = (ctypes.c_void_p * max(1, end - start))(*(base + 8 * i for i in range(start, end)))
            # cuLaunchKernel's arguments before the stream, and the parameters' pointer array after it
            self.launches.append(((handle, *_dimensions(launch.grid), *_dimensions(launch.block), 0), pointers,
                                  ctypes.addressof(pointers)))
        self.layout = layout
        zero_bytes = getattr(layout, "zero_bytes", 0)
        self.zero_words = zero_bytes // 4
        self.temporary = root_names.index("temporary") if zero_bytes else None

    def run(self, stream: Any, pointers: tuple[int, ...]) -> None:
        """Write the call's data pointers (one per root, in order) and launch every kernel on
        ``stream`` (a ``CUstream``), after clearing the temporary's first bytes."""
        cells = self.cells
        for root, offset, indices in self.patches:
            address = pointers[root] + offset
            for index in indices:
                cells[index] = address
        driver = bindings()
        if self.zero_words:
            _check(driver.cuMemsetD32Async(pointers[self.temporary], 0, self.zero_words, stream)[0],
                   "cuMemsetD32Async")
        launch = driver.cuLaunchKernel
        for shape, _, parameters in self.launches:
            error = launch(*shape, stream, parameters, 0)[0]
            if error != 0:
                _check(error, "cuLaunchKernel")


def _check(error: Any, what: str) -> None:
    if error != 0:  # CUresult.CUDA_SUCCESS compares equal to 0
        raise RuntimeError(f"{what} failed: {getattr(error, 'name', error)}")


# --------------------------------------------------------------------------- the driver's state

_device_of_context: dict[int, int] = {}
_handle_of_context: dict[int, Any] = {}


def context_handle(context_id: int) -> Any:
    """The ``CUcontext`` of a context ``current_context`` has seen."""
    return _handle_of_context[context_id]


def current_context() -> tuple[int | None, int | None]:
    """(unique id, device ordinal) of this thread's current CUDA context, (None, None) where no
    context is current; (0, 0) in the simulator. CUDA never gives one id to two contexts of a
    process, so the id names a context for good (and a context's device never changes)."""
    if simulated():
        return 0, 0
    cuda_driver = bindings()
    error, context = cuda_driver.cuCtxGetCurrent()
    if error != 0 or not int(context):
        return None, None
    error, identity = cuda_driver.cuCtxGetId(context)
    if error != 0:
        return None, None
    identity = int(identity)
    device = _device_of_context.get(identity)
    if device is None:
        error, device = cuda_driver.cuCtxGetDevice()
        device = _device_of_context[identity] = int(device) if error == 0 else None
        _handle_of_context[identity] = context
    return identity, device


def current_context_id() -> int | None:
    """The unique id of this thread's current CUDA context (see ``current_context``)."""
    return current_context()[0]


def clear(device_pointer: int, size: int, stream_handle: int) -> None:
    """Zero ``size`` bytes (a multiple of 4) on the stream."""
    driver = bindings()
    _check(driver.cuMemsetD32Async(device_pointer, 0, size // 4, driver_stream(stream_handle))[0],
           "cuMemsetD32Async")


_host_buffers = threading.local()


def read_int64s(device_pointer: int, count: int, stream_handle: int) -> tuple[int, ...]:
    """``count`` int64 values from the device, once the stream's work is done (the host waits),
    through a buffer of this thread's."""
    buffer = getattr(_host_buffers, "buffer", None)
    if buffer is None or len(buffer) < count:
        buffer = _host_buffers.buffer = (ctypes.c_int64 * max(count, 8))()
    driver = bindings()
    stream = driver_stream(stream_handle)
    _check(driver.cuMemcpyDtoHAsync(ctypes.addressof(buffer), device_pointer, 8 * count, stream)[0],
           "cuMemcpyDtoHAsync")
    _check(driver.cuStreamSynchronize(stream)[0], "cuStreamSynchronize")
    return tuple(buffer[:count])


# --------------------------------------------------------------------------- compiled kernels

# What launches keep from one call to the next: compiled kernels' handles per device context
# (ids that CUDA never reuses), and each thread's plans. No memory, no events.
_handles: dict[tuple, Any] = {}
_plans = threading.local()
_MOST_PLANS = 256  # per thread: a program that changes shapes without end does not grow this without end
# Numba's simulator runs a kernel's threads against module-level state of its own: kernels
# launched from two host threads at once would see each other's. (A GPU needs no such lock.)
_one_simulated_kernel_at_a_time = threading.Lock()


def _kernel_handle(dispatcher: Any, signature: tuple, context_id: int, capturing: bool) -> Any:
    """The driver's handle of ``dispatcher`` compiled for ``signature``, loaded in the current
    context (compiled once per signature, and loaded once per context)."""
    key = (dispatcher, signature, context_id)
    handle = _handles.get(key)
    if handle is None:
        with setup_under_capture(capturing):  # the module is loaded here, once
            compiled = dispatcher.compile(signature)
            compiled.bind()
            handle = _handles[key] = compiled._codelibrary.get_cufunc().handle
    return handle


def plan_for(key: Any) -> LaunchPlan | None:
    """This thread's plan for a launch signature, if it has made one."""
    plans = getattr(_plans, "by_key", None)
    return None if plans is None else plans.get(key)


def _kernel_handles(launches: list[Launch], context_id: int, capturing: bool) -> list | None:
    """The handles of every kernel of ``launches``, compiled for their arguments; None (and Numba's
    own launch path from now on) where numba-cuda's internals moved."""
    try:
        return [_kernel_handle(launch.kernel, tuple(map(_numba_type, launch.args)), context_id, capturing)
                for launch in launches]
    except AttributeError as error:
        _fall_back(f"compiled kernel handle unavailable: {error}")
        return None


def make_plan(key: Any, launches: list[Launch], roots: dict[str, DeviceView], layout: Any, context_id: int,
              capturing: bool) -> LaunchPlan | None:
    """Compile every kernel of ``launches`` (once per signature) and keep their plan for ``key``
    in this thread; None where the direct path cannot be set up (launch through Numba's)."""
    handles = _kernel_handles(launches, context_id, capturing)
    if handles is None:
        return None
    plans = getattr(_plans, "by_key", None)
    if plans is None:
        plans = _plans.by_key = {}
    if len(plans) >= _MOST_PLANS:
        plans.clear()
    plan = plans[key] = LaunchPlan(launches, roots, handles, layout)
    return plan


def compile_all(launches: list[Launch], capturing: bool) -> None:
    """Compile every kernel of ``launches`` for Numba's own launch path, before the first one
    runs: no compilation (and no failure of one) can fall between two writing launches."""
    if simulated():
        return
    with setup_under_capture(capturing):
        for launch in launches:
            launch.kernel.compile(tuple(launch.kernel.typeof_pyval(a.numba()) if isinstance(a, DeviceView)
                                        else _numba_type(a) for a in launch.args))


def launch_through_numba(launches: list[Launch], stream: Any) -> None:
    """The launches through Numba's own path (the simulator's, and the fallback)."""
    for launch in launches:
        arguments = [a.numba() if isinstance(a, DeviceView) else a for a in launch.args]
        with _one_simulated_kernel_at_a_time if simulated() else nullcontext():
            launch.kernel[launch.grid, launch.block, stream](*arguments)


def launch_once(launches: list[Launch], arrays: Any) -> None:
    """Launch ``launches`` on the stream of ``arrays`` (a ``DeviceArrays``) without keeping a plan:
    for the rare launches outside a call's own (validation's copies, fills of fresh results).
    The arrays' device context must be current."""
    if is_direct():
        roots: dict[str, DeviceView] = {}
        for launch in launches:
            for value in launch.args:
                if isinstance(value, DeviceView):
                    root, _ = value.origin()
                    roots.setdefault(str(id(root)), root)
        handles = _kernel_handles(launches, arrays.context_id, arrays.capturing)
        if handles is not None:
            plan = LaunchPlan(launches, roots, handles)
            plan.run(driver_stream(arrays.stream_handle), tuple(root.pointer for root in roots.values()))
            return
    compile_all(launches, arrays.capturing)
    launch_through_numba(launches, arrays.stream)
