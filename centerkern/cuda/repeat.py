"""A training loop's calls after its first: checked and planned once per signature, then run
with a few reads of the arrays.

A training loop calls with the same kind of arrays every step. The first call of a *signature*
(the function; each array's type, dtype, shape, strides and device, and which arrays are one;
the rule, alpha and the call's choices) takes the plain path: validation
(``validation.plain_device_*``), views, results, and a launch plan (``launcher``). What that
call found that depends on the signature alone is kept, per host thread, as a ``Repeat``: the
plan, where each of its arrays comes from (an input, a fresh result, the temporary, the error
record), the results' shapes, and which arrays must not overlap.

A later call with the same signature does only what can change from call to call: it reads
the arrays' data pointers and checks their overlaps, asks for the framework's current stream,
whether it captures and which context is current, raises an earlier call's bad label, allocates
its results and its temporary, and runs the plan. Where anything differs from the first call
(a capture, another context, an overlap), it steps aside and the call takes the plain path.
"""

from __future__ import annotations

import math
import threading
from typing import Any, NamedTuple

import numpy as np

from .._core.interop import framework_of
from . import driver, launcher, record
from .launcher import clear, current_context, driver_stream
from .memory import empty_many, is_capturing, stream_handle
from .views import data_pointer


class Source(NamedTuple):
    """Where a plan's array comes from at each call: ``kind`` is "input" (the caller's array
    ``index``), "result" (fresh result ``index``), "temporary", "record", or "none"."""

    kind: str
    index: int = 0


class Result(NamedTuple):
    shape: tuple
    dtype: np.dtype
    zeroed: bool


_key_of_type: dict[type, Any] = {}


def _torch_key(x: Any) -> tuple | None:
    if x.layout is not _STRIDED[0]:
        return None  # a sparse tensor: the plain path refuses it, and it has no strides to read
    return x.dtype, x.shape, x.stride(), x.get_device()  # (a CPU tensor's device is -1)


_STRIDED: list = []


def _array_key(x: Any) -> tuple:
    return x.dtype, x.shape, x.strides


def _cupy_key(x: Any) -> tuple:
    return x.dtype, x.shape, x.strides, x.device.id


def _key_maker(x: Any):
    """How to read the signature of an array of ``x``'s type (by its framework: whether one array
    is plain is for the plain path to say): False for a type no plain path takes."""
    kind = type(x)
    maker = _key_of_type.get(kind)
    if maker is None:
        if getattr(kind, "__cuda_ndarray__", False):
            maker = _array_key
        else:
            maker = {"torch": _torch_key, "cupy": _cupy_key}.get(framework_of(x), False)
        if maker is _torch_key and not _STRIDED:
            import torch

            _STRIDED.append(torch.strided)
        if len(_key_of_type) < 64:
            _key_of_type[kind] = maker
    return maker


def signature(function: str, arrays: tuple, settings: tuple) -> tuple | None:
    """The signature of a call of ``function`` on ``arrays`` (None where one is absent), with
    ``settings`` (the call's hashable choices); None where an array is not a plain device array.
    (Arrays of several frameworks have a signature too, but never a ``Repeat``: the plain path,
    which makes them, refuses such calls.)"""
    parts: list = [function, settings]
    for index, x in enumerate(arrays):
        if x is None:
            parts.append(None)
            continue
        for earlier in range(index):
            if arrays[earlier] is x:
                parts.append(earlier)  # the same array as an earlier one (out=centers)
                break
        else:
            maker = _key_of_type.get(type(x)) or _key_maker(x)
            key = maker(x) if maker else None
            if key is None:
                return None
            parts.append((type(x), *key))
    return tuple(parts)


