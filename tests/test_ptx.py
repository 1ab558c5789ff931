"""Every CUDA kernel, for every signature the launcher compiles it with (arrays of layout "A",
int64/float64/bool scalars, the named tuples ``RuleCoefficients`` and ``StepSettings``, labels of
every integer dtype), and every codebook kernel (``codebook_kernels.KERNELS``, for both float dtypes),
compiles to PTX for Hopper (sm_90) with the real NVVM compiler (no GPU needed). Runs in the
ordinary test process."""

import ctypes
import os
import re

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                                reason="the simulator has no compiler; these run in the main test process")

import numpy as np  # noqa: E402
from numba import cuda, typeof, types  # noqa: E402

from centerkern._core.rules import SCATTER_SUB, RuleCoefficients, rule_coefficients  # noqa: E402
from centerkern.cuda import codebook_kernels as codebooks, kernels  # noqa: E402
from centerkern.cuda import launcher  # noqa: E402
from centerkern.cuda.views import DeviceView  # noqa: E402

LABEL_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
FLOAT_DTYPES = [np.float32, np.float64]
HOPPER = (9, 0)


def _array(dtype, ndim):
    """The type the launcher gives a device view of this dtype and rank."""
    view = DeviceView(None, 0, (1,) * ndim, (8,) * ndim, np.dtype(dtype), False, None)
    return launcher._numba_type(view)


INT, FLOAT, BOOL = launcher._numba_type(1), launcher._numba_type(1.0), launcher._numba_type(True)
VECTOR = _array(np.int64, 1)
COUNTERS = _array(np.int32, 1)  # a call's status and per-class bookkeeping
# the step's named tuples, as the driver builds them (every rule and the scatter share one type)
RULE = launcher._numba_type(rule_coefficients("wen", 0.5, 8, 4))
SETTINGS = launcher._numba_type(kernels.StepSettings(True, False, True, False, True))


class _Hopper:
    compute_capability = HOPPER


@pytest.fixture(autouse=True)
def _device_functions_for_hopper(monkeypatch):
    """numba-cuda compiles a kernel's device functions for the current device's compute
    capability, and there is no device here: name Hopper as the current one."""
    from numba.cuda import dispatcher

    monkeypatch.setattr(dispatcher, "get_current_device", lambda: _Hopper)


def _compile(kernel, *signature):
    ptx, _ = cuda.compile_ptx(kernel.py_func, tuple(signature), cc=HOPPER)
    assert ".target sm_90" in ptx and ".entry" in ptx
    return ptx


def test_launcher_types_match_numba_types():
    assert (INT, FLOAT, BOOL) == (types.int64, types.float64, types.boolean)
    assert _array(np.float32, 2) == types.Array(types.float32, 2, "A")
    # the types Numba's own launch gives the named tuples: a kernel is compiled once for both paths
    assert RULE == types.NamedTuple([FLOAT] * 4 + [BOOL], RuleCoefficients) == typeof(SCATTER_SUB)
    for rule in ("facenet", "wen", "pytorch"):
        assert launcher._numba_type(rule_coefficients(rule, 0.5, 8, 4)) == RULE
    settings = kernels.StepSettings(False, True, False, True, False)
    assert SETTINGS == launcher._numba_type(settings) == typeof(settings)
    assert list(SETTINGS) == [BOOL] * len(kernels.StepSettings._fields)


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_ptx_kernels_reading_labels(label_dtype):
    labels = _array(label_dtype, 1)
    _compile(kernels.classify, labels, INT, COUNTERS)
    _compile(kernels.check_labels, labels, INT, COUNTERS)
    _compile(kernels.copy_vector, labels, labels)  # a copy of overlapping labels
    for float_dtype in FLOAT_DTYPES:
        matrix = _array(float_dtype, 2)
        _compile(kernels.gather, matrix, labels, matrix, COUNTERS, VECTOR, VECTOR, BOOL)


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64, np.uint8], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("float_dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_ptx_step_kernels(float_dtype, label_dtype):
    labels, matrix = _array(label_dtype, 1), _array(float_dtype, 2)
    sums, squares = _array(np.float64, 2), _array(np.float64, 1)
    ptx = _compile(kernels.tile_step, matrix, labels, matrix, matrix, matrix, COUNTERS, COUNTERS, sums, VECTOR,
                   VECTOR, squares, RULE, SETTINGS)
    float_atomics = set(re.findall(r"\b(?:atom|red)(?:\.global)?\.add\.(f\d+)", ptx))
    assert float_atomics == {"f64"}  # the default mode's one atomic per (run, column), never rounded to float32
    # the spanning table's slots are claimed by a 32-bit compare-and-swap on its keys, and the key
    # published by an exchange once the slot's row is cleared
    assert re.search(r"atom(\.global)?\.cas\.b32", ptx) and re.search(r"atom(\.global)?\.exch\.b32", ptx)
    _compile(kernels.finish_spanning_classes, labels, matrix, matrix, COUNTERS, COUNTERS, sums, VECTOR, VECTOR,
             squares, squares, VECTOR, VECTOR, RULE, SETTINGS)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32], ids=lambda d: np.dtype(d).name)
