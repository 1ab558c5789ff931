"""The oracle on steps with more than one mistake, and on a form problem over a formula problem:
every quantity's line of the report must be true on every case the report lists (checked here
against the report's own data, ``CenterLossMismatch.diagnosis``, by recomputing each claim)."""

import itertools
import re
import sys

import numpy as np
import pytest

from centerkern.testing import (KNOWN_MISTAKES, TOLERANCE, Case, CenterLossMismatch, check_center_loss, close_within,
                                load_cases, save_cases)
from centerkern.testing._diagnosis import comparable, form_mistakes
from centerkern.testing._mistakes import PAIRS, reference

from oracle_steps import numpy_steps

MISTAKES = {mistake.explanation: mistake for mistake in KNOWN_MISTAKES}


def _mistake(starts):
    (mistake,) = [m for text, m in MISTAKES.items() if text.startswith(starts)]
    return mistake


def _close(got, expected, case, floor=0.0):
    """Within the inputs' tolerance (float32's for float32 values, or a mistake's own floor)."""
    features, _, centers, _ = case
    tolerance = max(TOLERANCE[np.dtype(features.dtype)], TOLERANCE.get(np.asarray(got).dtype, 0.0), floor)
    if np.ndim(expected) == 0:
        return bool(np.isclose(float(np.asarray(got).reshape(())), expected, rtol=tolerance, atol=1e-300))
    return close_within(got, expected, tolerance, features, centers)


def _report(step, rule, **options):
    with pytest.raises(CenterLossMismatch) as failure:
        check_center_loss(step, rule, max_examples=100, seed=options.pop("seed", 0), **options)
    return str(failure.value), failure.value.diagnosis


def assert_every_line_is_true(diagnosis, dtypes=(np.float32, np.float64)):
    """Each finding, recomputed on every case the report lists: "agrees" only where the values
    equal the reference, "differs" exactly where they do not, and every mistake named for a
    quantity reproduces it on every case where it is compared. The cases span every dtype the
    step was checked in, so that "agrees" holds in each."""
    assert {np.dtype(d) for d in dtypes} <= {case.dtype for case in diagnosis.cases}, diagnosis.render()
    for finding in diagnosis.findings:
        if not finding.compared:
            continue
        for number, (case, observed) in enumerate(zip(diagnosis.cases, diagnosis.observed), 1):
            features, labels, centers, alpha = case
            got = getattr(comparable(observed, form_mistakes(observed, diagnosis.rule, features, centers)),
                          finding.quantity)
            if got is None:
                assert number in finding.not_compared_on, (finding.name, number)
                continue
            right = getattr(reference(features, labels, centers, alpha, diagnosis.rule), finding.quantity)
            assert _close(got, right, case) == (number not in finding.differs_on), (finding.name, number)
            for mistake in finding.explained_by:
                predicted = mistake.predict(features, labels, centers, alpha, diagnosis.rule)
                assert predicted is not None, (finding.name, mistake.explanation, number)
                assert _close(got, getattr(predicted, finding.quantity), case, mistake.tolerance_floor), \
                    (finding.name, mistake.explanation, number)
        if finding.agrees:
            assert not finding.differs_on and not finding.not_compared_on


def _line(message, name):
    (line,) = [line for line in message.splitlines() if line.strip().startswith(f"- {name}:")]
    return line


# --------------------------------------------------------------------------- two mistakes in one step


def test_loss_scaled_and_duplicates_dropped_names_both_and_never_agrees():
    """The step that once got "centers: agrees": the shrunk case has no repeated label, the larger
    ones have; the centers differ there, and the duplicates are named for them."""
    message, diagnosis = _report(numpy_steps.loss_over_batch_and_duplicates_dropped, "facenet")
    assert_every_line_is_true(diagnosis)
    assert "the loss is scaled by 1/B instead" in _line(message, "loss")
    centers = _line(message, "centers")
    assert "duplicate labels are not accumulated" in centers and "agrees with the reference on every" not in centers
    assert "diagnosis: several mistakes at once" in message, message
    # (pytorch's loss is the sum over D averaged over B as well: a second, true, name for the loss)
    assert _mistake("the loss is scaled by 1/B ") in diagnosis.several["loss"]
    assert diagnosis.several["centers"] == [_mistake("duplicate labels are not accumulated")]



