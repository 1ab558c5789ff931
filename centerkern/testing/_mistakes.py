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
    # (features, labels, centers, alpha, rule, reference=reference) -> Quantities or None; the
    # reference is the step made right, which another mistake made at once can replace
    predict: Callable[..., Quantities | None]
    # a mistake about precision is compared at float32's tolerance, on the quantities it changes
    tolerance_floor: float = 0.0
    # a further condition on what the step returned, where the prediction's tolerance alone would
    # let the mistake explain any small deviation: (quantity, its value, the step's outputs, the
    # case, the rule) -> bool
    observed_must: Callable[..., bool] | None = None
    # A mistake of the step's inputs or of its arithmetic (alpha read the other way, labels moved,
    # float32 sums), which another mistake can be made under: (case, rule, reference) -> (case,
    # reference) as the step saw them, or None where the mistake cannot be made. Only mistakes
    # with ``alters`` are tried together with another one (see ``made_together``).
    alters: Callable[..., tuple | None] | None = None
    # precision mistakes say how far float64 inputs land from the reference: "as float32 sums would"
    precision: str | None = None
    family: str = ""  # mistakes of one family (rule, alpha, labels, precision) are never paired
    parts: tuple = ()  # the two mistakes of a pair made at once (see made_together)


def reference(features, labels, centers, alpha, rule) -> Quantities:
    """The step made right: centerkern's ``numpy`` backend (float64 sums, whatever the dtype);
    half-precision inputs are computed in float64 (what a half-precision step can at best round)."""
    if features.dtype.itemsize < 4:
        features, centers = features.astype(np.float64), centers.astype(np.float64)
    result = center_loss(features, labels, centers, alpha, rule=rule, backend="numpy")
    return Quantities(result.loss, result.centers, result.grad_centers if rule == "pytorch" else result.grad)


def _rows(features, labels, centers, sums_dtype=np.float64):
    """(d_i in float64, n_j per class, S_j per class accumulated in ``sums_dtype``, as float64)."""
    differences = features.astype(np.float64) - centers[labels].astype(np.float64)
    counts = np.bincount(labels, minlength=centers.shape[0])
    sums = np.zeros((centers.shape[0], centers.shape[1]), dtype=sums_dtype)
    np.add.at(sums, labels, differences.astype(sums_dtype))
    return differences, counts, sums.astype(np.float64)


def _sums_dtype(reference, features) -> type:
    """The dtype a prediction accumulates its own class sums in: float32 under the float32-sums
    mistake (whose reference says so) for float64 inputs, else float64."""
    return np.float32 if getattr(reference, "sums_in_float32", False) and features.dtype == np.float64 \
        else np.float64


def _moved(centers, labels, update):
    """The centers with ``update`` (K, D) added to the batch's classes, in the centers' dtype."""
    moved = centers.astype(np.float64)
    touched = np.unique(labels)
    moved[touched] += update[touched]
    return moved.astype(centers.dtype)


def _with_rows(right: Quantities, centers, labels, rows, moves_centers: bool) -> Quantities:
    """``right`` with the rule's row update replaced by ``rows`` (K, D): added to the centers for
    the rules that move them, as grad_centers for ``pytorch``."""
    if moves_centers:
        return right._replace(centers=_moved(centers, labels, rows))
    return right._replace(third=rows.astype(right.third.dtype))


# --------------------------------------------------------------------------- mistakes of the inputs


def _altered_inputs(change):
    """A mistake of the step's inputs: ``change(case, rule)`` is the case as the step used it (or
    None where the mistake cannot be made), and the step is otherwise right."""
    def alters(case, rule, right):
        changed = change(case, rule)
        return None if changed is None else (changed, right)

    def predict(features, labels, centers, alpha, rule, reference=reference):
        changed = change((features, labels, centers, alpha), rule)
        return None if changed is None else reference(*changed, rule)
    return {"alters": alters, "predict": predict}


def _alpha_crossed(for_rule):
    """alpha read as 1 - alpha: facenet's alpha is the retention, wen's the step."""
    def change(case, rule):
        features, labels, centers, alpha = case
        return (features, labels, centers, 1.0 - alpha) if rule == for_rule else None
    return _altered_inputs(change)


def _labels_changed(how):
    def change(case, rule):
        features, labels, centers, alpha = case
        changed = how(labels, centers.shape[0])
        return None if changed is None else (features, changed, centers, alpha)
    return _altered_inputs(change)


