"""The known mistakes of center-loss code, each as what it would have returned.

A mistake predicts the three quantities a step returns (loss, new centers, and the third output:
the grad for ``facenet`` and ``wen``, ``grad_centers`` for ``pytorch``) from the same inputs, so
that the diagnosis can ask of each quantity, on its own, whether the mistake reproduces it.
``predict`` returns None where the mistake cannot be made under a rule (facenet's retention
misread as the step exists only for ``facenet``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from .._api import center_loss
from .._core.rules import RULES, rule_coefficients


class Quantities(NamedTuple):
    loss: float
    centers: np.ndarray
    third: np.ndarray | None


@dataclass(frozen=True)
class Mistake:
    explanation: str  # what the user is told; unique, so tests can look for it
    predict: Callable[..., Quantities | None]  # (features, labels, centers, alpha, rule) -> Quantities or None
    tolerance_floor: float = 0.0  # a mistake about precision is compared at float32's tolerance
    # a further condition on a quantity the step returned, where the prediction's tolerance alone
    # would let the mistake explain any small deviation
    observed_must: Callable[[np.ndarray], bool] | None = None


def _float32_values(value) -> bool:
    """Whether every value is a float32 number: what a computation done in float32 returns,
    whatever dtype it is handed back in (a float64 computation almost never does)."""
    as_float64 = np.asarray(value, dtype=np.float64)
    return bool(np.array_equal(as_float64.astype(np.float32).astype(np.float64), as_float64, equal_nan=True))


def reference(features, labels, centers, alpha, rule) -> Quantities:
    result = center_loss(features, labels, centers, alpha, rule=rule, backend="numpy")
    return Quantities(result.loss, result.centers, result.grad_centers if rule == "pytorch" else result.grad)


def _rows(features, labels, centers):
    """(d_i in float64, n_j per sample, S_j per class, n_j per class)."""
    differences = features.astype(np.float64) - centers[labels].astype(np.float64)
    counts = np.bincount(labels, minlength=centers.shape[0])
    sums = np.zeros((centers.shape[0], centers.shape[1]))
    np.add.at(sums, labels, differences)
    return differences, counts, sums


def _moved(centers, labels, update):
    """The centers with ``update`` (K, D) added to the batch's classes, in the centers' dtype."""
    moved = centers.astype(np.float64)
    touched = np.unique(labels)
    moved[touched] += update[touched]
    return moved.astype(centers.dtype)


def _other_rule(other):
    def predict(features, labels, centers, alpha, rule):
        if other == rule:
            return None
        return reference(features, labels, centers, alpha, other)
    return predict


def _duplicates_dropped(features, labels, centers, alpha, rule):
    coefficients = rule_coefficients(rule, alpha, *features.shape)
    if not coefficients.moves_centers:
        return None
    right = reference(features, labels, centers, alpha, rule)
    differences, counts, _ = _rows(features, labels, centers)
    per_sample = coefficients.step / (1.0 + coefficients.count_weight * counts[labels])
    dropped = centers.astype(np.float64)
    dropped[labels] = dropped[labels] + per_sample[:, None] * differences  # one update per label lands
    return right._replace(centers=dropped.astype(centers.dtype))


def _gathered_after_update(features, labels, centers, alpha, rule):
    coefficients = rule_coefficients(rule, alpha, *features.shape)
    right = reference(features, labels, centers, alpha, rule)
    after = right.centers if coefficients.moves_centers else centers
    late = features.astype(np.float64) - after[labels].astype(np.float64)
    third = coefficients.grad_scale * late if rule != "pytorch" else right.third
    return Quantities(coefficients.loss_scale * float(np.sum(late * late)), right.centers, third)


def _labels_shifted(shift):
    def predict(features, labels, centers, alpha, rule):
        if centers.shape[0] < 2:
            return None
        # modulo K: label - 1 indexing row -1 is the last row to NumPy and torch alike
        return reference(features, (labels + shift) % centers.shape[0], centers, alpha, rule)
    return predict


def _float32_inside(features, labels, centers, alpha, rule):
    if features.dtype != np.float64:
        return None
    low = reference(features.astype(np.float32), labels, centers.astype(np.float32), alpha, rule)
    return Quantities(low.loss, low.centers.astype(np.float64), None if low.third is None else low.third.astype(np.float64))


LOSS_SCALES = {"1/(B·D)": lambda b, d: 1.0 / (b * d), "2/(B·D)": lambda b, d: 2.0 / (b * d),
               "1/(2B·D)": lambda b, d: 0.5 / (b * d), "1/B": lambda b, d: 1.0 / b, "1/(2B)": lambda b, d: 0.5 / b,
               "2/B": lambda b, d: 2.0 / b, "1 (a sum)": lambda b, d: 1.0}
RULE_LOSS_SCALE = {"facenet": "1/(B·D)", "wen": "1/(2B)", "pytorch": "1/B"}


def _loss_scaled(name):
    """The loss (and, as autograd would give it, the grad) scaled by ``name`` instead of the
    rule's own scale; the centers right."""
    def predict(features, labels, centers, alpha, rule):
        if name == RULE_LOSS_SCALE[rule]:
            return None
        right = reference(features, labels, centers, alpha, rule)
        factor = LOSS_SCALES[name](*features.shape) / LOSS_SCALES[RULE_LOSS_SCALE[rule]](*features.shape)
        return Quantities(right.loss * factor, right.centers, right.third * factor)
    return predict


