"""The oracle on steps with more than one mistake, and on a form problem over a formula problem:
every quantity's line of the report must be true on every case the report lists (checked here
against the report's own data, ``CenterLossMismatch.diagnosis``, by recomputing each claim)."""

import itertools

import numpy as np
import pytest

from centerkern.testing import KNOWN_MISTAKES, TOLERANCE, CenterLossMismatch, check_center_loss, close_within
from centerkern.testing._diagnosis import comparable, form_mistakes
from centerkern.testing._mistakes import reference

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


def assert_every_line_is_true(diagnosis):
    """Each finding, recomputed on every case the report lists: "agrees" only where the values
    equal the reference, "differs" exactly where they do not, and every mistake named for a
    quantity reproduces it on every case where it is compared."""
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



def _combined(loss_from, centers_from):
    """A step whose loss (and grad) one mistake makes, and whose centers another makes."""
    def step(features, labels, centers, alpha):
        with_loss = loss_from.predict(features, labels, centers, alpha, "facenet")
        with_centers = centers_from.predict(features, labels, centers, alpha, "facenet")
        return with_loss.loss, with_centers.centers, with_loss.third
    return step


LOSS_MISTAKES = ["the loss is scaled by 1/B ", "the loss is scaled by 1 (a sum)", "the loss is scaled by 2/B ",
                 "centers were gathered after the update"]
CENTER_MISTAKES = ["duplicate labels are not accumulated", "the update has the wrong sign",
                   "each class's update is averaged", "alpha is used as facenet's step"]


@pytest.mark.parametrize("loss_mistake, centers_mistake", list(itertools.product(LOSS_MISTAKES, CENTER_MISTAKES)))
def test_two_known_mistakes_each_named_for_its_quantity(loss_mistake, centers_mistake):
    loss_from, centers_from = _mistake(loss_mistake), _mistake(centers_mistake)
    message, diagnosis = _report(_combined(loss_from, centers_from), "facenet")
    assert_every_line_is_true(diagnosis)
    findings = {finding.name: finding for finding in diagnosis.findings}
    if findings["loss"].differs_on:  # (a gather after the update changes the loss only where centers move)
        assert loss_from in findings["loss"].explained_by, message
    assert centers_from in findings["centers"].explained_by, message
    assert not findings["centers"].agrees, message
    assert "no known mistake" not in message, message
    assert diagnosis.named or diagnosis.several, message


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
    assert torch.is_tensor(torch.zeros(1))


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
    assert_every_line_is_true(diagnosis)
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
