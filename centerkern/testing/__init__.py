"""centerkern.testing: check somebody else's center-loss step against the reference.

    from centerkern.testing import check_center_loss

    def my_step(features, labels, centers, alpha):      # torch tensors in, torch tensors out
        diff = features - centers[labels]
        centers = centers.clone()
        centers[labels] += (1 - alpha) * diff             # the classic bug: duplicates dropped
        return (diff ** 2).mean(), centers

    check_center_loss(my_step, rule="facenet", framework="torch")
    # AssertionError: ... centers differ ... diagnosis: duplicate labels are not accumulated ...

``check_center_loss`` draws cases with hypothesis (heavy duplicates, one class, batches of one,
both dtypes, odd layouts), runs the step and centerkern's ``numpy`` reference, and on the first
disagreement raises an ``AssertionError`` for the smallest failing case it can find, saying which
quantity differs, by how much, and which known mistake the numbers match.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from .._api import center_loss
from .._rules import RULES, rule_coefficients
from .._validation import check_choice

__all__ = ["check_center_loss", "close_within", "difference", "FRAMEWORKS", "BACKEND_TOLERANCE"]

FRAMEWORKS = ("numpy", "torch", "jax", "tensorflow")
# a third-party step against the reference: its own summation order, float32 intermediates
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
# SPEC: every centerkern backend equals numpy to within these, whatever the summation order
BACKEND_TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


# --------------------------------------------------------------------------- frameworks


def _to_framework(framework: str, array: np.ndarray, variable: bool = False):
    if framework == "numpy":
        return array.copy(order="K")
    if framework == "torch":
        import torch

        return torch.from_numpy(np.array(array))
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(array)
    import tensorflow as tf

    # centers as a Variable, as facenet keeps them, so that a step may scatter_sub into them
    return tf.Variable(array) if variable else tf.constant(array)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # torch, TensorFlow
        value = value.numpy()
    return np.asarray(value)


# --------------------------------------------------------------------------- diagnosis


def _step_per_sample(rule, labels, alpha, batch, width, classes):
    coefficients = rule_coefficients(rule, alpha, batch, width)
    counts = np.bincount(labels, minlength=classes)
    return coefficients.step / (1.0 + coefficients.count_weight * counts[labels])


def _variants(features, labels, centers, alpha, rule):
    """What known mistakes would have returned: name -> (loss, centers, third output)."""
    batch, width = features.shape
    classes = centers.shape[0]
    variants = {}
    for other in RULES:
        if other != rule:
            result = center_loss(features, labels, centers, alpha, rule=other, backend="numpy")
            third = result.grad_centers if other == "pytorch" else result.grad
            variants[f"this matches rule {other!r}, not {rule!r}"] = (result.loss, result.centers, third)
    reference = center_loss(features, labels, centers, alpha, rule=rule, backend="numpy")
    coefficients = rule_coefficients(rule, alpha, batch, width)
    if coefficients.moves_centers:
        dropped = centers.astype(np.float64)
        differences = features - centers[labels].astype(np.float64)
        # fancy-index assignment: for a repeated label only one of the updates lands
        dropped[labels] = dropped[labels] + _step_per_sample(rule, labels, alpha, batch, width, classes)[:, None] * differences
        variants["duplicate labels are not accumulated (a fancy-index update such as centers[labels] += u "
                 "keeps one update per label; use index_add_ / scatter_add / np.add.at)"] = (
            reference.loss, dropped.astype(centers.dtype), reference.grad)
    after = reference.centers if coefficients.moves_centers else centers
    late = features.astype(np.float64) - after[labels].astype(np.float64)
    squares = float(np.sum(late * late))
    variants["centers were gathered after the update: the loss (and grad) use the new centers, not the "
             "centers as they were before the call"] = (
        coefficients.loss_scale * squares, reference.centers, coefficients.grad_scale * late)
    if classes > 1:
        for shift in (1, -1):
            # modulo K: label - 1 indexing row -1 is the last row to NumPy and torch alike
            shifted = (labels + shift) % classes
            result = center_loss(features, shifted, centers, alpha, rule=rule, backend="numpy")
            third = result.grad_centers if rule == "pytorch" else result.grad
            variants[f"the labels look shifted by {shift:+d} (off-by-one indexing)"] = (
                result.loss, result.centers, third)
    if features.dtype == np.float64:
        low = center_loss(features.astype(np.float32), labels, centers.astype(np.float32), alpha, rule=rule,
                          backend="numpy")
        third = low.grad_centers if rule == "pytorch" else low.grad
        variants["float64 inputs were computed in float32: precision is lost (a downcast somewhere)"] = (
            low.loss, low.centers.astype(np.float64), None if third is None else third.astype(np.float64))
    return variants


def _loss_scale_diagnosis(loss, squares, batch, width, rule):
    expected = {"facenet": "1/(B·D)", "wen": "1/(2B)", "pytorch": "1/B"}[rule]
    scales = {"1/(B·D)": 1.0 / (batch * width), "2/(B·D)": 2.0 / (batch * width), "1/(2B·D)": 0.5 / (batch * width),
              "1/B": 1.0 / batch, "1/(2B)": 0.5 / batch, "2/B": 2.0 / batch, "1 (a sum)": 1.0}
    # on a small case two scales can coincide (1/B is 2/(B·D) when D = 2): name every match
    matches = [f"loss is scaled by {name} vs {expected}" for name, scale in scales.items()
               if name != expected and squares and np.isclose(loss, scale * squares, rtol=1e-4)]
    return " or ".join(matches) or None


def close_within(got, expected, tolerance, *magnitudes) -> bool:
    """Equal to within ``tolerance``, relative to the larger of the value and the magnitudes
    (the inputs): sums of terms that cancel are exact only to the terms' own scale. NaN equals
    NaN; None equals None only."""
    if got is None or expected is None:
        return got is None and expected is None
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return False
    scale = max([1e-300] + [float(np.max(np.abs(m), initial=0.0)) for m in (expected, *magnitudes)])
    return bool(np.allclose(got, expected, rtol=tolerance, atol=tolerance * scale, equal_nan=True))


def difference(got, expected) -> str:
    """Where and by how much ``got`` differs from ``expected``, in words."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return f"shape {got.shape} instead of {expected.shape}"
    error = np.abs(got - expected)
    worst = np.unravel_index(int(np.argmax(error)), error.shape) if error.size else ()
    return (f"max abs difference {float(np.max(error, initial=0.0)):.3g}"
            + (f" at {tuple(int(i) for i in worst)} (got {got[worst]:.6g}, expected {expected[worst]:.6g})"
               if error.size else ""))


