"""Messages shared by the validation and the backends that find the same errors.

A leaf: it imports nothing of centerkern, so that the validation and every backend can use it
without importing each other.
"""

from __future__ import annotations


def label_out_of_range(position: int, value: int, num_classes: int) -> IndexError:
    """SPEC's error for a bad label, wherever it is found (by the validation, by the numba
    kernels' sort, or by the CUDA backend's kernels)."""
    return IndexError(
        f"label {value} at position {position} is out of range: labels must lie in "
        f"[0, {num_classes}) for {num_classes} classes"
    )


class PeerInputError(RuntimeError):
    """Data parallelism: another rank's (or shard's, or replica's) input failed validation, or
    the ranks disagree on the step, so it was abandoned on every one of them: nothing moved.

    The error of the steps that span several processes or devices: ``centerkern.distributed``
    (the ranks of a ``torch.distributed`` group), ``centerkern.jax`` with ``axis_name=`` (the
    shards of ``shard_map`` or ``pmap``) and ``centerkern.tensorflow`` under a ``tf.distribute``
    strategy (its replicas). The rank holding the bad input raises its own error (an
    ``IndexError`` for a bad label, say), every other rank this one, instead of waiting for ever
    in the next collective. When the ranks of ``centerkern.distributed`` disagree on K, D, the
    dtype, the rule or alpha, every rank raises it.

    See Also
    --------
    BackendUnavailableError : The other error of centerkern's own.

    Examples
    --------
    A training loop on several ranks can tell a peer's bad batch from its own:

    >>> import centerkern
    >>> issubclass(centerkern.PeerInputError, RuntimeError)
    True
    >>> def step_or_skip(step):
    ...     try:
    ...         return step()
    ...     except centerkern.PeerInputError as error:  # another rank's batch: nothing moved here
    ...         return f"skipped: {error}"
    >>> def failing_step():
    ...     raise centerkern.PeerInputError("the input of rank(s) [1] failed validation; no rank "
    ...                                     "moved its centers")
    >>> step_or_skip(failing_step)
    'skipped: the input of rank(s) [1] failed validation; no rank moved its centers'
    """
