"""The codebook functions' settings and input checks (``centerkern.codebooks``).

Built from ``validation``'s checks, in the same words: floating matrices of one dtype, codes
as a flat int64 vector with every value in range, state arrays that may be written and overlap
no input. Nothing here writes, so a bad input leaves every caller array as it was.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from .interop import check_writable
from .validation import HostArrays, check_choice, check_feature_size, check_same_dtype, _float_matrix, _labels

#: How the EMA codebook divides its sums by its counts (``smoothing=``):
#:
#: - ``"laplace"``: ``Ñ_k = (N_k + ε) / (Σ N + K ε) · Σ N``, ``e_k = m_k / Ñ_k`` (EnCodec,
#:   Sonnet's ``VectorQuantizerEMA``, vector-quantize-pytorch before its ``Codebook`` class);
#: - ``"current_code"``: ``e_k = (m_k + ε e_k) / (N_k + ε)``, a pseudo-count of weight ε at the
#:   current code (vector-quantize-pytorch 1.34's ``Codebook.update_ema``).
SMOOTHINGS = ("laplace", "current_code")


@dataclass(frozen=True)
class EMASettings:
    """The EMA update's constants: ``decay`` γ, ``eps`` ε, and whether the smoothing is Laplace's."""

    decay: float
    eps: float
    laplace: bool


def _real(value: Any, what: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r} of type {type(value).__name__}")
    return float(value)


def ema_settings(decay: Any, eps: Any, smoothing: Any) -> EMASettings:
    decay_value, eps_value = _real(decay, "decay"), _real(eps, "eps")
    if not 0.0 <= decay_value <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay!r}")
    if not (math.isfinite(eps_value) and eps_value >= 0.0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return EMASettings(decay_value, eps_value, check_choice(smoothing, "smoothing", SMOOTHINGS) == "laplace")


def float_matrix(x: Any, what: str) -> np.ndarray:
    """A host float32 or float64 matrix, as the caller's memory (no copy)."""
    return _float_matrix(x, what, HostArrays)


def features_and_codebook(features: Any, codebook: Any, codebook_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Host features (N, D), C-contiguous, and a codebook-shaped (K, D) array (the caller's
    memory) of one float dtype."""
    features = float_matrix(features, "features")
    codebook = float_matrix(codebook, codebook_name)
    check_same_dtype(features=features, **{codebook_name: codebook})
    check_feature_size(features, "features", codebook)
    return np.ascontiguousarray(features), codebook


def codes_of(codes: Any, features: np.ndarray, num_codes: int) -> np.ndarray:
    """Codes as a flat int64 vector, one per row of ``features``, each in [0, num_codes)."""
    return _labels(codes, features.shape[0], num_codes, HostArrays, "features")


def sample_weights(weights: Any, features: np.ndarray) -> np.ndarray | None:
    """Per-row weights as a float64 vector (None: every row weighs 1), finite and >= 0."""
    if weights is None:
        return None
    array = np.asarray(HostArrays.asarray(weights, "weights"))
    if array.dtype.kind not in "biuf":
        raise TypeError(f"weights must be real numbers, got dtype {array.dtype}")
    if array.shape != (features.shape[0],):
        raise ValueError(f"weights must have one value per row of features, shape ({features.shape[0]},); "
                         f"got shape {array.shape}")
    array = np.ascontiguousarray(array, dtype=np.float64)
    if not (np.isfinite(array).all() and (array >= 0).all()):
        raise ValueError("weights must be finite and >= 0")
    return array


def state_array(array: Any, name: str, shape: tuple[int, ...], dtype: np.dtype, inputs: dict) -> np.ndarray:
    """A state array the call updates in place: a writable host array of ``shape`` and ``dtype``
    that shares no memory with the call's inputs."""
    if isinstance(array, (list, tuple)):
        raise TypeError(f"{name} must be an array, got a {type(array).__name__}")
    check_writable(array)
    checked = HostArrays.asarray(array, name)
    if checked.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, as the features and embed, got {checked.dtype}")
    if tuple(checked.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(checked.shape)}")
    if not checked.flags.writeable:
        raise ValueError(f"{name} is read-only; the update writes it in place")
    for input_name, value in inputs.items():
        if value is not None and np.may_share_memory(checked, value):
            raise ValueError(f"{name} shares memory with {input_name}; pass arrays of their own")
    return checked


def ema_states(cluster_size: Any, embed_avg: Any, embed: Any, embed_checked: np.ndarray,
               inputs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The EMA codebook's three state arrays, shaped and typed after ``embed_checked`` (K, D)."""
    num_codes, width = embed_checked.shape
    states = (state_array(cluster_size, "cluster_size", (num_codes,), embed_checked.dtype, inputs),
              state_array(embed_avg, "embed_avg", (num_codes, width), embed_checked.dtype, inputs),
              state_array(embed, "embed", (num_codes, width), embed_checked.dtype, inputs))
    distinct_states(cluster_size=states[0], embed_avg=states[1], embed=states[2])
    return states


def float64_input(x: Any, what: str, shape: tuple[int, ...]) -> np.ndarray:
    """An input of sums or counts (``ema_apply``), read as float64."""
    array = np.ascontiguousarray(HostArrays.asarray(x, what), dtype=np.float64)
    if array.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, got {array.shape}")
    return array


def distinct_states(**named: np.ndarray) -> None:
    """The state arrays of one update must not share memory: each is read whole before any is written."""
    items = list(named.items())
    for position, (name, array) in enumerate(items):
        for other_name, other in items[position + 1:]:
            if np.may_share_memory(array, other):
                raise ValueError(f"{name} and {other_name} share memory; each state array must be its own")
