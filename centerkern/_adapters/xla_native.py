"""The JAX step's XLA FFI handler as machine code: a Numba ``cfunc`` that XLA calls on its own
threads with no Python, no GIL and no lock of the interpreter's.

``xla_ffi.handler`` wraps a Python function: each call takes the GIL, builds NumPy views and
goes through ``centerkern.center_loss``'s checks (measured: the jitted step at B=1024, D=512,
K=10^4 cost 2.2x the plain kernel call through it), and a call that reaches Python while the
interpreter finalizes can wait forever for a lock held by a thread that is gone (an import, a
compile), so that the process never exits. Here the handler is compiled: it reads XLA's call
frame (``xla/ffi/api/c_api.h``, whose layout ``xla_ffi`` declares) with loads at fixed offsets,
runs the numba backend's step on the buffers where they are, and makes XLA's errors itself
(``XLA_FFI_Error_Create``, a function pointer of the frame's API) with the messages of SPEC,
which the Python code makes (``bad_label_template``, ``ALPHA_TEMPLATE``).

What a call could still need of Python is done when the step is traced: the handler is
compiled (or loaded from the kernel cache) for the features' dtype and the regime (``serial``
or ``parallel``, as the numba backend picks by B x D), Numba's threads are started, and the
numbers that depend on the shapes only (the rule, the integer scratch's size, a first guess at
the float scratch, the thread count) travel as a small int32 operand, ``settings``.

Arguments ``(features, labels, centers, alpha, settings, bad_label, alpha_not_finite)``, the last
two the messages' templates; results ``(loss, grad[, new_centers])``: the new centers, for
rules that move them, in the buffer XLA aliases to the centers' (``input_output_aliases``),
which is then the centers' own. The data-parallel step's handlers (``DATA_PARALLEL``) and the
shards' label check (``_check_labels``) follow, each with its arguments in its docstring.

Longer than 600 lines because every handler XLA runs on the CPU is here, beside what they all
need and nothing else may touch: the call frame's readers, the errors, and their compilation
into the kernel cache.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import types as types_module

import numba
import numpy as np
from numba import types
from numba.core import ccallback, sigutils
from numba.extending import intrinsic

from .._backends.numba_cpu import driver, step
from .._backends.numba_cpu.jit import _Cache, _report_cache_problem
from .._core import rules
from .._core.errors import label_out_of_range
from .._core.rules import RULES
from .._core.validation import ALPHA_NOT_FINITE
from . import xla_ffi

# --------------------------------------------------------------------------- the frame's layout

_FRAME_EXTENSION = xla_ffi._CallFrame.extension_start.offset
_FRAME_API = xla_ffi._CallFrame.api.offset
_FRAME_STAGE = xla_ffi._CallFrame.stage.offset
_FRAME_ARGUMENTS = xla_ffi._CallFrame.args.offset + xla_ffi._Args.args.offset
_FRAME_RESULTS = xla_ffi._CallFrame.rets.offset + xla_ffi._Args.args.offset
_BUFFER_DATA = xla_ffi._Buffer.data.offset
_BUFFER_DIMS = xla_ffi._Buffer.dims.offset
_BUFFER_DTYPE = xla_ffi._Buffer.dtype.offset
_API_ERROR_CREATE = xla_ffi._Api.error_create.offset
_EXTENSION_TYPE = xla_ffi._ExtensionBase.type.offset
_METADATA = xla_ffi._MetadataExtension.metadata.offset
_METADATA_VERSION = xla_ffi._Metadata.api_version.offset
_MAJOR = _METADATA_VERSION + xla_ffi._ApiVersion.major_version.offset
_MINOR = _METADATA_VERSION + xla_ffi._ApiVersion.minor_version.offset
_TRAITS = xla_ffi._Metadata.traits.offset
_ERROR_ARGS_SIZE = ctypes.sizeof(xla_ffi._ErrorCreateArgs)

# XLA's dtype code of int64, as xla_ffi._DTYPES numbers them
_INT64 = next(code for code, dtype in xla_ffi._DTYPES.items() if dtype is np.int64)

# settings: what the trace knows and the handler takes as data
SETTINGS = ("rule", "int_scratch", "float_scratch", "threads")
_RULE, _INT_SCRATCH, _FLOAT_SCRATCH, _THREADS = range(len(SETTINGS))


# --------------------------------------------------------------------------- memory at an address


@intrinsic
def _load(typingctx, address, dtype):
    """The value of type ``dtype`` at ``address``."""
    loaded = getattr(dtype, "instance_type", None) or dtype.dtype

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], context.get_value_type(loaded).as_pointer())
        return builder.load(pointer)

    return loaded(address, dtype), codegen


@intrinsic
def _store(typingctx, address, value):
    """Write ``value`` at ``address``."""

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], context.get_value_type(value).as_pointer())
        builder.store(args[1], pointer)
        return context.get_dummy_value()

    return types.void(address, value), codegen


@intrinsic
def _pointer(typingctx, address, dtype):
    """``address`` as a pointer to ``dtype`` (for ``numba.carray``)."""
    pointer_type = types.CPointer(getattr(dtype, "instance_type", None) or dtype.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(address, dtype), codegen


@intrinsic
def _call_with_pointer(typingctx, function, argument):
    """``function(argument)``: a C function of one pointer returning one, both given as addresses
    (the API's ``XLA_FFI_Error_Create``)."""

    def codegen(context, builder, signature, args):
        word = context.get_value_type(types.intp)
        void_pointer = context.get_value_type(types.voidptr)
        function_type = numba.core.cgutils.ir.FunctionType(void_pointer, [void_pointer])
        callee = builder.inttoptr(args[0], function_type.as_pointer())
        result = builder.call(callee, [builder.inttoptr(args[1], void_pointer)])
        return builder.ptrtoint(result, word)

    return types.intp(function, argument), codegen


# --------------------------------------------------------------------------- errors, in SPEC's words

_OUT_OF_RANGE = xla_ffi.ERROR_OUT_OF_RANGE
_INVALID_ARGUMENT = xla_ffi.ERROR_INVALID_ARGUMENT


# The messages are the Python ones (``bad_label_template``, ``ALPHA_TEMPLATE``), made when the
# step is traced with a marker byte where each runtime number goes, and passed to the handler
# as operands: the handler only writes the numbers in. Marker k (1 to 4) stands for the k-th
# number a handler has.
MARKERS = tuple(chr(k) for k in range(1, 5))
_NAN, _INFINITY = np.frombuffer(b"nan", np.uint8), np.frombuffer(b"inf", np.uint8)


def as_bytes(text: str) -> np.ndarray:
    """``text`` as the uint8 operand a handler reads a message template from."""
    return np.frombuffer(text.encode("utf-8"), np.uint8)


def bad_label_template(num_classes: int) -> np.ndarray:
    """The step handler's message for a bad label (``label_out_of_range``'s words), marker 1 for
    the label's value and 2 for its position."""
    return as_bytes(str(label_out_of_range(MARKERS[1], MARKERS[0], num_classes)))


#: Every handler's message for an alpha that is not finite (``check_alpha``'s words), marker 1
#: for the value.
ALPHA_TEMPLATE = as_bytes(ALPHA_NOT_FINITE.format(MARKERS[0]))


@numba.njit(cache=False)
def _put_int(message, at, value):
    if value < 0:
        message[at] = 45  # '-'
        at += 1
        value = -value
    digits, rest = 1, value
    while rest >= 10:
        rest //= 10
        digits += 1
    for place in range(digits - 1, -1, -1):
        message[at + place] = 48 + value % 10
        value //= 10
    return at + digits


@numba.njit(cache=False)
def _rendered(template, numbers):
    """``template`` with each marker byte k replaced by ``numbers[k - 1]`` in decimal, as a C
    string, and its length."""
    message = np.empty(template.size + 21 * numbers.size + 1, np.uint8)
    at = 0
    for byte in template:
        if 1 <= byte <= numbers.size:
            at = _put_int(message, at, numbers[byte - 1])
        else:
            message[at] = byte
            at += 1
    message[at] = 0
    return message, at


@numba.njit(cache=False)
def _error(frame, message, code):
    """XLA's error with the C string ``message`` and ``code``, made by the frame's API."""
    arguments = np.zeros(4, np.int64)  # XLA_FFI_Error_Create_Args
    arguments[0] = _ERROR_ARGS_SIZE
    arguments[2] = message.ctypes.data
    arguments[3] = code
    api = _load(frame + _FRAME_API, types.intp)
    return _call_with_pointer(_load(api + _API_ERROR_CREATE, types.intp), arguments.ctypes.data)


@numba.njit(cache=False)
def _alpha_error(frame, template, alpha):
    """``template`` (``ALPHA_TEMPLATE``) with ``nan``, ``inf`` or ``-inf`` for its marker."""
    message = np.empty(template.size + 5, np.uint8)
    at = 0
    for byte in template:
        if byte != 1:
            message[at] = byte
            at += 1
            continue
        if alpha < 0:
            message[at] = 45  # '-'
            at += 1
        word = _NAN if alpha != alpha else _INFINITY
        for k in range(word.size):
            message[at] = word[k]
            at += 1
    message[at] = 0
    return _error(frame, message, _INVALID_ARGUMENT)


@numba.njit(cache=False)
def _bytes(buffers, index):
    """Argument ``index``, a uint8 vector (a message template), as an array."""
    return numba.carray(_pointer(_data(buffers, index), types.uint8), _dim(buffers, index, 0))


# --------------------------------------------------------------------------- the handler

_coefficients_of = numba.njit(rules.coefficients_of)


@numba.njit(cache=False)
def _answered_metadata(frame):
    """Whether this call is XLA's question of the API version (answered: 0.1, no traits)."""
    extension = _load(frame + _FRAME_EXTENSION, types.intp)
    if extension == 0 or _load(extension + _EXTENSION_TYPE, types.int32) != xla_ffi.METADATA_EXTENSION:
        return False
    metadata = _load(extension + _METADATA, types.intp)
    _store(metadata + _MAJOR, np.int32(xla_ffi.API_MAJOR))
    _store(metadata + _MINOR, np.int32(xla_ffi.API_MINOR))
    _store(metadata + _TRAITS, np.uint32(0))
    return True


@numba.njit(cache=False)
def _buffers(frame):
    """``(arguments, results)``, the addresses of the call's buffer lists, for a call at the
    execute stage; ``(0, 0)`` for any other (XLA's question of the version, answered here)."""
    if _answered_metadata(frame) or _load(frame + _FRAME_STAGE, types.int32) != xla_ffi.EXECUTE_STAGE:
        return 0, 0
    return _load(frame + _FRAME_ARGUMENTS, types.intp), _load(frame + _FRAME_RESULTS, types.intp)


@numba.njit(cache=False)
def _array(buffers, index, shape, dtype):
    """Buffer ``index`` of ``buffers`` as an array of ``dtype`` and ``shape`` (no copy)."""
    return numba.carray(_pointer(_data(buffers, index), dtype), shape)


@numba.njit(cache=False)
def _data(buffers, index):
    return _load(_load(buffers + 8 * index, types.intp) + _BUFFER_DATA, types.intp)


@numba.njit(cache=False)
def _dim(buffers, index, axis):
    return _load(_load(_load(buffers + 8 * index, types.intp) + _BUFFER_DIMS, types.intp) + 8 * axis, types.int64)


@numba.njit(cache=False)
def _int64s(buffers, index, size):
    """Buffer ``index``, ``size`` integers (labels, positions, records), as int64 as the kernels
    take them: XLA's int64 buffer itself, or its int32 one widened (``centerkern.jax`` hands over
    integers of the widest type JAX has, and only those: each dtype more would be one more
    conversion to compile)."""
    address = _data(buffers, index)
    if _load(_load(buffers + 8 * index, types.intp) + _BUFFER_DTYPE, types.int32) == _INT64:
        return numba.carray(_pointer(address, types.int64), size)
    narrow = numba.carray(_pointer(address, types.int32), size)
    wide = np.empty(size, np.int64)
    for i in range(size):
        wide[i] = narrow[i]
    return wide


# Each compiled copy of ``_handle`` has these of its own (see ``_compile``).
_STEP = _FLOAT = None


def _handle(frame):
    """The handler, whose globals ``_STEP`` (the step, compiled for one regime) and ``_FLOAT``
    (the features' type) each compiled copy sets (globals rather than a closure: the cache keys a
    closure by its pickled cells)."""
    arguments, results = _buffers(frame)
    if arguments == 0:
        return 0
    batch_size, width, num_classes = _dim(arguments, 0, 0), _dim(arguments, 0, 1), _dim(arguments, 2, 0)
    features = _array(arguments, 0, (batch_size, width), _FLOAT)
    centers = _array(arguments, 2, (num_classes, width), _FLOAT)
    alpha = np.float64(_load(_data(arguments, 3), _FLOAT))
    settings = _array(arguments, 4, len(SETTINGS), types.int32)
    grad = _array(results, 1, (batch_size, width), _FLOAT)
    if not np.isfinite(alpha):
        return _alpha_error(frame, _bytes(arguments, 6), alpha)
    rule = _coefficients_of(settings[_RULE], alpha, batch_size, width)
    if rule.moves_centers:  # the new centers' buffer, which XLA aliases to the centers'
        written = _array(results, 2, (num_classes, width), _FLOAT)
        if _data(results, 2) != _data(arguments, 2):  # not aliased after all: the kernels add to a copy
            written[:] = centers
    else:  # pytorch: grad_centers, which JAX's autodiff computes itself; only touched rows are written
        written = np.empty((num_classes, width), centers.dtype)
    labels = _int64s(arguments, 1, batch_size)
    ints = np.empty(settings[_INT_SCRATCH], np.int64)
    floats = np.empty(settings[_FLOAT_SCRATCH], np.float64)
    while True:
        squares = _STEP(labels, features, centers, written, grad, True, rule, ints, floats, step.AUTO,
                        np.int64(settings[_THREADS]))
        if ints[step.BAD_POSITION] >= 0:
            position = ints[step.BAD_POSITION]
            message, _ = _rendered(_bytes(arguments, 5), np.array([labels[position], position]))
            return _error(frame, message, _OUT_OF_RANGE)
        if ints[step.LAYOUT_RUN] != 0:
            break
        floats = np.empty(ints[step.FLOATS_NEEDED] * 5 // 4, np.float64)  # nothing was written: again
    _store(_data(results, 0), _FLOAT(rule.loss_scale * squares))
    return 0


# --------------------------------------------------------------------------- the shards' label check

def _check_labels(frame):
    """Arguments ``(labels, records, template)``, result the labels (aliased): an error naming
    the first shard's first bad label if any shard holds one (``records``, summed over the
    shards, see ``centerkern.jax``), on every shard alike. ``template``: the message, markers 1
    to 4 for the label's value, its position, the shard and the count
    (``batch_classes.bad_label_template``)."""
    arguments, _ = _buffers(frame)
    if arguments == 0:
        return 0
    shards = _dim(arguments, 1, 0)
    records = _int64s(arguments, 1, shards * 3).reshape((shards, 3))
    total = 0
    for shard in range(shards):
        total += records[shard, 0]
    if total == 0:
        return 0
    owner = 0
    while records[owner, 0] == 0:
        owner += 1
    message, _ = _rendered(_bytes(arguments, 2), np.array([records[owner, 2], records[owner, 1], owner, total]))
    return _error(frame, message, _OUT_OF_RANGE)


# --------------------------------------------------------------------------- the data-parallel step
#
# See ``centerkern._adapters.batch_classes``: each shard reduces its batch to per-class counts
# and sums, the shards add them up (a psum), and every shard applies the rule to the same
# numbers. Here in machine code, serial: each shard is already one of XLA's threads. The
# shard's loss and grad are computed in the same pass as its sums.


@numba.njit(cache=False)
def _shard_pass(features, rows, row_of, grad_scale, grad, sums, sum_of, counts):
    """Sample i against ``rows[row_of[i]]``: its grad row, and its ``d_i`` added (float64) to
    ``sums[sum_of[i]]`` and counted; returns ``sum_i ||d_i||^2``."""
    squares = 0.0
    for i in range(features.shape[0]):
        row, j = row_of[i], sum_of[i]
        counts[j] += 1
        for k in range(features.shape[1]):
            difference = np.float64(features[i, k]) - np.float64(rows[row, k])
            grad[i, k] = grad_scale * difference
            squares += difference * difference
            sums[j, k] += difference
    return squares


def _partials(frame):
    """Arguments ``(features, index, rows, classes, alpha, rule, alpha_not_finite)``, results
    ``(loss, grad, table)``: the shard's loss and grad, and its table of per-class partials
    (``batch_classes``: per row of ``classes``, the class, its count, and the float64 sums of
    ``d_i`` as uint32 pairs). An alpha that is not finite fails every shard alike here."""
    arguments, results = _buffers(frame)
    if arguments == 0:
        return 0
    batch_size, width, rows_held = _dim(arguments, 0, 0), _dim(arguments, 0, 1), _dim(arguments, 2, 0)
    features = _array(arguments, 0, (batch_size, width), _FLOAT)
    index = _int64s(arguments, 1, batch_size)
    rows = _array(arguments, 2, (rows_held, width), _FLOAT)
    classes = _int64s(arguments, 3, rows_held)
    alpha = np.float64(_load(_data(arguments, 4), _FLOAT))
    if not np.isfinite(alpha):
        return _alpha_error(frame, _bytes(arguments, 6), alpha)
    rule = _coefficients_of(_load(_data(arguments, 5), types.int32), alpha, batch_size, width)
    grad = _array(results, 1, (batch_size, width), _FLOAT)
    # a row of the table is 2 + 2D uint32 words: the class and the count, then D float64 words
    table = _array(results, 2, (rows_held, 2 + 2 * width), types.uint32)
    table_sums = _array(results, 2, (rows_held, 1 + width), types.float64)
    sums = np.zeros((rows_held, width), np.float64)
    counts = np.zeros(rows_held, np.int64)
    squares = _shard_pass(features, rows, index, rule.grad_scale, grad, sums, index, counts)
    for j in range(rows_held):
        table[j, 0] = classes[j]
        table[j, 1] = counts[j]
        table_sums[j, 1:] = sums[j]
    _store(_data(results, 0), _FLOAT(rule.loss_scale * squares))
    return 0


def _combine(frame):
    """Arguments ``(tables, position, rows, alpha, rule)``, result the new rows (alpha was
    checked by ``_partials``, before the exchange): every
    shard's table (stacked in shard order) added up per class in table order, which is the same
    on every shard, and the rule applied to ``rows`` (those classes' centers as they were, one
    per value of ``position``) with those sums and counts."""
    arguments, results = _buffers(frame)
    if arguments == 0:
        return 0
    entries, columns, width = _dim(arguments, 0, 0), _dim(arguments, 0, 1), _dim(arguments, 2, 1)
    tables = _array(arguments, 0, (entries, columns), types.uint32)
    table_sums = _array(arguments, 0, (entries, columns // 2), types.float64)
    position = _int64s(arguments, 1, entries)
    rows = _array(arguments, 2, (entries, width), _FLOAT)
    alpha = np.float64(_load(_data(arguments, 3), _FLOAT))
    rule = _coefficients_of(_load(_data(arguments, 4), types.int32), alpha, 1, width)
    new_rows = _array(results, 0, (entries, width), _FLOAT)
    sums = np.zeros((entries, width), np.float64)
    counts = np.zeros(entries, np.float64)
    for entry in range(entries):
        j = position[entry]
        counts[j] += tables[entry, 1]
        sums[j] += table_sums[entry, 1:]
    for j in range(entries):
        scale = rule.step / (1.0 + rule.count_weight * counts[j])
        for k in range(width):
            new_rows[j, k] = np.float64(rows[j, k]) + scale * sums[j, k]
    return 0


def _dense_partials(frame):
    """Arguments ``(features, labels, centers, alpha, rule, alpha_not_finite)``, results ``(loss,
    grad, table)``: the shard's loss and grad, and a (K, 1 + D) table of every class's count and sums
    of ``d_i`` (float64, rounded once to the features' type), for one dense all-reduce. (The
    labels were checked on every shard before: one out of range is read as class 0 all the
    same, never outside the centers.)"""
    arguments, results = _buffers(frame)
    if arguments == 0:
        return 0
    batch_size, width, num_classes = _dim(arguments, 0, 0), _dim(arguments, 0, 1), _dim(arguments, 2, 0)
    features = _array(arguments, 0, (batch_size, width), _FLOAT)
    labels = _int64s(arguments, 1, batch_size)
    centers = _array(arguments, 2, (num_classes, width), _FLOAT)
    alpha = np.float64(_load(_data(arguments, 3), _FLOAT))
    if not np.isfinite(alpha):
        return _alpha_error(frame, _bytes(arguments, 5), alpha)
    rule = _coefficients_of(_load(_data(arguments, 4), types.int32), alpha, batch_size, width)
    grad = _array(results, 1, (batch_size, width), _FLOAT)
    table = _array(results, 2, (num_classes, 1 + width), _FLOAT)
    # the batch's classes, each given a slot of float64 sums on first sight: B rows, not K (the
    # dense exchange serves where K is small, so a K-sized index costs little)
    slot_of_class = np.full(num_classes, -1, np.int64)
    classes = np.empty(batch_size, np.int64)
    slots = np.empty(batch_size, np.int64)
    rows_read = np.empty(batch_size, np.int64)
    seen = 0
    for i in range(batch_size):
        label = labels[i]
        if label < 0 or label >= num_classes:
            label = 0  # read as class 0 all the same (the step fails everywhere before any write)
        rows_read[i] = label
        if slot_of_class[label] < 0:
            slot_of_class[label] = seen
            classes[seen] = label
            seen += 1
        slots[i] = slot_of_class[label]
    sums = np.zeros((seen, width), np.float64)
    counts = np.zeros(seen, np.int64)
    squares = _shard_pass(features, centers, rows_read, rule.grad_scale, grad, sums, slots, counts)
    table[:] = 0
    for j in range(seen):
        table[classes[j], 0] = counts[j]
        table[classes[j], 1:] = sums[j]
    _store(_data(results, 0), _FLOAT(rule.loss_scale * squares))
    return 0


#: The data-parallel step's handlers, each compiled per float type.
DATA_PARALLEL = {"partials": _partials, "combine": _combine, "dense_partials": _dense_partials}


def data_parallel_handler(name: str, dtype):
    """The compiled handler ``name`` of ``DATA_PARALLEL`` for ``dtype``, compiled on first use."""
    dtype = np.dtype(dtype)
    return _compiled_once((name, dtype), lambda: _data_parallel_uncompiled(name, dtype))


def _data_parallel_uncompiled(name: str, dtype: np.dtype):
    function = DATA_PARALLEL[name]
    typed = types_module.FunctionType(function.__code__, {**function.__globals__, "_FLOAT": numba.from_dtype(dtype)},
                                      name)
    return _as_cfunc(typed, f"xla_{name}_{dtype.name}")


_compile_lock = threading.Lock()
_HANDLERS: dict = {}  # compiled handlers, kept for the process (XLA holds their addresses)


def _compiled_once(key, uncompiled):
    """The handler under ``key``, compiled (or loaded from the kernel cache) from
    ``uncompiled()`` on first use, once for every thread."""
    with _compile_lock:
        if key not in _HANDLERS:
            compiled = uncompiled()
            compiled.compile()
            _HANDLERS[key] = compiled
    return _HANDLERS[key]


def handler(dtype, parallel: bool):
    """The compiled handler for features of ``dtype`` in the given regime: compiled on first use
    (or loaded from the kernel cache), with Numba's threads started and the backend's entry point
    it calls compiled first (which refuses a dtype the kernels do not take), so that nothing is
    left to do on XLA's threads."""
    dtype, parallel = np.dtype(dtype), bool(parallel)
    if parallel:
        # a cached parallel function calls into the threading layer by symbol: started first
        from numba.np.ufunc.parallel import _launch_threads

        _launch_threads()
    _step_entry(parallel).compiled(dtype)  # the handler calls the entry as it is, compiled or cached
    return _compiled_once((dtype, parallel), lambda: _uncompiled(dtype, parallel))


def label_check():
    """The compiled label check of the shards (``_check_labels``), compiled on first use."""
    return _compiled_once("check", _uncompiled_label_check)


def _uncompiled_label_check():
    return _as_cfunc(_check_labels, "xla_check_labels")


def _as_cfunc(function, name: str):
    """``function(frame) -> error`` as an uncompiled cfunc named ``name``, with the kernel cache."""
    function = types_module.FunctionType(function.__code__, function.__globals__, name)
    function.__qualname__ = name
    compiled = ccallback.CFunc(function, sigutils.normalize_signature(types.intp(types.intp)), locals={}, options={})
    try:
        compiled._cache = _Cache(function)
    except RuntimeError:  # no directory can be written: compiled in memory
        _report_cache_problem("no kernel cache directory can be written")
    return compiled


def _step_entry(parallel: bool):
    return step.step_parallel if parallel else step.step_serial


def _uncompiled(dtype: np.dtype, parallel: bool):
    """The handler for ``dtype`` and the regime, not yet compiled, with the kernel cache. It calls
    the numba backend's entry point of the regime, whose compiled code (for this dtype's
    signature, which the handler's arrays convert to) it links in: compiling the handler
    compiles none of the step again."""
    name = f"xla_center_loss_{dtype.name}_{'parallel' if parallel else 'serial'}"
    globals_ = {**_handle.__globals__, "_STEP": _step_entry(parallel).dispatcher, "_FLOAT": numba.from_dtype(dtype)}
    handle = types_module.FunctionType(_handle.__code__, globals_, name)
    return _as_cfunc(handle, name)


class HandlerEntry:
    """A handler as ``python -m centerkern compile`` takes an entry point: ``uncompiled(dtype)``
    (with the kernel cache attached) and ``compiled(dtype)``, which compiles it or loads it;
    ``calls``: the backend's entry point it links in, if any."""

    def __init__(self, name: str, uncompiled, compiled, calls=None):
        self.name = name
        self._uncompiled, self._compiled, self._calls = uncompiled, compiled, calls

    def is_cached(self, dtype) -> bool:
        """Whether the cache holds this handler for ``dtype``, without compiling it."""
        if self._calls is not None and not self._calls.is_cached(dtype):
            return False  # the entry point must be there first
        handler_function = self._uncompiled(np.dtype(dtype))
        target = handler_function._targetdescr.target_context
        return handler_function._cache.load_overload(handler_function._sig, target) is not None

    def compiled(self, dtype):
        return self._compiled(np.dtype(dtype))


#: What ``python -m centerkern compile`` compiles of this module, beside the backend's entry
#: points: the step in each regime, the data-parallel step's handlers, the label check (the
#: same for every dtype).
ENTRIES = (
    *(HandlerEntry(f"xla_center_loss_{regime}", functools.partial(_uncompiled, parallel=parallel),
                   functools.partial(handler, parallel=parallel), calls=_step_entry(parallel))
      for regime, parallel in (("serial", False), ("parallel", True))),
    *(HandlerEntry(f"xla_{name}", functools.partial(_data_parallel_uncompiled, name),
                   functools.partial(data_parallel_handler, name)) for name in DATA_PARALLEL),
    HandlerEntry("xla_check_labels", lambda dtype: _uncompiled_label_check(), lambda dtype: label_check()),
)


def settings(rule: str, batch_size: int, feature_size: int, parallel: bool) -> np.ndarray:
    """The ``settings`` operand of a step of ``rule`` on a batch of these sizes, in the regime
    ``parallel_regime`` chose (a set of local slots per thread that may run, as the backend's)."""
    threads = driver.MOST_THREADS if parallel else 1
    # int32 (JAX's widest integer outside x64 mode): the float scratch is a first guess, which a
    # call that needs more grows, so it may be cut to fit
    floats = min(step.float_scratch_guess(batch_size, feature_size, threads), np.iinfo(np.int32).max)
    return np.array([RULES.index(rule), step.int_scratch_size(batch_size), floats, threads], np.int32)


def parallel_regime(batch_size: int, feature_size: int) -> bool:
    """Whether the handler runs a batch of these sizes on every thread: where the numba backend
    would, and the threading layer lets several of XLA's threads launch parallel kernels at once
    (``omp``, ``tbb``). Numba's fallback layer, ``workqueue``, aborts the process when two threads
    launch at once, which XLA's threads do (one per shard), and the backend's turn-taking lock
    is Python's: the handler runs the serial regime there."""
    if batch_size * feature_size < step.PARALLEL_ELEMENTS:
        return False
    from numba.np.ufunc.parallel import _launch_threads

    _launch_threads()  # chooses the layer
    return numba.threading_layer() in ("omp", "tbb")
