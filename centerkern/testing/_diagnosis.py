"""What the oracle tells a user whose step disagrees with the reference, so that it never misleads.

1. **Form, per quantity.** Outputs of the wrong shape, dtype or kind (a loss that is not a
   scalar, transposed centers, the features' gradient where ``grad_centers`` belongs, new centers
   from a ``pytorch`` step, float32 results for float64 inputs) are named as such. A quantity
   whose form hides its values is not compared; one whose values can still be read is compared
   as the step returned it (float32 values at float32's tolerance, transposed centers transposed
   back); the other quantities are compared as usual.
2. **Every claim on every case.** A shrunk case can be too small to show a mistake (no repeated
   label, one column) or to tell mistakes apart (at B = D = 1 the loss scales 1/B, 1/(B·D) and a
   plain sum coincide; with one sample per class facenet's and wen's counts do). The step is run
   again on larger fixed cases (repeated labels, several columns, classes absent from the batch,
   alpha other than 0.5). A quantity "agrees with the reference" only if it agrees on every case;
   otherwise its line says on which cases it differs and by how much.
3. **Evidence per quantity.** Each quantity that differs is matched on its own against every
   known mistake (``_mistakes``), and a mistake counts for it only if it reproduces that quantity
   on every case: the user learns, say, that the centers follow rule ``wen`` while the loss is
   facenet's.
4. **One mistake, several, two on one quantity, or none.** A mistake is *the* diagnosis if it
   reproduces every quantity the step returned on every case. Otherwise, if each quantity that
   differs is reproduced by some mistake on every case, the step makes several mistakes at once
   and each is named with the quantity it explains. Otherwise a pair may: a formula's mistake
   made under a mistake of the inputs or of the arithmetic (``_mistakes.made_together``), both
   changing one quantity. Otherwise the report says that no known mistake, nor a combination of
   them, explains the step.
5. **Every dtype.** The larger cases run in every dtype the step is checked in; a quantity that
   agrees in one and differs in another says so, and a mistake of precision is held to its
   looser tolerance only on the quantities it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ._cases import Case, save_cases
from ._comparison import TOLERANCE, close_within, smallest_normal, tolerance_of
from ._mistakes import KNOWN_MISTAKES, PAIRS, Mistake, Quantities, reference

QUANTITIES = ("loss", "centers", "third")
FORM_DIAGNOSIS = "diagnosis: the outputs do not have the form the rule asks for (above)"


def third_name(rule: str) -> str:
    return "grad_centers" if rule == "pytorch" else "grad"


def discriminating_cases(dtype) -> list[Case]:
    """Fixed cases that tell the known mistakes apart: repeated labels with different counts per
    class, classes absent from the batch, the last class present (K - 1, where clamped labels
    show), D > 1, B > D, B = K, alpha far from 0.5 on either side."""
    rng = np.random.default_rng(20161008)
    cases = []
    for labels, width, classes, alpha in (([0, 0, 2, 0, 3, 2, 0], 3, 5, 0.3), ([3, 1, 3, 3, 1, 5], 2, 6, 0.8)):
        labels = np.array(labels, dtype=np.int64)
        features = rng.standard_normal((labels.size, width)).astype(dtype)
        centers = rng.standard_normal((classes, width)).astype(dtype)
        cases.append(Case(features, labels, centers, alpha))
    return cases


# --------------------------------------------------------------------------- form


@dataclass(frozen=True)
class FormProblem:
    text: str  # what the user is told
    quantity: str  # "loss", "centers" or "third"
    kind: str  # the problem without its shapes, so that one problem met at many sizes is told once
    # how to read the values as the rule's form despite the problem (identity for a dtype,
    # a transpose for transposed centers), or None where the values cannot be compared
    restore: Callable[[np.ndarray], np.ndarray] | None


def _as_returned(value):
    return value


def _lower_precision(value, features) -> bool:
    dtype = np.asarray(value).dtype
    floating = np.issubdtype(dtype, np.floating) or dtype in TOLERANCE  # bfloat16 is no np.floating
    return floating and dtype.itemsize < features.dtype.itemsize


def form_mistakes(observed: Quantities, rule: str, features: np.ndarray, centers: np.ndarray) -> list[FormProblem]:
    """Outputs that do not have the form the rule asks for, each named as such, with how (or
    whether) their values can still be compared with the reference."""
    (batch, width), classes = features.shape, centers.shape[0]
    found = []
    if np.size(observed.loss) != 1:
        found.append(FormProblem(f"the loss is not a scalar: shape {np.shape(observed.loss)} (return one number: the "
                                 "mean or sum the rule asks for)", "loss", "loss not a scalar", None))
    elif _lower_precision(observed.loss, features):
        found.append(FormProblem(f"the loss comes back as {np.asarray(observed.loss).dtype} for {features.dtype} "
                                 "inputs", "loss", "loss dtype", _as_returned))
    got = observed.centers
    if got.shape != centers.shape:
        if got.shape == centers.shape[::-1] and got.shape != centers.shape:
            found.append(FormProblem(f"the centers come back transposed: shape {got.shape}, expected {centers.shape} "
                                     "(K, D); their values are compared transposed back", "centers", "centers transposed",
                                     np.transpose))
        else:
            found.append(FormProblem(f"the centers have shape {got.shape}, expected {centers.shape} (K, D)", "centers",
                                     "centers shape", None))
    elif rule == "pytorch" and not np.array_equal(got, centers, equal_nan=True):
        found.append(FormProblem("new centers were returned for rule 'pytorch', which leaves the centers to the "
                                 "caller's optimizer: return them unchanged, and grad_centers as the third output",
                                 "centers", "pytorch moves centers", None))
    elif _lower_precision(got, features):
        found.append(FormProblem(f"the centers come back as {got.dtype} for {features.dtype} inputs", "centers",
                                 "centers dtype", _as_returned))
    third = observed.third
    if third is not None:
        expected = (classes, width) if rule == "pytorch" else (batch, width)
        if third.shape != expected:
            if rule == "pytorch" and third.shape == (batch, width):
                text = ("the third output has shape (B, D): this looks like the gradient with respect to the "
                        "features; for rule 'pytorch' the third output is grad_centers, shape (K, D)")
            elif rule != "pytorch" and third.shape == (classes, width):
                text = (f"the third output has shape (K, D): this looks like grad_centers; for rule {rule!r} the "
                        "third output is the gradient with respect to the features, shape (B, D)")
            else:
                text = f"the third output ({third_name(rule)}) has shape {third.shape}, expected {expected}"
            found.append(FormProblem(text, "third", "third shape", None))
        elif _lower_precision(third, features):
            found.append(FormProblem(f"the third output ({third_name(rule)}) comes back as {third.dtype} for "
                                     f"{features.dtype} inputs", "third", "third dtype", _as_returned))
    return found


def comparable(observed: Quantities, form: list[FormProblem]) -> Quantities:
    """The quantities as they can be compared with the reference: restored where their form
    allows it, None where it does not (a None says nothing either way)."""
    values = observed._asdict()
    if values["loss"] is not None and np.size(values["loss"]) == 1:
        values["loss"] = np.asarray(values["loss"]).reshape(())  # a loss of shape (1,) is read as its number
    for problem in form:
        value = values[problem.quantity]
        values[problem.quantity] = None if value is None or problem.restore is None else problem.restore(value)
    return Quantities(**values)


# --------------------------------------------------------------------------- evidence


class Evidence:
    """The user's outputs (as they can be compared) and the mistakes' predictions on one case."""

    def __init__(self, case: tuple, observed: Quantities, rule: str):
        features, labels, centers, alpha = case
        self.case, self.observed, self.rule = case, observed, rule
        self.reference = reference(features, labels, centers, alpha, rule)
        self._predictions: dict[Mistake, Quantities | None] = {}

    def prediction(self, mistake: Mistake) -> Quantities | None:
        """What ``mistake`` predicts here (made once: pairs are only asked for where no single
        mistake explains the step)."""
        if mistake not in self._predictions:
            self._predictions[mistake] = mistake.predict(*self.case, self.rule)
        return self._predictions[mistake]

    def matches(self, got: Any, expected: Any, tolerance: float) -> bool:
        if got is None or expected is None:
            return got is None and expected is None
        features, _, centers, _ = self.case
        if np.shape(got) != np.shape(expected):
            return False
        tiny = smallest_normal(features.dtype)  # below it, half precision keeps no relative precision
        if np.ndim(expected) == 0:
            return bool(np.isclose(float(np.asarray(got).reshape(())), expected, rtol=tolerance,
                                   atol=tolerance * tiny, equal_nan=True))
        return close_within(got, expected, tolerance, features, centers, tiny)

    def tolerance(self, got: Any, mistake: Mistake | None = None, quantity: str | None = None) -> float:
        """The inputs' dtype's tolerance; the tolerance of the dtype the values were handed back
        in where it is coarser (float32 values carry no more), or the floor of a mistake about
        precision, on a quantity that mistake changes."""
        floors = [tolerance_of(self.case[0].dtype, got)]
        if mistake is not None and mistake.tolerance_floor and self._moved_by_precision(mistake, quantity):
            floors.append(mistake.tolerance_floor)
        return max(floors)

    def _moved_by_precision(self, mistake: Mistake, quantity: str) -> bool:
        """Whether the mistake's loss of precision changes ``quantity`` at all here: its looser
        floor covers what float32 arithmetic could have moved, and nothing else (float32 sums
        leave the loss and the grad as they were, so a small deviation there is not theirs)."""
        exact_parts = [part for part in mistake.parts if part.precision is None]
        without = self.prediction(exact_parts[0]) if exact_parts else self.reference
        with_precision = self.prediction(mistake)
        if without is None or with_precision is None:
            return True
        return not np.array_equal(np.asarray(getattr(with_precision, quantity)), np.asarray(getattr(without, quantity)),
                                  equal_nan=True)

    def differs(self, quantity: str) -> bool:
        got = getattr(self.observed, quantity)
        return got is not None and not self.matches(got, getattr(self.reference, quantity), self.tolerance(got))

    def relative_difference(self, quantity: str) -> float:
        """How far the quantity lies from the reference, relative to the reference's scale."""
        got = np.asarray(getattr(self.observed, quantity), dtype=np.float64)
        expected = np.asarray(getattr(self.reference, quantity), dtype=np.float64)
        if got.shape != expected.shape:
            return float("inf")
        scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-300)
        return float(np.max(np.abs(got - expected), initial=0.0)) / scale

    def how_much(self, quantity: str) -> str:
        """By how much the quantity differs from the reference here, in words."""
        got, expected = getattr(self.observed, quantity), getattr(self.reference, quantity)
        if np.ndim(expected) == 0:
            value = float(np.asarray(got).reshape(()))
            return f"relative difference {abs(value - expected) / max(abs(expected), 1e-300):.3g}"
        error = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(expected, dtype=np.float64))
        return f"max abs difference {float(np.max(error, initial=0.0)):.3g}"

    def reproduces(self, mistake: Mistake, quantity: str) -> bool:
        """Whether ``mistake`` predicts the step's ``quantity`` here (a quantity the step did not
        return, or whose form hides it, says nothing either way)."""
        got = getattr(self.observed, quantity)
        if got is None:
            return True
        prediction = self.prediction(mistake)
        return (prediction is not None
                and self.matches(got, getattr(prediction, quantity), self.tolerance(got, mistake, quantity))
                and (mistake.observed_must is None
                     or mistake.observed_must(quantity, got, self.observed, self.case, self.rule)))


