"""The codebook functions on device arrays (``centerkern.codebooks`` with ``backend="cuda"``, or
``"auto"`` with a device array among the inputs): the same checks through the call's
``CodebookArrays`` (``_core.codebooks``' ``features_and_codebook`` and its ``device_*`` checks),
the ``cuda`` backend's codebook functions on the caller's stream, and results of the framework of
the first device input (host arrays where there is none: backend="cuda" on host arrays).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _backends
from ._core import codebooks as checks
from ._core.interop import converter_like, exportable, is_device_array, mark_written
from ._core.validation import check_choice
from ._results import Assignment, ClassSums, Quantized


class Device(NamedTuple):
    module: Any  # centerkern.cuda.codebooks
    arrays: Any  # the call's CodebookArrays
    like: Any  # the device input whose framework the results take; None where all are host arrays

    def results(self, host_like: Any, *views: Any) -> tuple:
        if self.like is None:
            convert = converter_like(host_like, host=True)
            return tuple(convert(self.arrays.to_host(view)) for view in views)
        convert = converter_like(self.like)
        return tuple(convert(view) for view in views)


def on_device(backend: Any, *inputs: Any) -> Device | None:
    """The call's device: for backend "cuda", and for "auto" where an input is a device array;
    None where the call runs on the host."""
    name = check_choice(backend, "backend", _backends.CHOICES)
    like = next((x for x in inputs if x is not None and is_device_array(x)), None)
    if name == "cuda" or (name == "auto" and like is not None):
        module = _backends.cuda().codebooks
        like = None if like is None else exportable(like)
        return Device(module, module.CodebookArrays(like), like)
    if like is not None:
        raise ValueError(f"backend {name!r} computes in host memory but got a device array; "
                         "use backend='cuda' or backend='auto'")
    return None


def _exportable(*arrays: Any) -> tuple:
    return tuple(exportable(x) for x in arrays)


def _written(*states: Any) -> None:
    for state in states:
        mark_written(state)


def assign_codes(device: Device, features: Any, codebook: Any) -> Assignment:
    arrays = device.arrays
    rows, codebook = checks.features_and_codebook(*_exportable(features, codebook), "codebook", arrays)
    checks.check_has_codes(rows, codebook, "codebook")
    codes, distances = arrays.empty((rows.shape[0],), np.int64), arrays.empty((rows.shape[0],), rows.dtype)
    arrays.run(device.module.assign_codes, rows, codebook, codes, distances)
    return Assignment(*device.results(features, codes, distances))


def class_sums(device: Device, features: Any, codes: Any, num_codes: int, weights: Any,
                          deterministic: bool) -> ClassSums:
    arrays = device.arrays
    rows = checks.float_matrix(exportable(features), "features", arrays)
    checked_codes, weights, _ = checks.device_codes(exportable(codes), rows, num_codes, exportable(weights), arrays,
                                                    count=False)
    counts, sums = arrays.empty((num_codes,), np.float64), arrays.empty((num_codes, rows.shape[1]), np.float64)
    arrays.run(device.module.class_sums, rows, checked_codes, weights, counts, sums, deterministic=deterministic)
    return ClassSums(*device.results(features, counts, sums))


def ema_update(device: Device, features: Any, codes: Any, states: tuple, settings, weights: Any,
                          deterministic: bool) -> Any:
    arrays = device.arrays
    cluster_size, embed_avg, embed = _exportable(*states)
    rows, embed_checked = checks.features_and_codebook(exportable(features), embed, "embed", arrays)
    checked_codes, weights, counts = checks.device_codes(exportable(codes), rows, embed_checked.shape[0],
                                                         exportable(weights), arrays)
    checked_states = checks.ema_states(cluster_size, embed_avg, embed, embed_checked, {"features": rows}, arrays)
    arrays.run(device.module.ema_step, rows, checked_codes, weights, *checked_states, settings,
               deterministic=deterministic)
    _written(*states)
    return device.results(features, counts)[0]


def ema_apply(device: Device, counts: Any, sums: Any, states: tuple, settings) -> None:
    arrays = device.arrays
    cluster_size, embed_avg, embed = _exportable(*states)
    embed_checked = checks.float_matrix(embed, "embed", arrays)
    num_codes, width = embed_checked.shape
    counts = checks.device_float64_input(exportable(counts), "counts", (num_codes,), arrays)
    sums = checks.device_float64_input(exportable(sums), "sums", (num_codes, width), arrays)
    checked_states = checks.ema_states(cluster_size, embed_avg, embed, embed_checked, {"counts": counts, "sums": sums},
                                       arrays)
    arrays.run(device.module.ema_apply, counts, sums, *checked_states, settings)
    _written(*states)


def quantize(device: Device, features: Any, states: tuple, settings, weights: Any, update: bool,
                        deterministic: bool) -> Quantized:
    arrays, module = device.arrays, device.module
    cluster_size, embed_avg, embed = _exportable(*states)
    rows, codebook = checks.features_and_codebook(exportable(features), embed, "embed", arrays)
    num_codes, batch_size = codebook.shape[0], rows.shape[0]
    checks.check_has_codes(rows, codebook, "embed")
    weights = checks.device_weights(exportable(weights), rows, arrays) if update else None
    if update:  # every check of the arrays before the first write
        checked_states = checks.ema_states(cluster_size, embed_avg, embed, codebook,
                                           {"features": rows, "weights": weights}, arrays)
    codes, distances = arrays.empty((batch_size,), np.int64), arrays.empty((batch_size,), rows.dtype)
    arrays.run(module.assign_codes, rows, codebook, codes, distances)
    quantized = arrays.empty(tuple(rows.shape), rows.dtype)
    arrays.run(module.gather_codes, codebook, codes, quantized)  # gathered before the update moves the codes
    checked_codes, weights, counts = checks.device_codes(codes, rows, num_codes, weights, arrays)  # (the weights)
    if update:
        arrays.run(module.ema_step, rows, checked_codes, weights, *checked_states, settings,
                   deterministic=deterministic)
        _written(*states)
    return Quantized(*device.results(features, codes, distances, quantized, counts))


def kmeans_update(device: Device, features: Any, codes: Any, states: tuple, weights: Any,
                             deterministic: bool) -> Any:
    arrays = device.arrays
    centers, weight_sums = _exportable(*states)
    rows, centers_checked = checks.features_and_codebook(exportable(features), centers, "centers", arrays)
    num_codes = centers_checked.shape[0]
    checked_codes, weights, counts = checks.device_codes(exportable(codes), rows, num_codes, exportable(weights),
                                                         arrays)
    checked_states = checks.kmeans_states(centers, weight_sums, centers_checked, {"features": rows}, arrays)
    arrays.run(device.module.kmeans_update, rows, checked_codes, weights, *checked_states,
               deterministic=deterministic)
    _written(*states)
    return device.results(features, counts)[0]
