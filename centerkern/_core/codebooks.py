"""The codebook functions' settings and input checks (``centerkern.codebooks``).

Built from ``validation``'s checks, in the same words: floating matrices of one dtype, codes
as a flat int64 vector with every value in range, state arrays that may be written and overlap
no input. Nothing here writes, so a bad input leaves every caller array as it was.

Device arrays (the ``cuda`` backend) take the ``device_*`` variants, through the call's
``arrays`` (``centerkern.cuda.codebooks.CodebookArrays``): metadata is read on the host, and the
values of codes and weights are checked on the device, in one kernel whose verdict the host
reads before anything is written.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import label_out_of_range
from .interop import check_writable
from .validation import (HostArrays, check_choice, check_feature_size, check_same_dtype, flat_labels,
                         overlaps_itself, _float_matrix, _labels)

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


def float_matrix(x: Any, what: str, arrays=HostArrays) -> Any:
    """A float32 or float64 matrix, as the caller's memory (no copy; a host array seen by a
    device call's ``arrays`` is copied to the device)."""
    return _float_matrix(x, what, arrays)


def features_and_codebook(features: Any, codebook: Any, codebook_name: str, arrays=HostArrays) -> tuple[Any, Any]:
    """Features (N, D), C-contiguous on the host, and a codebook-shaped (K, D) array (the
    caller's memory) of one float dtype; device arrays as ``arrays`` sees them."""
    features = _float_matrix(features, "features", arrays)
    codebook = _float_matrix(codebook, codebook_name, arrays)
    check_same_dtype(features=features, **{codebook_name: codebook})
    check_feature_size(features, "features", codebook)
    return arrays.contiguous(features), codebook


def codes_of(codes: Any, features: np.ndarray, num_codes: int) -> np.ndarray:
    """Codes as a flat int64 vector, one per row of ``features``, each in [0, num_codes)."""
    return _labels(codes, features.shape[0], num_codes, HostArrays, "features")


def sample_weights(weights: Any, features: np.ndarray) -> np.ndarray | None:
    """Per-row weights as a float64 vector (None: every row weighs 1), finite and >= 0."""
    if weights is None:
        return None
    array = np.ascontiguousarray(_weights_array(np.asarray(HostArrays.asarray(weights, "weights")), features),
                                 dtype=np.float64)
    if not (np.isfinite(array).all() and (array >= 0).all()):
        raise ValueError(WEIGHTS_NOT_FINITE)
    return array


WEIGHTS_NOT_FINITE = "weights must be finite and >= 0"


def _weights_array(array: Any, features: Any) -> Any:
    """``array`` as per-row weights: real numbers, one per row of ``features``."""
    if array.dtype.kind not in "biuf":
        raise TypeError(f"weights must be real numbers, got dtype {array.dtype}")
    if tuple(array.shape) != (features.shape[0],):
        raise ValueError(f"weights must have one value per row of features, shape ({features.shape[0]},); "
                         f"got shape {tuple(array.shape)}")
    return array


def state_array(array: Any, name: str, shape: tuple[int, ...], dtype: np.dtype, inputs: dict,
                arrays=HostArrays) -> Any:
    """A state array the call updates in place: a writable array of ``shape`` and ``dtype`` in the
    memory of ``arrays`` (host, or a device call's), that owns each of its elements and shares no
    memory with the call's inputs."""
    if isinstance(array, (list, tuple)):
        raise TypeError(f"{name} must be an array, got a {type(array).__name__}")
    check_writable(array)
    if arrays is not HostArrays and not arrays.holds(array):
        raise ValueError(f"{name} must live in device memory, where backend 'cuda' computes: the update writes it "
                         "in place")
    checked = arrays.asarray(array, name)
    if checked.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, as the features and embed, got {checked.dtype}")
    if tuple(checked.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(checked.shape)}")
    if not arrays.is_writable(checked):
        raise ValueError(f"{name} is read-only; the update writes it in place")
    if overlaps_itself(tuple(checked.shape), arrays.strides(checked), checked.dtype.itemsize):
        raise ValueError(f"{name} overlaps itself (strides {tuple(arrays.strides(checked))} for shape "
                         f"{tuple(checked.shape)}): some of its elements share memory; pass an array that owns each")
    for input_name, value in inputs.items():
        if value is not None and arrays.may_share_memory(checked, value):
            raise ValueError(f"{name} shares memory with {input_name}; pass arrays of their own")
    return checked