# Two-mistake steps written by hand (not from the mistakes' own predictions): a loss (and its
# grad) computed one way, the centers moved another, both claiming rule facenet.


def _differences(features, labels, centers):
    return features - centers[labels]


def _loss_over_batch(features, labels, centers, alpha):
    d = _differences(features, labels, centers)
    return np.sum(d**2) / len(d), 2 * d / len(d)  # 1/B: a sum over D


def _loss_summed(features, labels, centers, alpha):
    d = _differences(features, labels, centers)
    return np.sum(d**2), 2 * d  # no mean at all


def _loss_doubled_over_batch(features, labels, centers, alpha):
    d = _differences(features, labels, centers)
    return 2 * np.sum(d**2) / len(d), 4 * d / len(d)  # 2/B


def _loss_after_the_update(features, labels, centers, alpha):
    moved = centers.copy()
    np.add.at(moved, labels, (1 - alpha) * _differences(features, labels, centers))
    d = _differences(features, labels, moved)  # the loss uses the centers after the update
    return np.mean(d**2), 2 * d / d.size


def _centers_fancy_index(features, labels, centers, alpha):
    new = centers.copy()
    new[labels] += (1 - alpha) * _differences(features, labels, centers)
    return new


def _centers_pushed_away(features, labels, centers, alpha):
    new = centers.copy()
    np.add.at(new, labels, -(1 - alpha) * _differences(features, labels, centers))
    return new


def _centers_averaged(features, labels, centers, alpha):
    counts = np.bincount(labels, minlength=len(centers))
    new = centers.copy()
    np.add.at(new, labels, (1 - alpha) * _differences(features, labels, centers) / counts[labels][:, None])
    return new


def _centers_alpha_as_step(features, labels, centers, alpha):
    new = centers.copy()
    np.add.at(new, labels, alpha * _differences(features, labels, centers))
    return new


LOSSES = {_loss_over_batch: "the loss is scaled by 1/B ", _loss_summed: "the loss is scaled by 1 (a sum)",
          _loss_doubled_over_batch: "the loss is scaled by 2/B ", _loss_after_the_update: "centers were gathered after"}
CENTERS = {_centers_fancy_index: "duplicate labels are not accumulated", _centers_pushed_away: "the update has the wrong",
           _centers_averaged: "each class's update is averaged", _centers_alpha_as_step: "alpha is used as facenet's"}


@pytest.mark.parametrize("loss_code, centers_code", list(itertools.product(LOSSES, CENTERS)),
                         ids=lambda f: f.__name__)
def test_two_mistakes_each_named_for_its_quantity(loss_code, centers_code):
    def step(features, labels, centers, alpha):
        loss, grad = loss_code(features, labels, centers, alpha)
        return loss, centers_code(features, labels, centers, alpha), grad

    message, diagnosis = _report(step, "facenet")
    assert_every_line_is_true(diagnosis)
    findings = {finding.name: finding for finding in diagnosis.findings}
    assert _mistake(LOSSES[loss_code]) in findings["loss"].explained_by, message
    assert _mistake(CENTERS[centers_code]) in findings["centers"].explained_by, message
    assert findings["loss"].differs_on and findings["centers"].differs_on, message
    assert "no known mistake" not in message, message
    assert diagnosis.several, message
    assert "diagnosis: several mistakes at once" in message, message


# --------------------------------------------------------------------------- in torch and JAX


def test_torch_step_with_two_mistakes():
    torch = pytest.importorskip("torch")

    def step(features, labels, centers, alpha):
        differences = features - centers[labels]
        centers = centers.clone()
        centers[labels] += (1 - alpha) * differences  # one update per repeated label lands
        return (differences**2).sum(dim=1).mean(), centers  # a sum over D: 1/B, not 1/(B·D)

    message, diagnosis = _report(step, "facenet", framework="torch")
    assert_every_line_is_true(diagnosis)
    assert "the loss is scaled by 1/B instead" in _line(message, "loss")
    assert "duplicate labels are not accumulated" in _line(message, "centers")
    assert isinstance(diagnosis.observed[0].loss, np.ndarray)  # torch's outputs, read back


