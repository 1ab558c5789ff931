"""What the framework adapters (``centerkern.torch``, ``centerkern.jax``, ``centerkern.tensorflow``,
``centerkern.dask``, ``centerkern.distributed``) share.

- ``settings``: what every adapter decides alike from its arguments (``backend="auto"`` on the
  host, the dtype half-precision features are computed in);
- ``batch_classes``: the step rewritten on the batch's own classes, so that a host callback or an
  exchange between ranks moves B rows, never the K centers;
- ``xla_ffi``: the XLA FFI handler through which JAX calls the kernels without a callback, and
  ``xla_targets``: what those handlers run on XLA's buffers.
"""