def _shifted(shift):
    # modulo K: label - 1 indexing row -1 is the last row to NumPy and torch alike (and where
    # K = 1 nothing moves: the step is right there, as the prediction says)
    return lambda labels, classes: (labels + shift) % classes


def _clamped(labels, classes):
    # min(label, K - 2): the last class folded into the one before it (where K = 1, nothing moves)
    return np.minimum(labels, max(classes - 2, 0))


def _float32_values(value) -> bool:
    """Whether every value is a float32 number: what a computation done in float32 returns,
    whatever dtype it is handed back in (a float64 computation almost never does)."""
    as_float64 = np.asarray(value, dtype=np.float64)
    return bool(np.array_equal(as_float64.astype(np.float32).astype(np.float64), as_float64, equal_nan=True))


def _near_float32(value, error) -> bool:
    """Whether every value lies within ``error`` (elementwise, or one bound) of a float32 number:
    a float32 result read back through float64 arithmetic that rounds it by no more than that."""
    value = np.asarray(value, dtype=np.float64)
    return bool(np.all(np.abs(value - value.astype(np.float32).astype(np.float64)) <= error))


def _in_float32(case, rule):
    features, labels, centers, alpha = case
    if features.dtype != np.float64:
        return case  # float32 inputs computed in float32 is right
    return features.astype(np.float32), labels, centers.astype(np.float32), alpha


def _returned_in_float32_arithmetic(quantity, got, observed, case, rule) -> bool:
    if quantity == "centers" and not rule_coefficients(rule, case[3], *case[0].shape).moves_centers:
        return True  # rule pytorch hands the centers back as they were given, whatever it computes in
    return case[0].dtype != np.float64 or _float32_values(got)


def _float32_arithmetic():
    """The step computed in float32 for float64 inputs; under rule pytorch, the centers it hands
    back untouched are the caller's, not a float32 copy."""
    mistake = _altered_inputs(_in_float32)
    in_float32 = mistake["predict"]

    def predict(features, labels, centers, alpha, rule, reference=reference):
        prediction = in_float32(features, labels, centers, alpha, rule, reference=reference)
        if prediction is not None and not rule_coefficients(rule, alpha, *features.shape).moves_centers:
            prediction = prediction._replace(centers=centers)
        return prediction
    return {"alters": mistake["alters"], "predict": predict}


def _sums_in_float32_reference(features, labels, centers, alpha, rule) -> Quantities:
    """The step with each class's sum S_j accumulated in float32 (the rest in float64)."""
    right = reference(features, labels, centers, alpha, rule)
    if features.dtype != np.float64:
        return right
    coefficients = rule_coefficients(rule, alpha, *features.shape)
    _, counts, sums = _rows(features, labels, centers, sums_dtype=np.float32)
    rows = coefficients.step * sums / (1.0 + coefficients.count_weight * counts)[:, None]
    return _with_rows(right, centers, labels, rows, coefficients.moves_centers)


_sums_in_float32_reference.sums_in_float32 = True  # what the predictions that sum for themselves read


def _sums_in_float32(case, rule, right):
    return case, _sums_in_float32_reference


def _loss_in_float32(reference):
    """``reference`` with its loss accumulated in float32 (the squares of the differences summed
    in float32, then scaled), the rest as ``reference`` gives it."""
    def with_float32_loss(features, labels, centers, alpha, rule) -> Quantities:
        right = reference(features, labels, centers, alpha, rule)
        if features.dtype != np.float64:
            return right
        differences = (features.astype(np.float64) - centers[labels].astype(np.float64)).astype(np.float32)
        scale = rule_coefficients(rule, alpha, *features.shape).loss_scale
        return right._replace(loss=scale * float(np.sum(differences * differences, dtype=np.float32)))
    return with_float32_loss


def _loss_accumulated_in_float32(case, rule, right):
    return case, _loss_in_float32(right)


def _carries_a_float32_loss(quantity, got, observed, case, rule) -> bool:
    """Whether the loss the step returned is a float32 number once its scale is taken off (any of
    the scales people use): a float32 sum of squares, scaled in float64. For float32 inputs there
    is nothing to tell."""
    features = case[0]
    if features.dtype != np.float64:
        return True
    if observed.loss is None or np.size(observed.loss) != 1:
        return False
    loss = float(np.asarray(observed.loss).reshape(()))
    if loss == 0.0:
        return False  # nothing was summed: no evidence
    totals = (loss / scale(*features.shape) for scale in LOSS_SCALES.values())
    return any(_near_float32(total, 8 * np.finfo(np.float64).eps * abs(total)) for total in totals)