def _without_x64(jax):
    """JAX's default: float64 inputs become float32 arrays. (Another test may have switched x64 on.)"""
    class Off:
        def __enter__(self):
            self.was = jax.config.jax_enable_x64
            jax.config.update("jax_enable_x64", False)

        def __exit__(self, *exc):
            jax.config.update("jax_enable_x64", self.was)
    return Off()


def test_jax_step_with_two_mistakes():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def step(features, labels, centers, alpha):
        differences = features - centers[labels]
        return jnp.sum(differences**2) / features.shape[0], centers.at[labels].add(0).at[labels].set(
            centers[labels] + (1 - alpha) * differences)

    with _without_x64(jax):
        message, diagnosis = _report(step, "facenet", framework="jax", dtypes=(np.float32,))
    assert_every_line_is_true(diagnosis, dtypes=(np.float32,))
    assert "the loss is scaled by 1/B instead" in _line(message, "loss")
    assert "duplicate labels are not accumulated" in _line(message, "centers")


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_float32_form_problem_does_not_hide_dropped_duplicates(framework):
    """JAX without x64 hands float64 inputs back as float32 (torch code that calls .float() does the
    same): that form problem is reported, and the values are still compared, in float32, on cases
    with repeated labels, where the dropped duplicates show."""
    if framework == "jax":
        jax = pytest.importorskip("jax")

        def step(features, labels, centers, alpha):
            differences = features - centers[labels]
            return jax.numpy.mean(differences**2), centers.at[labels].set(centers[labels] + (1 - alpha) * differences)

        with _without_x64(jax):
            message, diagnosis = _report(step, "facenet", framework="jax")
    else:
        pytest.importorskip("torch")

        def step(features, labels, centers, alpha):
            features, centers = features.float(), centers.float()
            differences = features - centers[labels]
            centers[labels] = centers[labels] + (1 - alpha) * differences
            return (differences**2).mean(), centers

        message, diagnosis = _report(step, "facenet", framework="torch")
    assert_every_line_is_true(diagnosis)
    assert "come back as float32 for float64 inputs" in message, message
    centers = _line(message, "centers")
    assert "duplicate labels are not accumulated" in centers, message
    assert "agrees with the reference on every case" not in centers
    assert "diagnosis: the outputs do not have the form the rule asks for" in message


# --------------------------------------------------------------------------- honest when nothing is known


def test_an_unknown_mistake_beside_a_known_one_is_not_given_a_name():
    def step(features, labels, centers, alpha):
        loss, new = numpy_steps.fancy_index_scatter(features, labels, centers, alpha)
        return loss * 1.7, new  # no known scale for the loss

    message, diagnosis = _report(step, "facenet")
    assert_every_line_is_true(diagnosis)
    assert "loss: no known mistake reproduces it on every case" in message
    assert "duplicate labels are not accumulated" in _line(message, "centers")
    assert "nothing known reproduces the loss on every case" in message
    assert not diagnosis.several and not diagnosis.named


# --------------------------------------------------------------------------- what review found


def test_a_quantity_hidden_on_the_shrunk_case_is_still_compared_where_it_shows():
    """pytorch's third output as the features' gradient, with labels shifted: the shrunk case
    (B != K) hides the third output's values; case 3 (B = K = 6) shows them, and they differ."""
    def step(features, labels, centers, alpha):
        loss, new, _ = numpy_steps.pytorch(features, (labels + 1) % len(centers), centers, alpha)
        return loss, new, 2 * (features - centers[labels]) / len(features)

    message, diagnosis = _report(step, "pytorch")
    assert_every_line_is_true(diagnosis)
    (third,) = [f for f in diagnosis.findings if f.name == "grad_centers"]
    assert third.compared and third.differs_on and third.not_compared_on, message
    assert "grad_centers: agrees" not in message, message
    # each quantity has its own mistake, on every case where it is compared (where K = 1 labels
    # shifted modulo K are the labels themselves: the prediction holds there too)
    assert diagnosis.several == {"loss": [_mistake("the labels look shifted by +1")],
                                 "grad_centers": [_mistake("this looks like the gradient with respect")]}, message