def _alpha_as_facenet_step(features, labels, centers, alpha, rule):
    if rule != "facenet":
        return None
    return reference(features, labels, centers, 1.0 - alpha, rule)  # + alpha·d instead of + (1 - alpha)·d


def _sign_flipped(features, labels, centers, alpha, rule):
    right = reference(features, labels, centers, alpha, rule)
    if rule == "pytorch":
        return right._replace(third=-right.third)
    moved_by = right.centers.astype(np.float64) - centers.astype(np.float64)
    return right._replace(centers=(centers.astype(np.float64) - moved_by).astype(centers.dtype))


def _divided_by_count(step_of):
    """The class sum S_j divided by n_j, with the step ``step_of(alpha)``."""
    def predict(features, labels, centers, alpha, rule):
        right = reference(features, labels, centers, alpha, rule)
        _, counts, sums = _rows(features, labels, centers)
        update = step_of(alpha) * sums / np.maximum(counts, 1)[:, None]
        return right._replace(centers=_moved(centers, labels, update))
    return predict


def _features_gradient_as_third(features, labels, centers, alpha, rule):
    """Rule pytorch's third output as the gradient with respect to the features (which has the
    shape of grad_centers exactly when B = K, where its form cannot show it)."""
    if rule != "pytorch":
        return None
    right = reference(features, labels, centers, alpha, rule)
    coefficients = rule_coefficients(rule, alpha, *features.shape)
    differences, _, _ = _rows(features, labels, centers)
    return right._replace(third=(coefficients.grad_scale * differences).astype(right.third.dtype))


def _transposed_centers(features, labels, centers, alpha, rule):
    """The centers handed back transposed. Where K = D their shape cannot show it, and the values
    are transposed; elsewhere the diagnosis reads them transposed back (a form problem), so the
    prediction there is the reference's own."""
    right = reference(features, labels, centers, alpha, rule)
    if centers.shape[0] != centers.shape[1]:
        return right
    return right._replace(centers=np.ascontiguousarray(right.centers.T))


def _only_for(rule_name, predict):
    return lambda features, labels, centers, alpha, rule: (
        predict(features, labels, centers, alpha, rule) if rule == rule_name else None)


# public as centerkern.testing.KNOWN_MISTAKES (documented there)
KNOWN_MISTAKES: tuple[Mistake, ...] = (
    *(Mistake(f"this matches rule {other!r}", _other_rule(other)) for other in RULES),
    Mistake("duplicate labels are not accumulated (a fancy-index update such as centers[labels] += u keeps one "
            "update per label; use index_add_ / scatter_add / np.add.at)", _duplicates_dropped),
    Mistake("centers were gathered after the update: the loss (and grad) use the new centers, not the centers as "
            "they were before the call", _gathered_after_update),
    Mistake("the labels look shifted by +1 (off-by-one indexing)", _labels_shifted(1)),
    Mistake("the labels look shifted by -1 (off-by-one indexing)", _labels_shifted(-1)),
    Mistake("float64 inputs were computed in float32: precision is lost (a downcast somewhere)", _float32_inside,
            tolerance_floor=1e-4, observed_must=_float32_values),
    *(Mistake(f"the loss is scaled by {name} instead of the rule's own scale", _loss_scaled(name))
      for name in LOSS_SCALES),
    Mistake("alpha is used as facenet's step (+ alpha·d instead of + (1 - alpha)·d: facenet's alpha is the "
            "retention)", _alpha_as_facenet_step),
    Mistake("the update has the wrong sign: the centers are pushed away from the features", _sign_flipped),
    Mistake("the centers come back transposed (where K = D their shape cannot show it)", _transposed_centers),
    Mistake("this looks like the gradient with respect to the features, not grad_centers (the third output of "
            "rule 'pytorch')", _features_gradient_as_third),
    Mistake("wen's count is n_j instead of 1 + n_j", _only_for("wen", _divided_by_count(lambda alpha: alpha))),
    Mistake("each class's update is averaged over its n_j samples, where facenet sums them",
            _only_for("facenet", _divided_by_count(lambda alpha: 1.0 - alpha))),
)
