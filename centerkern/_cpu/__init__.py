"""The numba backend's compiled code, below ``centerkern.kernels_numba`` (which Python calls).

- ``jit``: how kernels are compiled (entry points, one signature per dtype) and cached;
- ``sort``: the batch sorted by label, and the plan of each row's role;
- ``rows``: arithmetic on one row, and the named structures a call travels with;
- ``passes``: the passes' bodies and the loops that run them, parallel or serial;
- ``step``: one call, sort to last pass, as the two entry points ``step_serial`` and
  ``step_parallel``;
- ``memory``: the gather and the parallel zeros.
"""