def test_a_loss_of_shape_one_is_read_as_its_number():
    def step(features, labels, centers, alpha):
        loss, new = numpy_steps.fancy_index_scatter(features, labels, centers, alpha)
        return np.array([loss]), new

    message, diagnosis = _report(step, "facenet")
    assert_every_line_is_true(diagnosis)
    assert "loss: agrees with the reference on every case" in message, message
    assert "diagnosis (confirmed on the larger cases): duplicate labels are not accumulated" in message, message


def test_one_quantity_explained_by_a_mistake_that_would_change_another_is_not_called_several():
    """The loss uses the centers after the update, the grad the centers before it: the mistake that
    explains the loss would change the grad too, so it is not the diagnosis, and there are not
    several mistakes either."""
    def step(features, labels, centers, alpha):
        loss, _ = _loss_after_the_update(features, labels, centers, alpha)
        return loss, numpy_steps.facenet(features, labels, centers, alpha)[1], 2 * (features - centers[labels]) / \
            features.size

    message, diagnosis = _report(step, "facenet")
    assert_every_line_is_true(diagnosis)
    assert not diagnosis.named and not diagnosis.several
    assert "several mistakes" not in message
    assert "the loss is reproduced by centers were gathered after the update" in message, message
    assert "which does not reproduce the centers and the grad as the step returned them" in message, message


def test_a_form_problem_met_once_is_reported_even_if_the_second_search_misses_it():
    """The search met float32 centers once (the step's first float64 call); the search that shrinks
    form problems draws other cases and never meets it: the case met is reported all the same."""
    seen = []

    def step(features, labels, centers, alpha):
        loss, new, _ = numpy_steps.facenet(features, labels, centers, alpha)
        if features.dtype == np.float64 and not seen:
            seen.append(True)
            return loss, new.astype(np.float32)
        return loss, new

    message, diagnosis = _report(step, "facenet")
    assert "the centers come back as float32 for float64 inputs" in message, message
    assert "diagnosis: the outputs do not have the form the rule asks for" in message


def test_a_form_problem_met_at_many_sizes_is_told_once():
    message, _ = _report(numpy_steps.centers_transposed, "facenet")
    assert message.count("the centers come back transposed:") == 1, message


# --------------------------------------------------------------------------- mistakes a new user's steps made


def test_float32_sums_under_a_late_gather_are_never_told_their_centers_agree():
    """wen, the centers gathered after the update for the loss, and the class sums in a float32
    buffer: the centers agree in float32 and differ in float64, and the report says so in one line
    whatever dtype the search shrank to; both mistakes are named, together."""
    for seed in range(4):
        message, diagnosis = _report(numpy_steps.wen_gathered_late_with_float32_sums, "wen", seed=seed)
        assert_every_line_is_true(diagnosis)
        centers = _line(message, "centers")
        assert "agrees with the reference on every case" not in centers, message
        assert re.search(r"agrees in float32 \(case [\d, case]+\)", centers), message
        assert "differs in float64: case" in centers, message
        assert "the per-class sums are accumulated in float32" in centers, message
        assert "centers were gathered after the update" in _line(message, "loss"), message
        assert "no known mistake" not in message, message
        (pair,) = diagnosis.named
        assert pair.parts == (_mistake("centers were gathered after"), _mistake("the per-class sums are accumulated"))


def test_a_precision_mistake_says_how_far_float64_lands():
    message, diagnosis = _report(numpy_steps.wen_float32_sums, "wen")
    assert_every_line_is_true(diagnosis)
    centers = _line(message, "centers")
    relative = re.search(r"float64 inputs differ by about (\S+) relative, as float32 sums would", centers)
    assert relative and 1e-9 < float(relative.group(1)) < 1e-5, message
    assert "loss: agrees with the reference on every case" in message


# each new mistake beside one other, written by hand: on another quantity (several mistakes) or
# on the same one (two made at once)