class Repeat:
    """What the first call of a signature found, for the calls after it (see the module
    docstring)."""

    __slots__ = ("plan", "sources", "results", "outputs", "overlaps", "extents", "context_id", "device",
                 "temporary_size", "verdict_offset", "memory_type", "shapes_and_dtypes")

    def __init__(self, plan, sources, results, outputs, overlaps, extents, device_arrays, layout):
        self.plan, self.sources, self.results, self.outputs = plan, sources, results, outputs
        self.overlaps, self.extents = overlaps, extents
        self.context_id, self.device = device_arrays.context_id, device_arrays.device_ordinal
        self.memory_type = type(device_arrays.memory)  # the arrays' framework's memory
        self.shapes_and_dtypes = [(result.shape, result.dtype) for result in results]
        self.temporary_size = layout.size
        self.verdict_offset = layout.parts["verdict"][0]

    def run(self, arrays: tuple, stream: Any, sync: bool) -> tuple | None:
        """The call on ``arrays``: its outputs (each an input array or a fresh result), or None
        where it cannot be run as the first call was (the caller then takes the plain path)."""
        memory = self.memory_type(arrays[0], stream)  # (a stream= that is not the framework's current one raises)
        handle = memory.stream_handle
        if is_capturing(handle):
            return None  # the plain path checks what a capture allows, and sets up what it needs
        context_id, device = current_context()
        if context_id != self.context_id or device != self.device:
            return None
        pointers = [None if x is None else data_pointer(x) for x in arrays]
        extents = self.extents
        for first, second in self.overlaps:
            if (pointers[first] + extents[first][0] < pointers[second] + extents[second][1]
                    and pointers[second] + extents[second][0] < pointers[first] + extents[first][1]):
                return None  # the plain path copies what overlaps
        errors = record._records.get(context_id)
        if errors is None:
            return None
        earlier = errors.take()  # an earlier sync=False call's bad label, raised before this call writes
        if earlier is not None:
            raise earlier
        memory.set_device(device)
        memory.bind_context(context_id)
        owners, fresh = empty_many(memory, self.shapes_and_dtypes)
        temporary = memory.temporary(self.temporary_size)
        temporary_pointer = data_pointer(temporary)
        try:
            for result, pointer in zip(self.results, fresh):
                if result.zeroed:
                    clear(pointer, math.prod(result.shape) * result.dtype.itemsize, handle)
            located = []
            for source in self.sources:
                kind = source.kind
                if kind == "input":
                    located.append(pointers[source.index])
                elif kind == "result":
                    located.append(fresh[source.index])
                elif kind == "temporary":
                    located.append(temporary_pointer)
                elif kind == "record":
                    located.append(errors.view.pointer)
                else:
                    located.append(0)
            self.plan.run(driver_stream(handle), located)
            if sync:
                bad = driver.verdict_at(temporary_pointer + self.verdict_offset, handle)
                if bad is not None:
                    raise bad
        finally:
            memory.release()
        return tuple([None if output is None else (arrays[output.index] if output.kind == "input" else
                                                    owners[output.index]) for output in self.outputs])


_repeats = threading.local()
_MOST_REPEATS = 64  # per thread: a program that changes shapes without end does not grow this without end


def run(function: str, arrays: tuple, choices: tuple, stream: Any, sync: bool) -> tuple[tuple | None, Any]:
    """(outputs, None) where this thread has run a call of ``function`` with the same signature
    before (``choices``: the call's hashable settings besides its stream and ``sync``), else
    (None, the signature to ``remember`` once the plain path has run the call; None where the
    call has none)."""
    if not launcher.is_direct():
        return None, None  # no plans: Numba's own launch path (the simulator's) takes every call whole
    settings = (None if stream is None else stream_handle(stream), *choices, bool(sync))
    key = signature(function, arrays, settings)
    if key is None:
        return None, None
    repeats = getattr(_repeats, "by_key", None)
    found = None if repeats is None else repeats.get(key)
    if found is None:
        return None, key
    return found.run(arrays, stream, sync), None


def remember(key: Any, arrays: tuple, outputs: tuple, overlaps: tuple, device_arrays: Any) -> None:
    """Keep what the call just run on the plain path found, for later calls of signature ``key``:
    ``arrays`` as the caller passed them, ``outputs`` the call's outputs as views (or None),
    ``overlaps`` the pairs of ``arrays`` (by index) that must not overlap."""
    last = driver.take_last_run()
    if last is None or key is None:
        return
    plan, roots, layout = last
    owners = {id(x): index for index, x in enumerate(arrays) if x is not None}
    results, result_of = [], {}

    def source_of(view) -> Source | None:
        if view is None:
            return Source("none")
        index = owners.get(id(view.owner))
        if index is not None and not view.fresh:
            return Source("input", index) if view.pointer == data_pointer(arrays[index]) else None
        if not view.fresh:
            return None
        if id(view.owner) not in result_of:
            shape = tuple(getattr(view.owner, "shape", view.shape))
            result_of[id(view.owner)] = len(results)
            results.append(Result(shape, view.dtype, view.cleared))
        return Source("result", result_of[id(view.owner)])

    sources = []
    for view in roots.values():  # the plan's roots, then its temporary and the record (see driver)
        source = source_of(view)
        if source is None:
            return  # an array this module cannot find again: such calls take the plain path
        sources.append(source)
    sources += [Source("temporary"), Source("record")]
    found_outputs = []
    for view in outputs:
        source = source_of(view) if view is not None else None
        if view is not None and source is None:
            return
        found_outputs.append(source)
    extents = [None if x is None else _extent_offsets(x, device_arrays) for x in arrays]
    repeat = Repeat(plan, tuple(sources), tuple(results), tuple(found_outputs), overlaps, extents, device_arrays,
                    layout)
    repeats = getattr(_repeats, "by_key", None)
    if repeats is None:
        repeats = _repeats.by_key = {}
    if len(repeats) >= _MOST_REPEATS:
        repeats.clear()
    repeats[key] = repeat


def _extent_offsets(x: Any, device_arrays: Any) -> tuple[int, int]:
    """[low, high) of the bytes ``x`` may touch, from its data pointer (they depend on its shape
    and strides alone)."""
    view = device_arrays.asarray(x, "array")
    low, high = view.extent()
    return low - view.pointer, high - view.pointer