def _carries_float32_sums(quantity, got, observed, case, rule) -> bool:
    """Whether the step's row update, read back from what it returned (new centers minus old ones,
    or grad_centers), is made of float32 numbers: the class sums S_j themselves, or S_j times a
    step (the rule's, or alpha read the other way), or the update itself, up to the float64
    rounding of reading it back, whatever count divides it. Where the inputs are float32 there is
    nothing to tell; where the step did not return the update, or moved nothing, the mistake
    cannot be confirmed."""
    features, labels, centers, alpha = case
    if features.dtype != np.float64:
        return True
    coefficients = rule_coefficients(rule, alpha, *features.shape)
    returned = observed.centers if coefficients.moves_centers else observed.third
    if returned is None or np.shape(returned) != centers.shape or coefficients.step == 0:
        return False
    returned = np.asarray(returned, dtype=np.float64)
    start = centers.astype(np.float64) if coefficients.moves_centers else np.zeros(centers.shape)
    update = returned - start
    if not np.any(update):
        return False  # nothing was summed (centers handed back as they were): zeros are no evidence
    # the update is read back exactly to within a few ulps of the larger of the two terms
    error = 4 * np.finfo(np.float64).eps * (np.abs(returned) + np.abs(start))
    counts = np.bincount(labels, minlength=centers.shape[0])[:, None]
    # the sums may be divided by the rule's count or by another (a second mistake's: n_j, 1 + n_j)
    denominators = (1.0, np.maximum(counts, 1), 1.0 + counts)
    factors = [d * s for d in denominators for s in (1.0, 1.0 / coefficients.step, 1.0 / (1.0 - alpha or 1.0))]
    return any(_near_float32(update * factor,
                             error * np.abs(factor) + 4 * np.finfo(np.float64).eps * np.abs(update * factor))
               for factor in factors)


# --------------------------------------------------------------------------- mistakes of the formula


def _other_rule(other):
    def predict(features, labels, centers, alpha, rule, reference=reference):
        if other == rule:
            return None
        return reference(features, labels, centers, alpha, other)
    return predict


def _duplicates_dropped(features, labels, centers, alpha, rule, reference=reference):
    coefficients = rule_coefficients(rule, alpha, *features.shape)
    if not coefficients.moves_centers:
        return None
    right = reference(features, labels, centers, alpha, rule)
    differences, counts, _ = _rows(features, labels, centers)
    per_sample = coefficients.step / (1.0 + coefficients.count_weight * counts[labels])
    dropped = centers.astype(np.float64)
    dropped[labels] = dropped[labels] + per_sample[:, None] * differences  # one update per label lands
    return right._replace(centers=dropped.astype(centers.dtype))


def _gathered_after_update(features, labels, centers, alpha, rule, reference=reference):
    coefficients = rule_coefficients(rule, alpha, *features.shape)
    right = reference(features, labels, centers, alpha, rule)
    after = right.centers if coefficients.moves_centers else centers
    late = features.astype(np.float64) - after[labels].astype(np.float64)
    third = coefficients.grad_scale * late if rule != "pytorch" else right.third
    return Quantities(coefficients.loss_scale * float(np.sum(late * late)), right.centers, third)


LOSS_SCALES = {"1/(B·D)": lambda b, d: 1.0 / (b * d), "2/(B·D)": lambda b, d: 2.0 / (b * d),
               "1/(2B·D)": lambda b, d: 0.5 / (b * d), "1/B": lambda b, d: 1.0 / b, "1/(2B)": lambda b, d: 0.5 / b,
               "2/B": lambda b, d: 2.0 / b, "1 (a sum)": lambda b, d: 1.0}
RULE_LOSS_SCALE = {"facenet": "1/(B·D)", "wen": "1/(2B)", "pytorch": "1/B"}


def _loss_scaled(name):
    """The loss (and, as autograd would give it, the grad) scaled by ``name`` instead of the
    rule's own scale; the centers right."""
    def predict(features, labels, centers, alpha, rule, reference=reference):
        if name == RULE_LOSS_SCALE[rule]:
            return None
        right = reference(features, labels, centers, alpha, rule)
        factor = LOSS_SCALES[name](*features.shape) / LOSS_SCALES[RULE_LOSS_SCALE[rule]](*features.shape)
        return Quantities(right.loss * factor, right.centers, right.third * factor)
    return predict


def _sign_flipped(features, labels, centers, alpha, rule, reference=reference):
    right = reference(features, labels, centers, alpha, rule)
    if rule == "pytorch":
        return right._replace(third=-right.third)
    moved_by = right.centers.astype(np.float64) - centers.astype(np.float64)
    return right._replace(centers=(centers.astype(np.float64) - moved_by).astype(centers.dtype))