def check_has_codes(rows: Any, codebook: Any, codebook_name: str) -> None:
    """A batch with rows needs a code to assign them to."""
    if codebook.shape[0] == 0 and rows.shape[0] > 0:
        raise ValueError(f"{codebook_name} has no codes to assign rows to")


def kmeans_states(centers: Any, weight_sums: Any, centers_checked: Any, inputs: dict,
                  arrays=HostArrays) -> tuple[Any, Any]:
    """Mini-batch k-means' two state arrays, shaped and typed after ``centers_checked`` (K, D)."""
    num_codes = centers_checked.shape[0]
    states = (state_array(centers, "centers", tuple(centers_checked.shape), centers_checked.dtype, inputs, arrays),
              state_array(weight_sums, "weight_sums", (num_codes,), centers_checked.dtype, inputs, arrays))
    distinct_states(arrays, centers=states[0], weight_sums=states[1])
    return states


def ema_states(cluster_size: Any, embed_avg: Any, embed: Any, embed_checked: Any, inputs: dict,
               arrays=HostArrays) -> tuple[Any, Any, Any]:
    """The EMA codebook's three state arrays, shaped and typed after ``embed_checked`` (K, D)."""
    num_codes, width = embed_checked.shape
    states = (state_array(cluster_size, "cluster_size", (num_codes,), embed_checked.dtype, inputs, arrays),
              state_array(embed_avg, "embed_avg", (num_codes, width), embed_checked.dtype, inputs, arrays),
              state_array(embed, "embed", (num_codes, width), embed_checked.dtype, inputs, arrays))
    distinct_states(cluster_size=states[0], embed_avg=states[1], embed=states[2], arrays=arrays)
    return states


def float64_input(x: Any, what: str, shape: tuple[int, ...]) -> np.ndarray:
    """An input of sums or counts (``ema_apply``), read as float64."""
    array = np.ascontiguousarray(HostArrays.asarray(x, what), dtype=np.float64)
    if array.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, got {array.shape}")
    return array


def distinct_states(arrays=HostArrays, **named: Any) -> None:
    """The state arrays of one update must not share memory: each is read whole before any is written."""
    items = list(named.items())
    for position, (name, array) in enumerate(items):
        for other_name, other in items[position + 1:]:
            if arrays.may_share_memory(array, other):
                raise ValueError(f"{name} and {other_name} share memory; each state array must be its own")


# --------------------------------------------------------------------------- device arrays


def device_codes(codes: Any, features: Any, num_codes: int, weights: Any, arrays, count: bool = True) -> tuple:
    """Device codes (any integer dtype, N values in [0, num_codes)) and optional per-row weights
    (real, finite, >= 0), checked: (codes as an int64 vector, weights as a float64 vector or
    None, each code's number of rows as int64 or None where not ``count``). Host codes or
    weights are copied to the device first. The values are checked on the device, in one pass
    that also makes the int64 and float64 copies the kernels read."""
    flat = flat_labels(codes, features.shape[0], arrays, "features")
    weights = device_weights(weights, features, arrays)
    checked = arrays.checked_codes(flat, num_codes, weights, count)
    if checked.bad_code is not None:
        raise label_out_of_range(*checked.bad_code, num_codes)
    if checked.bad_weight is not None:
        raise ValueError(WEIGHTS_NOT_FINITE)
    return checked.codes, checked.weights, checked.counts


def device_weights(weights: Any, features: Any, arrays) -> Any:
    """Per-row weights as the device sees them (None: every row weighs 1), their dtype and shape
    checked; their values are checked by ``device_codes``."""
    if weights is None:
        return None
    if isinstance(weights, (list, tuple)):
        weights = np.asarray(weights)
    return _weights_array(arrays.asarray(weights, "weights"), features)


def device_float64_input(x: Any, what: str, shape: tuple[int, ...], arrays) -> Any:
    """An input of sums or counts (``ema_apply``) on the device, of any real dtype (the kernels
    read it as float64)."""
    if isinstance(x, (list, tuple)):
        x = np.asarray(x, dtype=np.float64)
    array = arrays.asarray(x, what)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{what} must be real numbers, got dtype {array.dtype}")
    if tuple(array.shape) != shape:
        raise ValueError(f"{what} must have shape {shape}, got {tuple(array.shape)}")
    return array