def _wen_alpha_crossed_loss_over_batch(features, labels, centers, alpha):
    _, new = numpy_steps.wen_alpha_crossed(features, labels, centers, alpha)
    differences = features - centers[labels]
    return np.sum(differences**2) / len(features), new  # 1/B, not 1/(2B)


def _wen_alpha_crossed_duplicates_dropped(features, labels, centers, alpha):
    differences = features - centers[labels]
    counts = np.bincount(labels, minlength=len(centers))
    new = centers.copy()
    new[labels] += (1 - alpha) * differences / (1 + counts[labels])[:, None]  # both at once
    return np.sum(differences**2) / (2 * len(features)), new


def _pytorch_over_count_loss_summed(features, labels, centers, alpha):
    loss, new, grad_centers = numpy_steps.pytorch_grad_centers_over_count(features, labels, centers, alpha)
    return loss * len(features), new, grad_centers  # a sum: no mean over B


def _pytorch_over_count_labels_shifted(features, labels, centers, alpha):
    labels = (labels + 1) % len(centers)
    return numpy_steps.pytorch_grad_centers_over_count(features, labels, centers, alpha)


def _wen_float32_sums_loss_over_batch(features, labels, centers, alpha):
    loss, new = numpy_steps.wen_float32_sums(features, labels, centers, alpha)
    return 2 * loss, new  # 1/B, not 1/(2B)


def _clamped_duplicates_dropped(features, labels, centers, alpha):
    labels = np.minimum(labels, len(centers) - 2) if len(centers) > 1 else labels
    differences = features - centers[labels]
    new = centers.copy()
    new[labels] += (1 - alpha) * differences
    return np.mean(differences**2), new


def _clamped_loss_summed(features, labels, centers, alpha):
    loss, new = numpy_steps.facenet_labels_clamped(features, labels, centers, alpha)
    return loss * features.size, new  # a sum over B and D


def _wen_loss_in_float32_over_batch(features, labels, centers, alpha):
    loss, new = numpy_steps.wen_loss_summed_in_float32(features, labels, centers, alpha)
    return 2 * loss, new  # 1/B, not 1/(2B)


def _wen_loss_and_sums_in_float32(features, labels, centers, alpha):
    loss, _ = numpy_steps.wen_loss_summed_in_float32(features, labels, centers, alpha)
    return loss, numpy_steps.wen_float32_sums(features, labels, centers, alpha)[1]


BESIDE_ANOTHER = [
    (_wen_alpha_crossed_loss_over_batch, "wen", {"loss": "the loss is scaled by 1/B ",
                                                 "centers": "alpha is used as 1 - alpha in wen's"}),
    (_wen_alpha_crossed_duplicates_dropped, "wen", {"centers": ("duplicate labels are not accumulated",
                                                                "alpha is used as 1 - alpha in wen's")}),
    (_pytorch_over_count_loss_summed, "pytorch", {"loss": "the loss is scaled by 1 (a sum)",
                                                  "grad_centers": "grad_centers is divided by 1 + n_j"}),
    (_pytorch_over_count_labels_shifted, "pytorch", {"grad_centers": ("grad_centers is divided by 1 + n_j",
                                                                      "the labels look shifted by +1")}),
    (_wen_float32_sums_loss_over_batch, "wen", {"loss": "the loss is scaled by 1/B ",
                                                "centers": "the per-class sums are accumulated in float32"}),
    (_clamped_duplicates_dropped, "facenet", {"centers": ("duplicate labels are not accumulated",
                                                          "the labels are clamped into range")}),
    (_clamped_loss_summed, "facenet", {"loss": ("the loss is scaled by 1 (a sum)", "the labels are clamped")}),
    (_wen_loss_in_float32_over_batch, "wen", {"loss": ("the loss is scaled by 1/B ",
                                                       "the loss is accumulated in float32")}),
    (_wen_loss_and_sums_in_float32, "wen", {"loss": "the loss is accumulated in float32",
                                            "centers": "the per-class sums are accumulated in float32"}),
]