def _per_class(step_of, denominator_of):
    """The centers moved by ``step_of(alpha) * S_j / denominator_of(n_j)``: a rule's own count
    where it has none, or the count of the other rule."""
    def predict(features, labels, centers, alpha, rule, reference=reference):
        right = reference(features, labels, centers, alpha, rule)
        _, counts, sums = _rows(features, labels, centers, _sums_dtype(reference, features))
        update = step_of(alpha) * sums / denominator_of(counts)[:, None]
        return right._replace(centers=_moved(centers, labels, update))
    return predict


def _grad_centers_over_count(features, labels, centers, alpha, rule, reference=reference):
    """Rule pytorch's grad_centers divided by 1 + n_j, as wen divides its step."""
    right = reference(features, labels, centers, alpha, rule)
    counts = np.bincount(labels, minlength=centers.shape[0])
    return right._replace(third=(right.third.astype(np.float64) / (1.0 + counts)[:, None]).astype(right.third.dtype))


def _features_gradient_as_third(features, labels, centers, alpha, rule, reference=reference):
    """Rule pytorch's third output as the gradient with respect to the features (which has the
    shape of grad_centers exactly when B = K, where its form cannot show it)."""
    right = reference(features, labels, centers, alpha, rule)
    coefficients = rule_coefficients(rule, alpha, *features.shape)
    differences, _, _ = _rows(features, labels, centers)
    return right._replace(third=(coefficients.grad_scale * differences).astype(right.third.dtype))


def _transposed_centers(features, labels, centers, alpha, rule, reference=reference):
    """The centers handed back transposed. Where K = D their shape cannot show it, and the values
    are transposed; elsewhere the diagnosis reads them transposed back (a form problem), so the
    prediction there is the reference's own."""
    right = reference(features, labels, centers, alpha, rule)
    if centers.shape[0] != centers.shape[1]:
        return right
    return right._replace(centers=np.ascontiguousarray(right.centers.T))


def _only_for(rule_name, predict):
    def predict_for_rule(features, labels, centers, alpha, rule, reference=reference):
        return predict(features, labels, centers, alpha, rule, reference=reference) if rule == rule_name else None
    return predict_for_rule


# --------------------------------------------------------------------------- two at once


# Another rule under alpha read the other way is a third formula (wen's step without its count,
# facenet's with wen's count): where it is known it is named as itself, and it is never told as
# two mistakes the step did not make, of which one would send the user to fix an alpha that is right.
_NEVER_PAIRED = ({"rule", "alpha"},)


def made_together(first: Mistake, second: Mistake) -> Mistake | None:
    """The step that makes ``first`` under ``second`` (a mistake of the inputs or of the
    arithmetic, with ``alters``): ``first``'s prediction on the inputs, and with the arithmetic,
    that ``second`` gives. None where the pair means nothing: ``second`` alters nothing, both are
    of one family (alpha read the other way twice, labels moved twice), or they are a family pair
    that is another formula in disguise (``_NEVER_PAIRED``)."""
    if second.alters is None or first is second:
        return None
    families = {first.family, second.family}
    if (first.family and first.family == second.family) or families in _NEVER_PAIRED:
        return None

    def predict(features, labels, centers, alpha, rule, reference=reference):
        altered = second.alters((features, labels, centers, alpha), rule, reference)
        if altered is None:
            return None
        case, altered_reference = altered
        return first.predict(*case, rule, reference=altered_reference)

    def observed_must(quantity, got, observed, case, rule):
        # each part's condition on the inputs as the other part altered them (float32 sums
        # counted over labels the step shifted)
        for part, other in ((first, second), (second, first)):
            if part.observed_must is None:
                continue
            altered = other.alters(case, rule, reference) if other.alters is not None else (case, None)
            if altered is None or not part.observed_must(quantity, got, observed, altered[0], rule):
                return False
        return True

    return Mistake(f"two mistakes at once: ({first.explanation}) and ({second.explanation})", predict,
                   tolerance_floor=max(first.tolerance_floor, second.tolerance_floor), observed_must=observed_must,
                   parts=(first, second))


