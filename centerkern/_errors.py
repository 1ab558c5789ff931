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
    the ranks disagree on the step, so it was abandoned on every one of them: nothing moved."""