def test_ptx_copy_and_fill_kernels(dtype):
    matrix, vector = _array(dtype, 2), _array(dtype, 1)
    _compile(kernels.copy_rows, matrix, matrix, COUNTERS, BOOL)
    _compile(kernels.copy_matrix, matrix, matrix)
    _compile(kernels.copy_vector, vector, vector)
    for value in (INT, FLOAT):
        _compile(kernels.fill_rows, matrix, value)
        _compile(kernels.fill_vector, vector, value)


def test_ptx_record_post_takes_a_ticket_and_reads_nothing_back():
    """A post takes its ticket with one 64-bit atomic add and writes its slot behind system-wide
    fences (see kernels._post), and no compare-and-swap on the record remains: the device never
    reads what the host writes."""
    ptx = _compile(kernels.gather, _array(np.float32, 2), _array(np.int64, 1), _array(np.float32, 2), COUNTERS,
                   VECTOR, VECTOR, BOOL)
    assert re.search(r"atom(\.global)?\.add\.u64", ptx)
    assert not re.search(r"atom(\.global)?\.cas", ptx)
    assert "membar.sys" in ptx or "fence.sc.sys" in ptx or "fence.acq_rel.sys" in ptx


class _DeviceMemoryAt:
    """Stands for device memory at an address, so that a Numba device array can be made without
    a GPU (Numba never dereferences it while it flattens the arguments)."""

    def __init__(self, address):
        self.device_ctypes_pointer = ctypes.c_void_p(address)

    def own(self):
        return self


def _numbas_own_parameters(typed_values):
    """The kernel parameters Numba's own launch path makes of these (type, value) pairs."""
    from numba.cuda import dispatcher

    class _KernelWithoutExtensions:  # what _prepare_args reads of its kernel (it recurses into tuples)
        extensions = []
        _prepare_args = dispatcher._Kernel._prepare_args

    parameters = []
    for numba_type, value in typed_values:
        _KernelWithoutExtensions()._prepare_args(numba_type, value, 0, [], parameters)
    return parameters


def _assert_same_parameters(got, expected):
    """The launcher's (format, value) cells hold what Numba passes: the same values, a float64 as
    a double ("d"), everything else as an 8-byte integer ("q": a bool's first byte is its value)."""
    assert [value for _, value in got] == [int(getattr(v, "value", v)) if not isinstance(v, ctypes.c_double)
                                           else v.value for v in expected]
    assert [format_ for format_, _ in got] == ["d" if isinstance(v, ctypes.c_double) else "q" for v in expected]
    assert all(type(v) in (int, bool, ctypes.c_int64, ctypes.c_double) for v in expected)


@pytest.mark.parametrize("shape, strides", [((3, 5), (40, 8)), ((3, 5), (8, 24)), ((4, 2), (-16, 8)), ((7,), (8,))])
def test_launcher_flattens_arguments_as_numbas_own_launch_path(shape, strides):
    """The direct launch hands the driver the very parameters Numba's own launch would: an array as
    (meminfo, parent, nitems, itemsize, data, *shape, *strides), then int64, float64 and bool."""
    from numba.cuda.cudadrv import devicearray

    dtype = np.dtype(np.float64)
    numba_array = devicearray.DeviceNDArray(shape, strides, dtype, gpu_data=_DeviceMemoryAt(4096))
    view = DeviceView(None, 4096, shape, strides, dtype, False, None)

    expected = _numbas_own_parameters([(_array(dtype, len(shape)), numba_array), (INT, 7), (FLOAT, 0.5),
                                       (BOOL, True)])
    _assert_same_parameters(launcher.kernel_parameters((view, np.int64(7), 0.5, True)), expected)