# --------------------------------------------------------------------------- the check


def _check_case(step, rule, framework, features, labels, centers, alpha):
    reference = center_loss(features, labels, centers, alpha, rule=rule, backend="numpy")
    expected_third = reference.grad_centers if rule == "pytorch" else reference.grad
    outputs = step(_to_framework(framework, features), _to_framework(framework, labels),
                   _to_framework(framework, centers, variable=True), alpha)
    if not isinstance(outputs, (tuple, list)) or len(outputs) not in (2, 3):
        raise AssertionError(f"the step must return (loss, new_centers) or (loss, new_centers, "
                             f"{'grad_centers' if rule == 'pytorch' else 'grad'}), got {type(outputs).__name__}")
    loss = float(_to_numpy(outputs[0]))
    new_centers = _to_numpy(outputs[1])
    third = _to_numpy(outputs[2]) if len(outputs) == 3 else None
    tolerance = TOLERANCE[np.dtype(features.dtype)]

    problems = []
    if not np.isclose(loss, reference.loss, rtol=tolerance, atol=1e-300):
        problems.append(f"loss is {loss:.9g}, expected {reference.loss:.9g} "
                        f"(relative difference {abs(loss - reference.loss) / max(abs(reference.loss), 1e-300):.3g})")
    if not close_within(new_centers, reference.centers, tolerance, features, centers):
        problems.append(f"centers differ: {difference(new_centers, reference.centers)}")
    third_name = "grad_centers" if rule == "pytorch" else "grad"
    if third is not None and not close_within(third, expected_third, tolerance, features, centers):
        problems.append(f"{third_name} differs: {difference(third, expected_third)}")
    if new_centers.dtype != features.dtype and np.issubdtype(new_centers.dtype, np.floating):
        problems.append(f"centers come back as {new_centers.dtype} for {features.dtype} inputs")
    if not problems:
        return

    diagnoses = []
    for name, (variant_loss, variant_centers, variant_third) in _variants(features, labels, centers, alpha,
                                                                         rule).items():
        variant_tolerance = max(tolerance, TOLERANCE[np.dtype(np.float32)]) if "float32" in name else tolerance
        if (np.isclose(loss, variant_loss, rtol=variant_tolerance, atol=1e-300)
                and close_within(new_centers, variant_centers, variant_tolerance, features, centers)
                and (third is None or variant_third is None
                     or close_within(third, variant_third, variant_tolerance, features, centers))):
            diagnoses.append(name)
    if not diagnoses:
        differences = features.astype(np.float64) - centers[labels].astype(np.float64)
        scale = _loss_scale_diagnosis(loss, float(np.sum(differences * differences)), *features.shape, rule)
        if scale:
            diagnoses.append(scale)
    counts = np.bincount(labels, minlength=centers.shape[0])
    arrays = ""
    if features.size + centers.size <= 40:  # small enough to read: show the whole case
        arrays = (f"\nfeatures={np.array2string(features, separator=', ')}"
                  f"\ncenters={np.array2string(centers, separator=', ')}")
    raise AssertionError(
        f"center-loss step disagrees with centerkern's reference for rule {rule!r}:\n  - "
        + "\n  - ".join(problems)
        + f"\ncase: B={features.shape[0]}, D={features.shape[1]}, K={centers.shape[0]}, dtype {features.dtype}, "
        f"alpha={alpha}, labels={labels.tolist()} (most repeated class: {int(counts.max())} samples)"
        + arrays
        + ("\ndiagnosis: " + "; ".join(diagnoses) if diagnoses else "\ndiagnosis: no known mistake matches these numbers")
    )


