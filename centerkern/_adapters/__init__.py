"""What the framework adapters (``centerkern.torch``, ``centerkern.jax``, ``centerkern.tensorflow``,
``centerkern.dask``, ``centerkern.distributed``) share.

- ``settings``: what every adapter decides alike from its arguments (``backend="auto"`` on the
  host, the dtype half-precision features are computed in);
- ``batch_classes``: the step rewritten on the batch's own classes, so that a host callback or an
  exchange between ranks moves B rows, never the K centers;
- ``xla_ffi``: XLA's FFI call frame, and a Python function as an FFI handler;
- ``xla_native``: the handlers JAX runs on the CPU, compiled Numba ``cfunc``s that need no
  Python per call (the step, and the data-parallel step's partials, sums and label check);
- ``xla_targets``: the Python handlers (the ``numpy`` reference, the cuda step on a GPU).
"""