# public as centerkern.testing.KNOWN_MISTAKES (documented there)
KNOWN_MISTAKES: tuple[Mistake, ...] = (
    *(Mistake(f"this matches rule {other!r}", _other_rule(other), family="rule") for other in RULES),
    Mistake("duplicate labels are not accumulated (a fancy-index update such as centers[labels] += u keeps one "
            "update per label; use index_add_ / scatter_add / np.add.at)", _duplicates_dropped),
    Mistake("centers were gathered after the update: the loss (and grad) use the new centers, not the centers as "
            "they were before the call", _gathered_after_update),
    Mistake("the labels look shifted by +1 (off-by-one indexing)", **_labels_changed(_shifted(1)), family="labels"),
    Mistake("the labels look shifted by -1 (off-by-one indexing)", **_labels_changed(_shifted(-1)), family="labels"),
    Mistake("the labels are clamped into range: label K - 1 is read as K - 2 (the last class folded into the one "
            "before it; a label out of range should raise, not be clamped)", **_labels_changed(_clamped),
            family="labels"),
    Mistake("float64 inputs were computed in float32: precision is lost (a downcast somewhere)",
            **_float32_arithmetic(), tolerance_floor=1e-4, observed_must=_returned_in_float32_arithmetic,
            precision="as float32 arithmetic would", family="precision"),
    # (listed before the float32 sums, so that a pair of the two makes this one under those: its
    # prediction takes the reference it is handed, theirs does not)
    Mistake("the loss is accumulated in float32 for float64 inputs (the squares summed in float32: sum them in "
            "float64, as the reference does)",
            lambda *case, reference=reference: _loss_in_float32(reference)(*case), alters=_loss_accumulated_in_float32,
            tolerance_floor=1e-4, observed_must=_carries_a_float32_loss, precision="as a float32 sum would",
            family="loss precision"),
    # (its prediction is its own reference: it is never made under another mistake of precision,
    # one family, and the mistakes of the inputs it is paired with hand it the case they altered)
    Mistake("the per-class sums are accumulated in float32 for float64 inputs (a float32 buffer: sum in float64, "
            "as the reference does)",
            lambda *case, reference=reference: _sums_in_float32_reference(*case), alters=_sums_in_float32,
            tolerance_floor=1e-4, observed_must=_carries_float32_sums, precision="as float32 sums would",
            family="precision"),
    *(Mistake(f"the loss is scaled by {name} instead of the rule's own scale", _loss_scaled(name))
      for name in LOSS_SCALES),
    Mistake("alpha is used as facenet's step (+ alpha·d instead of + (1 - alpha)·d: facenet's alpha is the "
            "retention)", **_alpha_crossed("facenet"), family="alpha"),
    Mistake("alpha is used as 1 - alpha in wen's update (wen's alpha is the step itself; it is facenet's alpha "
            "that is the retention)", **_alpha_crossed("wen"), family="alpha"),
    Mistake("the update has the wrong sign: the centers are pushed away from the features", _sign_flipped),
    Mistake("the centers come back transposed (where K = D their shape cannot show it)", _transposed_centers),
    Mistake("this looks like the gradient with respect to the features, not grad_centers (the third output of "
            "rule 'pytorch')", _only_for("pytorch", _features_gradient_as_third)),
    Mistake("wen's count is n_j instead of 1 + n_j",
            _only_for("wen", _per_class(lambda alpha: alpha, lambda counts: np.maximum(counts, 1)))),
    Mistake("wen's update is not divided by 1 + n_j: each sample moves its center by alpha·d (facenet's sum, "
            "with wen's step)", _only_for("wen", _per_class(lambda alpha: alpha, lambda counts: np.ones(counts.shape)))),
    Mistake("each class's update is averaged over its n_j samples, where facenet sums them",
            _only_for("facenet", _per_class(lambda alpha: 1.0 - alpha, lambda counts: np.maximum(counts, 1)))),
    Mistake("facenet's update is divided by 1 + n_j (wen's count brought into facenet's rule)",
            _only_for("facenet", _per_class(lambda alpha: 1.0 - alpha, lambda counts: 1.0 + counts))),
    Mistake("grad_centers is divided by 1 + n_j (wen's count in the update of rule 'pytorch', whose centers an "
            "optimizer moves by the plain gradient)", _only_for("pytorch", _grad_centers_over_count)),
)

#: Every pair of known mistakes that can be made at once (a mistake under one of the inputs or of
#: the arithmetic), for steps no single mistake explains.
PAIRS: tuple[Mistake, ...] = tuple(
    pair for n, second in enumerate(KNOWN_MISTAKES) for m, first in enumerate(KNOWN_MISTAKES)
    # two mistakes of the inputs (or the arithmetic) are one pair in either order: named once
    if not (first.alters is not None and m > n) and (pair := made_together(first, second)) is not None)