@pytest.mark.parametrize("step, rule, expected", BESIDE_ANOTHER, ids=[entry[0].__name__ for entry in BESIDE_ANOTHER])
def test_each_new_mistake_is_named_beside_another(step, rule, expected):
    """A quantity's expected mistake is a single one (several mistakes, one per quantity) or a pair
    (two made at once on that quantity), and every line of the report is true in both dtypes."""
    message, diagnosis = _report(step, rule)
    assert_every_line_is_true(diagnosis)
    findings = {finding.name: finding for finding in diagnosis.findings}
    for name, wanted in expected.items():
        explained_by = findings[name].explained_by
        if isinstance(wanted, str):
            assert _mistake(wanted) in explained_by, message
        else:
            assert tuple(map(_mistake, wanted)) in [m.parts for m in explained_by], message
    assert "no known mistake" not in message, message
    assert ("diagnosis: several mistakes at once" in message) == all(isinstance(w, str) for w in expected.values())
    if not diagnosis.several:
        assert "diagnosis (confirmed on the larger cases): two mistakes at once" in message, message


def test_a_mistake_and_its_own_family_are_never_paired():
    pairs = [pair.parts for pair in PAIRS]
    assert (_mistake("the labels look shifted by +1"), _mistake("the labels look shifted by -1")) not in pairs
    assert (_mistake("alpha is used as facenet's"), _mistake("alpha is used as 1 - alpha")) not in pairs
    assert (_mistake("duplicate labels are not"), _mistake("the labels are clamped")) in pairs


# --------------------------------------------------------------------------- no wrong lead from precision


def _wen_float32_sums_with(loss_factor=1.0, grad_factor=None):
    def step(features, labels, centers, alpha):
        loss, new = numpy_steps.wen_float32_sums(features, labels, centers, alpha)
        if grad_factor is None:
            return loss * loss_factor, new
        return loss * loss_factor, new, (features - centers[labels]) / len(features) * grad_factor
    return step


@pytest.mark.parametrize("step, unexplained", [
    (_wen_float32_sums_with(loss_factor=1 + 5e-5), "loss"),
    (_wen_float32_sums_with(grad_factor=1 + 3e-5), "grad"),
], ids=["loss", "grad"])
def test_float32_sums_never_explain_a_small_deviation_of_what_they_do_not_change(step, unexplained):
    """float32 sums move the centers only: a small unknown deviation of the loss or the grad beside
    them is left unexplained, not put down to float32 (whose looser tolerance would cover it)."""
    message, diagnosis = _report(step, "wen")
    assert_every_line_is_true(diagnosis)
    line = _line(message, unexplained)
    assert "no known mistake reproduces it" in line and "float32" not in line.split("(")[0], message
    assert "the per-class sums are accumulated in float32" in _line(message, "centers"), message
    assert not diagnosis.named and not diagnosis.several, message


def test_centers_left_as_they_were_carry_no_float32_sums():
    def step(features, labels, centers, alpha):
        differences = (features - centers[labels]).astype(np.float32)
        return float(np.sum(differences * differences)) / len(features), centers  # nothing moved, loss in float32

    message, diagnosis = _report(step, "facenet")
    assert_every_line_is_true(diagnosis)
    assert "per-class sums are accumulated in float32" not in message, message


def test_float16_values_of_float32_inputs_are_a_form_problem_compared_at_float16():
    def step(features, labels, centers, alpha):
        loss, new, _ = numpy_steps.facenet(features, labels, centers, alpha)
        return loss, new.astype(np.float16)

    message, diagnosis = _report(step, "facenet", dtypes=(np.float32,))
    assert "the centers come back as float16 for float32 inputs" in message, message
    assert "centers: agrees with the reference on every case" in message, message


# float32 sums beside another mistake of the update: the sums are read back whatever divides them


def _float32_class_sums(features, labels, centers, scale=1.0):
    sums = np.zeros(centers.shape, dtype=np.float32)
    np.add.at(sums, labels, scale * (features - centers[labels]))
    return sums


def _wen_no_count_float32_sums(features, labels, centers, alpha):
    differences = features - centers[labels]
    return np.sum(differences**2) / (2 * len(features)), centers + alpha * _float32_class_sums(features, labels, centers)