# --------------------------------------------------------------------------- the diagnosis


@dataclass
class Finding:
    """What the report says of one quantity, over every case."""

    quantity: str
    name: str  # as the user knows it: loss, centers, grad or grad_centers
    compared: bool  # False: its form hides its values (see the form problems)
    differs_on: list[int] = field(default_factory=list)  # case numbers, from 1
    how_much: dict[int, str] = field(default_factory=dict)
    relative: dict[int, float] = field(default_factory=dict)  # the difference relative to the reference's scale
    not_compared_on: list[int] = field(default_factory=list)  # larger cases whose form hides it
    explained_by: list[Mistake] = field(default_factory=list)  # reproduce it on every case compared
    where_it_differs: list[Mistake] = field(default_factory=list)  # only where none does on every case

    @property
    def agrees(self) -> bool:
        return self.compared and not self.differs_on and not self.not_compared_on


@dataclass
class Diagnosis:
    """The oracle's findings on a step that disagrees with the reference: the cases it ran, the
    form problems, what each quantity does on every case, and the mistakes that explain it.
    ``check_center_loss`` raises ``CenterLossMismatch`` carrying one (``.diagnosis``).

    The quantities are the step's outputs: ``loss``, ``centers`` and the optional third
    (``grad`` for rules ``facenet`` and ``wen``, ``grad_centers`` for ``pytorch``). Cases are
    numbered from 1, the shrunk failing case first.

    Parameters
    ----------
    rule : str
        The rule the step was checked against.
    cases : list of Case
        The cases run, each a ``Case`` ``(features, labels, centers, alpha)`` in NumPy (its
        ``dtype`` the features'): the shrunk failing case first, then the larger cases chosen to
        tell the known mistakes apart, in the shrunk case's dtype and then in each other dtype
        the step was checked in. ``save_cases`` writes them to a file for a regression test.
    observed : list of tuple
        The step's outputs on each case, as returned: named tuples ``(loss, centers, third)``.
    form : list of tuple
        ``(case number, problem)`` for each form problem (a shape, dtype or kind the rule does
        not ask for): the shrunk case's, then new ones of the larger cases. A problem's ``text``
        is what the report says.
    findings : list
        What each quantity does over every case: its ``name``, whether it was ``compared``, the
        case numbers it ``differs_on`` and by ``how_much``, the mistakes ``explained_by`` (those
        reproducing it on every case), and whether it ``agrees`` with the reference.
    named : list
        The known mistakes (entries of ``KNOWN_MISTAKES``) that reproduce every quantity on
        every case: the diagnosis, where there is one. Where no single mistake does, nor one per
        quantity (``several``), two mistakes made at once may: such an entry's ``parts`` are the
        two known mistakes (a formula's mistake, and one of the inputs or of the arithmetic under
        which it was made). Each has the ``explanation`` the report gives.
    skipped : list of str
        The larger cases on which the step raised, with what it raised.
    form_elsewhere : list of tuple, optional
        ``(where, text)``: form problems of cases the search met besides these (another dtype,
        say).

    See Also
    --------
    CenterLossMismatch : The error that carries it.
    check_center_loss : What makes it.

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.testing import CenterLossMismatch, check_center_loss
    >>> def step(features, labels, centers, alpha):
    ...     diff = features - centers[labels]
    ...     centers[labels] += (1 - alpha) * diff  # one update per repeated label lands
    ...     return np.mean(diff ** 2), centers
    >>> try:
    ...     check_center_loss(step, max_examples=20, seed=0)
    ... except CenterLossMismatch as error:
    ...     diagnosis = error.diagnosis
    >>> diagnosis.rule, len(diagnosis.cases)
    ('facenet', 5)
    >>> [str(case.dtype) for case in diagnosis.cases]
    ['float32', 'float32', 'float32', 'float64', 'float64']
    >>> [(finding.name, finding.agrees) for finding in diagnosis.findings]
    [('loss', True), ('centers', False)]
    >>> [mistake.explanation for mistake in diagnosis.named]
    ['duplicate labels are not accumulated (a fancy-index update such as centers[labels] += u ...)']
    >>> diagnosis.several
    {}
    >>> print(diagnosis.render().splitlines()[-1])
    diagnosis (confirmed on the larger cases): duplicate labels are not accumulated ...
    """

    rule: str
    cases: list[Case]  # (features, labels, centers, alpha): the shrunk case first
    observed: list[Quantities]  # the step's outputs on each case, as returned
    form: list[tuple[int, FormProblem]]  # (case number, problem): the shrunk case's, then new ones
    findings: list[Finding]
    named: list[Mistake]  # mistakes that reproduce every quantity on every case
    skipped: list[str]
    # (where, text): form problems of cases the search met besides these (another dtype, say)
    form_elsewhere: list[tuple[str, str]] = field(default_factory=list)

    @property
    def several(self) -> dict[str, list[Mistake]]:
        """quantity name -> the mistakes explaining it, when no single mistake explains the step
        but every quantity that differs is explained: several mistakes at once. Empty otherwise."""
        differing = [f for f in self.findings if f.compared and f.differs_on]
        if self.named or len(differing) < 2 or not all(f.explained_by for f in differing):
            return {}
        return {f.name: f.explained_by for f in differing}

    def save_cases(self, path) -> None:
        """Write the cases of this report to ``path``, for a regression test.

        What the test hands back with ``check_center_loss(step, rule,
        cases=load_cases(path), max_examples=0)``: the step is run on these inputs again,
        bit for bit, in their dtypes and memory order (see ``load_cases``).

        Parameters
        ----------
        path : str or path-like
            The file to write, a NumPy ``.npz`` archive, at that path exactly.

        Raises
        ------
        OSError
            If the file cannot be written.

        See Also
        --------
        centerkern.testing.save_cases : The same, for any list of cases.
        centerkern.testing.load_cases : Read them back.

        Examples
        --------
        >>> import numpy as np, os, tempfile
        >>> from centerkern.testing import CenterLossMismatch, check_center_loss, load_cases
        >>> def step(features, labels, centers, alpha):
        ...     diff = features - centers[labels]
        ...     centers[labels] += (1 - alpha) * diff
        ...     return np.mean(diff ** 2), centers
        >>> try:
        ...     check_center_loss(step, max_examples=20, seed=0)
        ... except CenterLossMismatch as error:
        ...     diagnosis = error.diagnosis
        >>> path = os.path.join(tempfile.mkdtemp(), "cases.npz")
        >>> diagnosis.save_cases(path)
        >>> len(load_cases(path)) == len(diagnosis.cases)
        True
        """
        save_cases(path, self.cases)

    def render(self) -> str:
        """The findings in words, as the report of ``CenterLossMismatch`` ends: the form
        problems, what each quantity matches on every case, and the verdict (last line)."""
        report = ""
        if self.form or self.form_elsewhere:
            report = "what is wrong with the outputs' form:\n  - " + "\n  - ".join(
                [problem.text if number == 1 else f"on case {number}: {problem.text}" for number, problem in self.form]
                + [f"on a case the search met ({where}): {text}" for where, text in self.form_elsewhere]) + "\n"
        compared = [f for f in self.findings if f.compared]
        if not compared:
            return report + FORM_DIAGNOSIS + ", so no formula is matched against them"
        shapes = "; ".join(f"case {number}: {case.shape}, {case.dtype}, alpha={case.alpha:g}"
                           for number, case in enumerate(self.cases, 1))
        dtypes = list(dict.fromkeys(str(case.dtype) for case in self.cases))
        report += (f"what each quantity matches (on this case and {len(self.cases) - 1} larger one(s): repeated "
                   f"labels, D > 1, classes absent from the batch, alpha 0.3 and 0.8, in {' and '.join(dtypes)}; "
                   f"{shapes}):\n  - " + "\n  - ".join(self._line(f) for f in self.findings))
        if self.skipped:
            report += "\n  (" + "; ".join(self.skipped) + ")"
        return report + "\n" + self._verdict()

    def _outcome(self, finding: Finding, number: int) -> str:
        if number in finding.differs_on:
            return "differs"
        return "not compared" if number in finding.not_compared_on else "agrees"

    def _on(self, finding: Finding, numbers: list[int]) -> str:
        """Where the quantity differs and agrees among the cases ``numbers``, in words."""
        differing = [n for n in numbers if self._outcome(finding, n) == "differs"]
        agreeing = [n for n in numbers if self._outcome(finding, n) == "agrees"]
        hidden = [n for n in numbers if self._outcome(finding, n) == "not compared"]
        parts = []
        if differing:
            where = ", ".join(f"case {n} ({finding.how_much[n]})" for n in differing)
            parts.append(f"differs on every case: {where}" if len(differing) == len(self.cases)
                         else f"differs on {where}")
        if agreeing and differing:
            parts.append("agrees on " + ", ".join(f"case {n}" for n in agreeing))
        elif agreeing:
            parts.append("agrees with the reference on " + ", ".join(f"case {n}" for n in agreeing))
        if hidden:
            parts.append("not compared on " + ", ".join(f"case {n}" for n in hidden)
                         + " (its form there, above, hides its values)")
        return "; ".join(parts)

    def _where(self, finding: Finding) -> str:
        """Where the quantity differs and agrees: per dtype, where it agrees on every case of one
        dtype and not of another (float32 sums agree in float32, and differ in float64)."""
        by_dtype: dict[str, list[int]] = {}
        for number, case in enumerate(self.cases, 1):
            by_dtype.setdefault(str(case.dtype), []).append(number)
        agreeing = {dtype for dtype, numbers in by_dtype.items()
                    if all(self._outcome(finding, n) == "agrees" for n in numbers)}
        if len(by_dtype) < 2 or not agreeing or not finding.differs_on:
            return self._on(finding, list(range(1, len(self.cases) + 1)))
        parts = []
        for dtype, numbers in by_dtype.items():
            cases = ", ".join(f"case {n}" for n in numbers)
            if dtype in agreeing:
                parts.append(f"agrees in {dtype} ({cases})")
            elif all(self._outcome(finding, n) == "differs" for n in numbers):
                parts.append(f"differs in {dtype}: " + ", ".join(f"case {n} ({finding.how_much[n]})" for n in numbers))
            else:
                parts.append(f"in {dtype}: {self._on(finding, numbers)}")
        return "; ".join(parts)

    def _told(self, mistake: Mistake, finding: Finding) -> str:
        """A mistake's explanation; for a mistake of precision, with how far float64 inputs land."""
        float64 = [n for n in finding.differs_on if self.cases[n - 1].dtype == np.float64]
        if mistake.precision is None or mistake.parts or not float64 or len(float64) < len(finding.differs_on):
            return mistake.explanation  # the size of a difference that is not precision's alone says nothing
        relative = [finding.relative[n] for n in float64]
        return f"{mistake.explanation} (float64 inputs differ by about {max(relative):.0e} relative, {mistake.precision})"

    def _line(self, finding: Finding) -> str:
        if not finding.compared:
            return f"{finding.name}: not compared (its form, above, hides its values)"
        if finding.agrees:
            return f"{finding.name}: agrees with the reference on every case"
        differs = self._where(finding)
        if not finding.differs_on:
            return f"{finding.name}: {differs}"
        if finding.explained_by:
            return f"{finding.name}: {'; or '.join(self._told(m, finding) for m in finding.explained_by)} ({differs})"
        line = f"{finding.name}: no known mistake reproduces it on every case ({differs})"
        if finding.where_it_differs:
            line += ("; on the cases where it differs (only) it matches: "
                     + "; or ".join(m.explanation for m in finding.where_it_differs))
        return line

    def _verdict(self) -> str:
        several = self.several
        if self.named:
            what = "; or ".join(m.explanation for m in self.named)
        elif several:
            what = "several mistakes at once, each reproducing its quantity on every case: " + "; ".join(
                f"the {name}: {' or '.join(m.explanation for m in mistakes)}" for name, mistakes in several.items())
        elif any(f.differs_on for f in self.findings):
            unexplained = [f.name for f in self.findings if f.differs_on and not f.explained_by]
            what = None
            if unexplained:
                tail = ("no known mistake matches every quantity the step returned, nor does a combination of "
                        f"them: nothing known reproduces the {' and the '.join(unexplained)} on every case")
            else:  # one quantity differs and is explained, by mistakes that would change another too
                (finding,) = [f for f in self.findings if f.differs_on]
                others = [f.name for f in self.findings if f is not finding and f.compared]
                tail = (f"no known mistake matches every quantity the step returned: the {finding.name} "
                        f"{'are' if finding.name == 'centers' else 'is'} "
                        f"reproduced by {' or '.join(m.explanation for m in finding.explained_by)}, which does not "
                        f"reproduce the {' and the '.join(others)} as the step returned {'it' if len(others) == 1 else 'them'}")
        else:
            what = None
            tail = "every quantity compared agrees with the reference on these cases"
        if self.form or self.form_elsewhere:
            return FORM_DIAGNOSIS + "; the values compared as they are: " + (what if what is not None else tail)
        if what is None:
            return "diagnosis: " + tail
        if self.named and len(self.cases) > 1:
            return f"diagnosis (confirmed on the larger cases): {what}"
        return f"diagnosis: {what}"


