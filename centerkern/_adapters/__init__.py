"""What the framework adapters (``centerkern.jax``, ``centerkern.tensorflow``, ``centerkern.distributed``)
share.

- ``batch_classes``: the step rewritten on the batch's own classes, so that a host callback or an
  exchange between ranks moves B rows, never the K centers;
- ``xla_ffi``: the XLA FFI handler through which JAX calls the kernels without a callback.
"""
