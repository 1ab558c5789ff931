"""Launching the compiled kernels on a stream, with as little host work as a launch allows.

Numba's own launch path (``kernel[grid, block, stream](*args)``) types every argument, wraps every
array in a device-array object and flattens it into kernel parameters on every call: tens of
microseconds per kernel, a millisecond and more for a step of several kernels. Here each kernel
is compiled once per argument signature (all arrays typed with layout "A": the kernels index with
strides, so one compiled kernel serves every layout), the driver's handle of the compiled kernel
is kept, and a ``DeviceView`` is flattened straight into the parameters Numba's calling
convention expects for an array (meminfo, parent, item count, item size, data pointer, shape,
strides in bytes), a named tuple of scalars (``RuleCoefficients``, ``StepSettings``) into its
members in order. A launch is then one ``cuda.core.launch`` call on the caller's stream.

Where that path cannot be set up (Numba's CUDA simulator has no driver; a numba-cuda whose
internals differ), launches go through Numba's own path, with the same kernels and arguments;
``launch_path()`` says which is in use, and ``CENTERKERN_CUDA_LAUNCH=numba`` in the environment
asks for Numba's path. ``@cuda.jit`` in ``kernels.py`` stays the only place kernels are written.
"""

from __future__ import annotations

import ctypes
import numbers
import os
import threading
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
from numba import types
from numba.cuda.np import numpy_support

from .views import DeviceView, simulated

_DIRECT = "direct (compiled kernel handle, cuda.core.launch)"
_path = {"name": None, "why": ""}