def diagnose(step_outputs: Callable[[tuple], Quantities], rule: str, case: tuple, observed: Quantities,
             dtypes: tuple = ()) -> Diagnosis:
    """Run the step on the larger cases too, in the shrunk case's dtype and in each of ``dtypes``
    (the dtypes the step is checked in), and gather what every quantity does on each."""
    case = Case(*case)
    features, _, centers, _ = case
    form = form_mistakes(observed, rule, features, centers)
    cases, outputs, evidences, skipped = [case], [observed], [Evidence(case, comparable(observed, form), rule)], []
    problems = [(1, problem) for problem in form]
    larger_dtypes = [features.dtype] + [d for d in map(np.dtype, dtypes) if d != features.dtype]
    for larger in (c for dtype in dict.fromkeys(larger_dtypes) for c in discriminating_cases(dtype)):
        try:
            larger_observed = step_outputs(larger)
        except Exception as error:  # a step that fails elsewhere: say so, judge on what ran
            skipped.append(f"the step raised {type(error).__name__} on a larger {larger.dtype} case: {error}")
            continue
        larger_form = form_mistakes(larger_observed, rule, larger[0], larger[2])
        told = {problem.kind for _, problem in problems}
        problems += [(len(cases) + 1, problem) for problem in larger_form if problem.kind not in told]
        cases.append(larger)
        outputs.append(larger_observed)
        evidences.append(Evidence(larger, comparable(larger_observed, larger_form), rule))

    def reproduced(mistake, quantity, among=None):
        return all(evidences[n].reproduces(mistake, quantity) for n in (range(len(evidences)) if among is None
                                                                          else among))

    names = {"loss": "loss", "centers": "centers", "third": third_name(rule)}
    findings = []
    for quantity in QUANTITIES:
        if getattr(observed, quantity) is None and quantity == "third":
            continue  # the step returned no third output
        # compared wherever its form shows its values, on any case (the shrunk case may hide it)
        finding = Finding(quantity, names[quantity],
                          compared=any(getattr(e.observed, quantity) is not None for e in evidences))
        if finding.compared:
            for number, evidence in enumerate(evidences, 1):
                if getattr(evidence.observed, quantity) is None:
                    finding.not_compared_on.append(number)
                elif evidence.differs(quantity):
                    finding.differs_on.append(number)
                    finding.how_much[number] = evidence.how_much(quantity)
                    finding.relative[number] = evidence.relative_difference(quantity)
        findings.append(finding)

    differing = [f for f in findings if f.differs_on]

    def explaining_all(mistakes):
        return [m for m in mistakes if differing and all(reproduced(m, q) for q in QUANTITIES)]

    def explain(candidates):
        for finding in differing:
            finding.explained_by = [m for m in candidates if reproduced(m, finding.quantity)]

    # In order: one mistake for the whole step; else one for each quantity that differs (several
    # mistakes, each in its own quantity); else two made at once, a formula's mistake under a
    # mistake of the inputs or of the arithmetic, where both change one quantity (pairs are
    # only tried where no single mistake fits). Where mistakes explain the whole step, each
    # quantity is shown as they explain it (another mistake that happens to give one quantity the
    # same numbers, as wen's loss is facenet's scaled by 1/(2B), would only be a second name for it).
    named = explaining_all(KNOWN_MISTAKES)
    explain(named or KNOWN_MISTAKES)
    if not named and not all(finding.explained_by for finding in differing):
        named = explaining_all(PAIRS)
        if named:
            explain(named)
        for finding in differing:
            if not finding.explained_by:
                finding.explained_by = [m for m in PAIRS if reproduced(m, finding.quantity)]
    for finding in differing:
        # a quantity that one part of a pair reproduces alone is told as that part (the centers of
        # a late gather with float32 sums are the float32 sums')
        finding.explained_by = list(dict.fromkeys(
            next((part for part in m.parts if reproduced(part, finding.quantity)), m) for m in finding.explained_by))
        if not finding.explained_by:
            among = [n - 1 for n in finding.differs_on]
            finding.where_it_differs = [m for m in KNOWN_MISTAKES if reproduced(m, finding.quantity, among)]
    return Diagnosis(rule, cases, outputs, problems, findings, named, skipped)