def check_center_loss(step: Callable, rule: str = "facenet", *, framework: str = "numpy", max_examples: int = 200,
                      alpha: float | None = None) -> None:
    """Check ``step`` against centerkern's reference on cases drawn by hypothesis.

    Parameters
    ----------
    step : callable ``(features, labels, centers, alpha) -> (loss, new_centers[, third])``
        Arrays of ``framework`` in and out. The optional third output is the grad with respect
        to the features for rules ``facenet`` and ``wen``, and ``grad_centers`` for ``pytorch``.
        The step may update ``centers`` in place (it receives a fresh copy every time; a
        TensorFlow step receives a ``tf.Variable``).
    rule : {"facenet", "wen", "pytorch"}
        The published formula the step claims to implement (see ``centerkern.center_loss``).
    framework : {"numpy", "torch", "jax", "tensorflow"}
    max_examples : int
        How many cases hypothesis draws.
    alpha : float, optional
        A fixed alpha; by default hypothesis varies it.

    Raises
    ------
    AssertionError
        For the smallest failing case found, naming what differs and, where the numbers match a
        known mistake, the diagnosis.
    """
    check_choice(rule, "rule", RULES)
    check_choice(framework, "framework", FRAMEWORKS)
    if framework != "numpy":
        try:
            importlib.import_module(framework)
        except ImportError as error:
            raise ImportError(f"framework {framework!r} is not installed: {error}") from error
    from hypothesis import HealthCheck, given, settings

    from .strategies import center_loss_inputs

    @settings(max_examples=max_examples, deadline=None, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(center_loss_inputs(alpha=alpha))
    def agrees_with_reference(case):
        _check_case(step, rule, framework, *case)

    agrees_with_reference()
