"""What the oracle tells a user whose step disagrees with the reference, so that it never misleads.

1. **Form first.** Outputs of the wrong shape, dtype or kind (a loss that is not a scalar,
   transposed centers, the features' gradient where ``grad_centers`` belongs, new centers from a
   ``pytorch`` step) are named as such, and no formula is matched against them.
2. **Evidence per quantity.** Each quantity that differs (loss, centers, the third output) is
   matched on its own against every known mistake (``_mistakes``): the user learns, say, that the
   centers follow rule ``wen`` while the loss is facenet's.
3. **Discriminate before naming.** A shrunk case can be too small to tell mistakes apart (at
   B = D = 1 the loss scales 1/B, 1/(B·D) and a plain sum coincide; with one sample per class
   facenet's and wen's counts do). The step is run again on larger fixed cases (repeated labels,
   several columns, classes absent from the batch, alpha other than 0.5), and a mistake counts
   for a quantity only if it reproduces that quantity on every case. A mistake is *the*
   diagnosis only if it reproduces every quantity the step returned: the ones that differ, and
   the ones that are right.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ._mistakes import KNOWN_MISTAKES, Mistake, Quantities, reference

QUANTITIES = ("loss", "centers", "third")


def third_name(rule: str) -> str:
    return "grad_centers" if rule == "pytorch" else "grad"


def discriminating_cases(dtype) -> list[tuple]:
    """Fixed cases that tell the known mistakes apart: repeated labels with different counts per
    class, classes absent from the batch, D > 1, B > D, alpha far from 0.5 on either side."""
    rng = np.random.default_rng(20161008)
    cases = []
    for labels, width, classes, alpha in (([0, 0, 2, 0, 3, 2, 0], 3, 5, 0.3), ([3, 1, 3, 3, 1, 0], 2, 6, 0.8)):
        labels = np.array(labels, dtype=np.int64)
        features = rng.standard_normal((labels.size, width)).astype(dtype)
        centers = rng.standard_normal((classes, width)).astype(dtype)
        cases.append((features, labels, centers, alpha))
    return cases


def form_mistakes(observed: Quantities, rule: str, features: np.ndarray, centers: np.ndarray) -> list[tuple[str, bool]]:
    """Outputs that do not have the form the rule asks for, each named as such, and whether the
    values can still be compared with the reference (a wrong dtype: yes; a wrong shape: no)."""
    (batch, width), classes = features.shape, centers.shape[0]
    found = []
    if np.size(observed.loss) != 1:
        found.append((f"the loss is not a scalar: shape {np.shape(observed.loss)} (return one number: the mean "
                      "or sum the rule asks for)", False))
    got = observed.centers
    if got.shape != centers.shape:
        if got.shape == centers.shape[::-1]:
            found.append((f"the centers come back transposed: shape {got.shape}, expected {centers.shape} (K, D)",
                          False))
        else:
            found.append((f"the centers have shape {got.shape}, expected {centers.shape} (K, D)", False))
    elif rule == "pytorch" and not np.array_equal(got, centers, equal_nan=True):
        found.append(("new centers were returned for rule 'pytorch', which leaves the centers to the caller's "
                      "optimizer: return them unchanged, and grad_centers as the third output", False))
    elif np.issubdtype(got.dtype, np.floating) and got.dtype != features.dtype:
        found.append((f"the centers come back as {got.dtype} for {features.dtype} inputs", True))
    third = observed.third
    if third is not None:
        expected = (classes, width) if rule == "pytorch" else (batch, width)
        if third.shape != expected:
            if rule == "pytorch" and third.shape == (batch, width):
                found.append(("the third output has shape (B, D): this looks like the gradient with respect to "
                              "the features; for rule 'pytorch' the third output is grad_centers, shape (K, D)",
                              False))
            elif rule != "pytorch" and third.shape == (classes, width):
                found.append((f"the third output has shape (K, D): this looks like grad_centers; for rule "
                              f"{rule!r} the third output is the gradient with respect to the features, shape "
                              "(B, D)", False))
            else:
                found.append((f"the third output ({third_name(rule)}) has shape {third.shape}, expected {expected}",
                              False))
    return found


class Evidence:
    """The user's outputs and every mistake's predictions on one case."""

    def __init__(self, case: tuple, observed: Quantities, rule: str):
        features, labels, centers, alpha = case
        self.case, self.observed, self.rule = case, observed, rule
        self.reference = reference(features, labels, centers, alpha, rule)
        self.predictions = {mistake: mistake.predict(features, labels, centers, alpha, rule)
                            for mistake in KNOWN_MISTAKES}

    def matches(self, got: Any, expected: Any, tolerance: float) -> bool:
        from . import close_within

        if got is None or expected is None:
            return got is None and expected is None
        features, _, centers, _ = self.case
        if np.shape(got) != np.shape(expected):
            return False
        if np.ndim(expected) == 0:
            return bool(np.isclose(float(np.asarray(got).reshape(())), expected, rtol=tolerance, atol=1e-300,
                                   equal_nan=True))
        return close_within(got, expected, tolerance, features, centers)

    def tolerance(self, got: Any, mistake: Mistake | None = None) -> float:
        """The inputs' dtype's tolerance; float32's for values handed back in float32 (they carry
        no more), or where the mistake is about float32 itself."""
        from . import TOLERANCE

        floors = [TOLERANCE[np.dtype(self.case[0].dtype)], 0.0 if mistake is None else mistake.tolerance_floor]
        if np.asarray(got).dtype == np.float32:
            floors.append(TOLERANCE[np.dtype(np.float32)])
        return max(floors)

    def differs(self, quantity: str) -> bool:
        got = getattr(self.observed, quantity)
        return got is not None and not self.matches(got, getattr(self.reference, quantity), self.tolerance(got))

    def reproduces(self, mistake: Mistake, quantity: str) -> bool:
        """Whether ``mistake`` predicts the step's ``quantity`` here (a quantity the step did not
        return says nothing either way)."""
        got = getattr(self.observed, quantity)
        if got is None:
            return True
        prediction = self.predictions[mistake]
        return (prediction is not None
                and self.matches(got, getattr(prediction, quantity), self.tolerance(got, mistake))
                and (mistake.observed_must is None or mistake.observed_must(got)))


def diagnose(step_outputs: Callable[[tuple], Quantities], rule: str, case: tuple, observed: Quantities) -> str:
    """The report's lines after the list of differences: form mistakes, the evidence per quantity
    (checked on the larger cases too) where the values can be compared, and the diagnosis."""
    features, _, centers, _ = case
    form = form_mistakes(observed, rule, features, centers)
    report = ""
    if form:
        report = "what is wrong with the outputs' form:\n  - " + "\n  - ".join(text for text, _ in form) + "\n"
        if not all(comparable for _, comparable in form):
            return report + ("diagnosis: the outputs do not have the form the rule asks for (above), so no formula "
                             "is matched against them")
    evidences, skipped = [Evidence(case, observed, rule)], []
    for larger in discriminating_cases(features.dtype):
        try:
            larger_observed = step_outputs(larger)
        except Exception as error:  # a step that fails elsewhere: say so, judge on what ran
            skipped.append(f"the step raised {type(error).__name__} on a larger case: {error}")
            continue
        if not all(comparable for _, comparable in form_mistakes(larger_observed, rule, larger[0], larger[2])):
            skipped.append(f"the step's outputs on a larger case (B={larger[0].shape[0]}) have another form")
            continue
        evidences.append(Evidence(larger, larger_observed, rule))

    def reproduced(mistake, quantity):
        return all(evidence.reproduces(mistake, quantity) for evidence in evidences)

    named = [m for m in KNOWN_MISTAKES if all(reproduced(m, q) for q in QUANTITIES)]
    # where mistakes explain the whole step, each quantity is shown as they explain it (another
    # mistake that happens to give one quantity the same numbers, as wen's loss is facenet's
    # scaled by 1/(2B), would only be a second name for the same thing)
    candidates = named or KNOWN_MISTAKES
    names = {"loss": "loss", "centers": "centers", "third": third_name(rule)}
    lines = []
    for quantity in QUANTITIES:
        if getattr(observed, quantity) is None:
            continue
        if not evidences[0].differs(quantity):
            lines.append(f"{names[quantity]}: agrees with the reference")
            continue
        matched = [m.explanation for m in candidates if reproduced(m, quantity)]
        lines.append(f"{names[quantity]}: " + ("; or ".join(matched) if matched else "no known mistake reproduces it"))
    checked_on = (f"this case and {len(evidences) - 1} larger one(s): repeated labels, D > 1, classes absent "
                  "from the batch, alpha 0.3 and 0.8")
    report += f"what each quantity matches (on {checked_on}):\n  - " + "\n  - ".join(lines)
    if skipped:
        report += "\n  (" + "; ".join(skipped) + ")"
    if form:
        return report + ("\ndiagnosis: the outputs do not have the form the rule asks for (above); the values "
                         "are compared as they are")
    if named:
        return report + f"\ndiagnosis (confirmed on the larger cases): {'; or '.join(m.explanation for m in named)}"
    return report + "\ndiagnosis: no known mistake matches every quantity the step returned"