def test_launcher_flattens_named_tuples_as_numbas_own_launch_path():
    """A named tuple (the rule's coefficients, the step's settings) goes in as its members, in
    order, each as Numba's own launch passes that scalar: float64 as a double, bool as itself."""
    from numba.cuda.cudadrv import devicearray

    rule = RuleCoefficients(loss_scale=0.25, grad_scale=0.5, step=-2.0, count_weight=1.0, moves_centers=True)
    settings = kernels.StepSettings(rows_are_features=True, deterministic=False, grad_is_fresh=True,
                                    written_is_fresh=False, posts_bad_label=True)
    numba_array = devicearray.DeviceNDArray((3, 5), (40, 8), np.dtype(np.float32), gpu_data=_DeviceMemoryAt(8192))
    view = DeviceView(None, 8192, (3, 5), (40, 8), np.dtype(np.float32), False, None)

    arguments = (view, rule, 7, settings, SCATTER_SUB)
    expected = _numbas_own_parameters([(_array(np.float32, 2), numba_array), (RULE, rule), (INT, 7),
                                       (SETTINGS, settings), (RULE, SCATTER_SUB)])
    got = launcher.kernel_parameters(arguments)
    _assert_same_parameters(got, expected)
    assert len(got) == 9 + 5 + 1 + 5 + 5
    assert [value for _, value in got[9:14]] == [0.25, 0.5, -2.0, 1.0, True]


def _codebook_signatures(float_dtype, code_dtype=np.int64):
    """Each codebook kernel's argument types, as its host function launches it."""
    matrix, vector = _array(float_dtype, 2), _array(float_dtype, 1)
    wide_matrix, wide_vector, ints = _array(np.float64, 2), _array(np.float64, 1), _array(np.int64, 1)
    return {
        codebooks.nearest_codes: (matrix, matrix, ints, vector),
        codebooks.check_codes: (_array(code_dtype, 1), INT, vector, ints, wide_vector, ints, ints),
        codebooks.scatter_sums: (matrix, ints, wide_vector, wide_vector, wide_matrix),
        codebooks.ordered_sums: (matrix, ints, ints, wide_vector, wide_vector, wide_matrix),
        codebooks.ema_sizes: (vector, wide_vector, FLOAT, wide_vector, wide_vector),
        codebooks.ema_codes: (wide_matrix, wide_vector, wide_vector, matrix, matrix, FLOAT, FLOAT, BOOL),
        codebooks.kmeans_centers: (wide_vector, wide_matrix, matrix, vector),
        codebooks.kmeans_weights: (wide_vector, vector),
        codebooks.gather_rows: (matrix, ints, matrix),
    }


@pytest.mark.parametrize("float_dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_ptx_codebook_kernels(float_dtype):
    signatures = _codebook_signatures(float_dtype)
    assert set(signatures) == set(codebooks.KERNELS)  # every kernel of the module, and only those
    ptx = {kernel: _compile(kernel, *signature) for kernel, signature in signatures.items()}
    float_atomics = set(re.findall(r"\b(?:atom|red)(?:\.global)?\.add\.(f\d+)", ptx[codebooks.scatter_sums]))
    assert float_atomics == {"f64"}  # the default mode's sums, never rounded to float32
    for kernel in (codebooks.ordered_sums, codebooks.ema_sizes, codebooks.ema_codes):  # the deterministic path
        assert not re.search(r"\b(?:atom|red)(?:\.global)?\.add\.f", ptx[kernel])


@pytest.mark.parametrize("code_dtype", LABEL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_ptx_codebook_check_reads_every_integer_dtype(code_dtype):
    signature = _codebook_signatures(np.float32, code_dtype)[codebooks.check_codes]
    _compile(codebooks.check_codes, *signature)
