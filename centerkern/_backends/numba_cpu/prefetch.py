"""Software prefetch of whole rows: the hardware prefetcher finds a random row only after its
first few cache lines have missed. Numba has no prefetch of its own, so this emits LLVM's."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import helper

CACHE_LINE = 64


def _prefetcher(locality: int, for_write: int):
    """``prefetch(array, row, column)``: ask the CPU to load the cache line of
    ``array[row, column]`` (``locality`` 3: into L1, 2: into L2)."""

    @intrinsic
    def prefetch(typingctx, array, row, column):
        def codegen(context, builder, signature, args):
            array_type = signature.args[0]
            view = context.make_array(array_type)(context, builder, args[0])
            pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1], args[2]], wraparound=False)
            i32 = ir.IntType(32)
            byte_pointer = ir.IntType(8).as_pointer()
            function_type = ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32])
            function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0")
            arguments = [builder.bitcast(pointer, byte_pointer), ir.Constant(i32, for_write),
                         ir.Constant(i32, locality), ir.Constant(i32, 1)]
            builder.call(function, arguments)
            return context.get_dummy_value()

        return types.void(array, types.intp, types.intp), codegen

    return prefetch


_prefetch_l1 = _prefetcher(locality=3, for_write=0)
_prefetch_l2 = _prefetcher(locality=2, for_write=0)
_prefetch_l1_for_write = _prefetcher(locality=3, for_write=1)


@helper(inline="always")
def prefetch_row(array, row):
    """Every cache line of ``array[row]`` into L1."""
    step = max(1, CACHE_LINE // array.itemsize)
    for column in range(0, array.shape[1], step):
        _prefetch_l1(array, row, column)


@helper(inline="always")
def prefetch_row_l2(array, row):
    step = max(1, CACHE_LINE // array.itemsize)
    for column in range(0, array.shape[1], step):
        _prefetch_l2(array, row, column)


@helper(inline="always")
def prefetch_row_for_write(array, row):
    step = max(1, CACHE_LINE // array.itemsize)
    for column in range(0, array.shape[1], step):
        _prefetch_l1_for_write(array, row, column)