def launch_path() -> str:
    """Which launch path this process uses, and why, for ``python -m centerkern info``.

    Two paths: ``direct (compiled kernel handle, cuda.core.launch)`` on a GPU with numba-cuda's
    ``cuda.core``; else ``numba dispatcher`` (Numba's own ``kernel[grid, block, stream](...)``),
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
    global _launch
    try:
        from cuda.core import launch  # shipped with numba-cuda
    except ImportError as error:
        _path.update(name="numba dispatcher", why=f"cuda.core unavailable: {error}")
        return
    _launch = launch
    _path.update(name=_DIRECT, why="")


def _fall_back(reason: str) -> None:
    _path.update(name="numba dispatcher", why=reason)


@contextmanager
def setup_under_capture(capturing: bool):
    """One-time setup of a call under CUDA graph capture (loading a kernel's module, making the
    device's error record): this thread's capture mode is relaxed while it runs, since such setup
    touches no stream but is among the calls that global capture mode forbids. Nothing queued
    on the capturing stream is affected."""
    if not capturing or simulated():
        yield
        return
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


def _scalar_kind(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    raise TypeError(f"no kernel argument type for {type(value).__name__}")


_SCALAR_TYPES = {"bool": types.boolean, "int": types.int64, "float": types.float64}


def _is_named_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _argument_key(value: Any) -> Any:
    if isinstance(value, DeviceView):
        return value.dtype, value.ndim
    if _is_named_tuple(value):
        return type(value), tuple(map(_scalar_kind, value))
    return _scalar_kind(value)


def _numba_type(value: Any) -> types.Type:
    if isinstance(value, DeviceView):
        return types.Array(numpy_support.from_dtype(value.dtype), value.ndim, "A")
    if _is_named_tuple(value):
        # the type Numba's own launch gives the value (a NamedUniTuple where the members' types
        # are all one, else a NamedTuple), so that both paths compile the kernel once
        return types.BaseTuple.from_types([_SCALAR_TYPES[_scalar_kind(v)] for v in value], type(value))
    return _SCALAR_TYPES[_scalar_kind(value)]


def _scalar_parameter(value: Any) -> Any:
    kind = _scalar_kind(value)
    if kind == "bool":
        return bool(value)
    if kind == "int":
        return ctypes.c_int64(int(value))
    return ctypes.c_double(float(value))


def kernel_parameters(args: tuple) -> list:
    """The kernel parameters of ``args`` as Numba's calling convention lays them out, for
    ``cuda.core.launch``: an array is (meminfo, parent, nitems, itemsize, data, *shape, *strides),
    a named tuple of scalars its members in order (Numba flattens a tuple argument), a scalar
    itself as int64, float64 or bool."""
    parameters = []
    for value in args:
        if isinstance(value, DeviceView):
            if value.parameters is None:  # once per view, which several launches of a call share
                value.parameters = (0, 0, value.size, value.dtype.itemsize, value.pointer, *value.shape,
                                    *value.strides)
            parameters += value.parameters
        elif _is_named_tuple(value):
            parameters += map(_scalar_parameter, value)
        else:
            parameters.append(_scalar_parameter(value))
    return parameters


class PreparedLaunch:
    """One kernel, compiled for one call's arguments, ready to launch on one stream."""

    __slots__ = ("dispatcher", "grid", "block", "args", "kernel", "config", "stream")

    def __init__(self, dispatcher, grid, block, stream, args, kernel, config):
        self.dispatcher, self.grid, self.block, self.stream, self.args = dispatcher, grid, block, stream, args
        self.kernel, self.config = kernel, config

    def __call__(self) -> None:
        if self.kernel is not None:
            _launch(self.stream, self.config, self.kernel, *kernel_parameters(self.args))
        else:
            arguments = [a.numba() if isinstance(a, DeviceView) else a for a in self.args]
            with _one_simulated_kernel_at_a_time if simulated() else nullcontext():
                self.dispatcher[self.grid, self.block, self.stream](*arguments)


# What launches keep from one call to the next: compiled kernels, and objects that stand for a
# launch shape or a stream handle (wrappers that own nothing; a handle reused by a new stream
# names that stream). No memory, no events.
# Numba's simulator runs a kernel's threads against module-level state of its own: kernels
# launched from two host threads at once would see each other's. (A GPU needs no such lock.)
_one_simulated_kernel_at_a_time = threading.Lock()
_compiled: dict[tuple, Any] = {}
_configs: dict[tuple, Any] = {}
_core_streams: dict[int, Any] = {}
_MOST_STREAMS = 256  # a program that makes streams without end does not grow this map without end
_launch = None  # cuda.core.launch, once the direct path is chosen


def _core_stream(arrays) -> Any:
    """cuda.core's own stream object for the call's stream, made once per handle: given Numba's,
    cuda.core would build one at every launch."""
    from cuda.core import Stream

    try:
        return Stream.from_handle(arrays.stream_handle)
    except Exception:  # e.g. a default-stream handle it will not wrap: Numba's object serves
        return arrays.stream


def prepare(dispatcher, grid, block, arrays, *args) -> PreparedLaunch:
    """Compile ``dispatcher`` for ``args`` (once per signature) and return its launch on the
    stream of ``arrays`` (the call's ``DeviceArrays``), not yet made.

    A call prepares every kernel it will launch before the first one that writes, so that no
    compilation (and no failure of one) can fall between two writing launches."""
    if _path["name"] is None:
        _choose_path()
    if _path["name"] != _DIRECT:
        if not simulated():  # compile now rather than inside the launch sequence
            with setup_under_capture(arrays.capturing):
                dispatcher.compile(tuple(dispatcher.typeof_pyval(a.numba()) if isinstance(a, DeviceView)
                                         else _numba_type(a) for a in args))
        return PreparedLaunch(dispatcher, grid, block, arrays.stream, args, None, None)
    stream = _core_streams.get(arrays.stream_handle)
    if stream is None:
        if len(_core_streams) >= _MOST_STREAMS:
            _core_streams.clear()
        stream = _core_streams[arrays.stream_handle] = _core_stream(arrays)
    key = (dispatcher, arrays.device_ordinal, *map(_argument_key, args))
    kernel = _compiled.get(key)
    if kernel is None:
        try:
            with setup_under_capture(arrays.capturing):  # the module is loaded here, once
                compiled = dispatcher.compile(tuple(map(_numba_type, args)))
                compiled.bind()
                kernel = compiled._codelibrary.get_cufunc().kernel
        except AttributeError as error:  # numba-cuda internals moved: use its own launch path
            _fall_back(f"compiled kernel handle unavailable: {error}")
            return prepare(dispatcher, grid, block, arrays, *args)
        _compiled[key] = kernel
    config = _configs.get((grid, block))
    if config is None:
        from cuda.core import LaunchConfig

        config = _configs[(grid, block)] = LaunchConfig(grid=grid, block=block)
    return PreparedLaunch(dispatcher, grid, block, stream, args, kernel, config)