def _facenet_averaged_float32_sums(features, labels, centers, alpha):
    counts = np.bincount(labels, minlength=len(centers))
    differences = features - centers[labels]
    sums = _float32_class_sums(features, labels, centers)
    return np.mean(differences**2), centers + (1 - alpha) * sums / np.maximum(counts, 1)[:, None]


def _wen_shifted_float32_sums(features, labels, centers, alpha):
    return numpy_steps.wen_float32_sums(features, (labels + 1) % len(centers), centers, alpha)


def _pytorch_over_count_float32_sums(features, labels, centers, alpha):
    counts = np.bincount(labels, minlength=len(centers))
    differences = features - centers[labels]
    grad_centers = _float32_class_sums(features, labels, centers, scale=-2 / len(features)) / (1 + counts)[:, None]
    return np.sum(differences**2) / len(features), centers, grad_centers


@pytest.mark.parametrize("step, rule, formula", [
    (_wen_no_count_float32_sums, "wen", "wen's update is not divided by 1 + n_j"),
    (_facenet_averaged_float32_sums, "facenet", "each class's update is averaged"),
    (_wen_shifted_float32_sums, "wen", "the labels look shifted by +1"),
    (_pytorch_over_count_float32_sums, "pytorch", "grad_centers is divided by 1 + n_j"),
], ids=["wen no count", "facenet averaged", "wen shifted", "pytorch over count"])
def test_float32_sums_are_named_beside_another_mistake_of_the_update(step, rule, formula):
    message, diagnosis = _report(step, rule)
    assert_every_line_is_true(diagnosis)
    (pair,) = diagnosis.named
    assert set(pair.parts) == {_mistake(formula), _mistake("the per-class sums are accumulated in float32")}, message


def test_two_mistakes_of_the_inputs_are_one_pair_named_once():
    def step(features, labels, centers, alpha):
        return numpy_steps.wen_alpha_crossed(features, (labels + 1) % len(centers), centers, alpha)

    message, diagnosis = _report(step, "wen")
    assert_every_line_is_true(diagnosis)
    assert len(diagnosis.named) == 1 and "; or two mistakes at once" not in message, message
    assert set(diagnosis.named[0].parts) == {_mistake("the labels look shifted by +1"),
                                             _mistake("alpha is used as 1 - alpha in wen's")}


def test_a_float32_torch_step_of_rule_pytorch_is_one_mistake():
    """It hands the caller's centers back untouched: they are no float32 values, and need not be."""
    torch = pytest.importorskip("torch")

    def step(features, labels, centers, alpha):
        given = centers
        centers = centers.float().clone().requires_grad_(True)
        loss = ((features.float() - centers[labels]) ** 2).sum() / features.shape[0]
        loss.backward()
        return loss.double(), given, centers.grad.double()

    message, diagnosis = _report(step, "pytorch", framework="torch")
    assert_every_line_is_true(diagnosis)
    assert diagnosis.named == [_mistake("float64 inputs were computed in float32")], message


def test_a_half_precision_loss_below_the_normal_range_is_compared_at_its_own_spacing():
    """The exact result rounded once to float16 is right, even where the loss (1e-7) lies among
    float16's subnormals, 6e-8 apart."""
    def step(features, labels, centers, alpha):
        right = reference(features.astype(np.float64), labels, centers.astype(np.float64), alpha, "facenet")
        return np.float16(right.loss), right.centers.astype(features.dtype)

    for seed in range(3):
        check_center_loss(step, "facenet", dtypes=(np.float16,), max_examples=60, seed=seed)


# --------------------------------------------------------------------------- the evidence as data


def test_the_cases_of_a_report_rerun_as_a_regression_test(tmp_path):
    """What the docs show: the report's cases saved, read back bit for bit (layouts included), and
    the step checked on them alone; a fixed step passes on them."""
    message, diagnosis = _report(numpy_steps.wen_float32_sums, "wen")
    path = tmp_path / "wen_step_cases.npz"
    diagnosis.save_cases(path)
    again = load_cases(path)
    assert len(again) == len(diagnosis.cases)
    for saved, loaded in zip(diagnosis.cases, again):
        assert loaded.dtype == saved.dtype and loaded.alpha == saved.alpha
        for field in ("features", "labels", "centers"):
            a, b = getattr(saved, field), getattr(loaded, field)
            assert a.dtype == b.dtype and np.array_equal(a, b)
            assert (a.flags.c_contiguous, a.flags.f_contiguous) == (b.flags.c_contiguous, b.flags.f_contiguous)
    with pytest.raises(CenterLossMismatch) as failure:
        check_center_loss(numpy_steps.wen_float32_sums, "wen", cases=load_cases(path), max_examples=0)
    assert "the per-class sums are accumulated in float32" in str(failure.value)
    check_center_loss(numpy_steps.wen, "wen", cases=load_cases(path), max_examples=0)


