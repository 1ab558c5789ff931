"""A step's arrays in its own framework, and back: what the oracle hands a step and reads from it."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._comparison import checked_dtype

# public as centerkern.testing.FRAMEWORKS (documented there)
FRAMEWORKS = ("numpy", "torch", "jax", "tensorflow")


def to_framework(framework: str, array: np.ndarray, variable: bool = False):
    if framework == "numpy":
        return array.copy(order="K")
    if framework == "torch":
        import torch

        if array.dtype.name == "bfloat16":  # NumPy's bfloat16 is ml_dtypes', which torch does not read
            return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(np.array(array))
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(array)
    import tensorflow as tf

    # a state (centers, a codebook) as a Variable, as facenet keeps its centers, so that a step may
    # scatter_sub or assign into it
    return tf.Variable(array) if variable else tf.constant(array)


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return value.float().numpy().astype(checked_dtype("bfloat16"))
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # torch, TensorFlow
        value = value.numpy()
    return np.asarray(value)
