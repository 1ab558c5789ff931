"""centerkern's errors: SPEC's message for a bad label, and the two exception classes of its own.

A leaf: it imports nothing of centerkern, so that the validation, every backend and every adapter
can use it without importing each other. The two exception classes are centerkern's own (public as
``centerkern.BackendUnavailableError`` and ``centerkern.PeerInputError``).
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


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine (for example ``cuda`` without a GPU).

    Raised by ``center_loss``, ``gather_centers`` and ``scatter_sub_update`` (and the framework
    adapters) when ``backend="cuda"`` is asked for, or ``backend="auto"`` meets device arrays,
    and Numba's CUDA target cannot be loaded (the optional ``numba-cuda`` extra is missing) or
    finds no GPU; also by ``centerkern.cuda.require_available()``. The message says which, and
    how to install the extra or run Numba's CUDA simulator. ``backends()`` lists the backends
    that can run, without raising.

    See Also
    --------
    backends : The backends usable on this machine.

    Examples
    --------
    Fall back to the CPU where no GPU is found (the result is the same either way):

    >>> import numpy as np
    >>> import centerkern
    >>> def gather(centers, labels):
    ...     try:
    ...         return centerkern.gather_centers(centers, labels, backend="cuda")
    ...     except centerkern.BackendUnavailableError:
    ...         return centerkern.gather_centers(centers, labels, backend="numba")
    >>> gather(np.array([[0.0, 1.0], [2.0, 3.0]]), [1, 1, 0]).tolist()
    [[2.0, 3.0], [2.0, 3.0], [0.0, 1.0]]
    """
