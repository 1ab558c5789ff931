"""Every CUDA kernel, for every dtype it is launched with, compiles to PTX for Hopper (sm_90)
with the real NVVM compiler (no GPU needed). Runs in the ordinary test process."""

import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                                reason="the simulator has no compiler; these run in the main test process")

from numba import cuda, types  # noqa: E402

from centerkern import kernels_cuda  # noqa: E402

LABEL_TYPES = [types.int8, types.int16, types.int32, types.int64, types.uint8, types.uint16, types.uint32,
               types.uint64]
FLOAT_TYPES = [types.float32, types.float64]
HOPPER = (9, 0)


def _matrix(dtype, layout="A"):
    return types.Array(dtype, 2, layout)


def _vector(dtype, layout="C"):
    return types.Array(dtype, 1, layout)


def _compile(kernel, *signature):
    ptx, _ = cuda.compile_ptx(kernel.py_func, tuple(signature), cc=HOPPER)
    assert ".target sm_90" in ptx and ".entry" in ptx
    return ptx


@pytest.mark.parametrize("label_type", LABEL_TYPES, ids=str)
def test_ptx_label_kernels(label_type):
    labels = _vector(label_type, "A")
    _compile(kernels_cuda._find_first_bad_label, labels, types.int64, _vector(types.int64))
    _compile(kernels_cuda._copy_labels, labels, _vector(types.int64))


@pytest.mark.parametrize("float_type", FLOAT_TYPES, ids=str)
def test_ptx_row_kernels(float_type):
    labels = _vector(types.int64)
    _compile(kernels_cuda._gather, _matrix(float_type), labels, _matrix(float_type, "C"))
    _compile(kernels_cuda._copy_matrix, _matrix(float_type), _matrix(float_type))
    _compile(kernels_cuda._fill_matrix, _matrix(float_type, "C"), types.int64)


def test_ptx_bookkeeping_kernels():
    labels = _vector(types.int64)
    _compile(kernels_cuda._fill_vector, labels, types.int64)
    _compile(kernels_cuda._classify, labels, labels, labels, labels)
    _compile(kernels_cuda._reset_classes, labels, labels, labels, labels, labels)


@pytest.mark.parametrize("float_type", FLOAT_TYPES, ids=str)
def test_ptx_fused_step_and_spanning_classes(float_type):
    labels = _vector(types.int64)
    rows, centers = _matrix(float_type), _matrix(float_type)
    sums = _matrix(float_type, "C")
    flags = (types.boolean, types.boolean, types.boolean)
    ptx = _compile(kernels_cuda._tile_step, rows, labels, centers, centers, _matrix(float_type, "C"), labels, labels,
                   labels, sums, labels, labels, labels, labels, _vector(types.float64), *flags, types.float64,
                   types.float64, types.float64, types.int64)
    atomic = "atom.global.add.f32" if float_type == types.float32 else "atom.global.add.f64"
    assert atomic in ptx  # the default mode's one atomic per (run, column)
    _compile(kernels_cuda._finish_spanning_classes, labels, centers, centers, labels, labels, labels, sums, labels,
             labels, labels, labels, types.boolean, types.boolean, types.float64, types.float64, types.int64)