def test_cases_keep_bfloat16_and_their_path_as_given(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bfloat16 = np.dtype(ml_dtypes.bfloat16)
    case = Case(np.arange(6.0).reshape(3, 2).astype(bfloat16), np.array([1, 0, 1], dtype=np.int32),
                np.ones((2, 2), dtype=bfloat16), 0.25)
    path = tmp_path / "no_suffix"
    save_cases(path, [case])
    assert path.exists()
    (again,) = load_cases(path)
    assert again.dtype == bfloat16 and again.centers.dtype == bfloat16 and again.labels.dtype == np.int64
    assert np.array_equal(again.features.astype(np.float32), case.features.astype(np.float32))
    check_center_loss(numpy_steps.facenet, "facenet", cases=[again], max_examples=0, dtypes=(np.float32, "bfloat16"))


def test_cases_given_as_lists_run_and_bad_ones_are_refused_in_words():
    features, centers = [[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0]]
    check_center_loss(numpy_steps.facenet, cases=[(features, [0, 0], centers, 0.5)], max_examples=0)
    with pytest.raises(TypeError, match=r"a case is \(features, labels, centers, alpha\)"):
        check_center_loss(numpy_steps.facenet, cases=[(features, [0, 0])], max_examples=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        check_center_loss(numpy_steps.facenet, cases=[(features, [0, 1], centers, 0.5)], max_examples=0)
    with pytest.raises(TypeError, match="features must be a 2-D array of"):
        check_center_loss(numpy_steps.facenet, cases=[(np.ones((2, 2), int), [0, 0], centers, 0.5)], max_examples=0)


def test_labels_of_any_stride_come_back_as_their_values(tmp_path):
    case = Case(np.ones((3, 2)), np.arange(6)[::2] % 2, np.zeros((2, 2)), 0.5)
    save_cases(tmp_path / "strided_labels.npz", [case])
    (again,) = load_cases(tmp_path / "strided_labels.npz")
    assert again.labels.tolist() == case.labels.tolist()


def test_a_file_that_holds_no_cases_is_refused(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="holds no center-loss cases"):
        load_cases(tmp_path / "other.npz")
    save_cases(tmp_path / "empty.npz", [])
    with pytest.raises(ValueError, match="holds no center-loss cases"):
        load_cases(tmp_path / "empty.npz")
    with pytest.raises(ValueError, match="max_examples must be an integer >= 0"):
        check_center_loss(numpy_steps.wen, "wen", max_examples=-1)
    with pytest.raises(ValueError, match="would check nothing"):
        check_center_loss(numpy_steps.wen, "wen", max_examples=0)


def test_the_oracle_needs_no_ml_dtypes_unless_bfloat16_is_asked_for(monkeypatch):
    """ml_dtypes comes with JAX and TensorFlow, not with centerkern: without it, everything but
    bfloat16 works (and bfloat16 is refused in words)."""
    from centerkern.testing import _comparison

    monkeypatch.setattr(_comparison, "_bfloat16", lambda: None)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes raises ImportError
    assert _comparison.smallest_normal(np.dtype(np.float64)) == np.finfo(np.float64).smallest_normal
    with pytest.raises(CenterLossMismatch, match="duplicate labels are not accumulated"):
        check_center_loss(numpy_steps.fancy_index_scatter, "facenet", max_examples=30, seed=0)
    with pytest.raises(ImportError, match="bfloat16 needs the ml_dtypes package"):
        check_center_loss(numpy_steps.facenet, dtypes=("bfloat16",))
