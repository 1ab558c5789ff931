"""centerkern.testing: the oracle passes correct steps (every backend of this package, and steps
written by hand from SPEC's formulas in NumPy, torch, JAX and TensorFlow) and fails planted bugs
with the right diagnosis."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings

import centerkern
from centerkern.testing import check_center_loss
from centerkern.testing.strategies import center_loss_inputs, labels_with_hot_classes

from conftest import BACKENDS
from oracle_steps import numpy_steps

EXAMPLES = 60


def _backend_step(backend, rule):
    def step(features, labels, centers, alpha):
        result = centerkern.center_loss(features, labels, centers, alpha, rule=rule, backend=backend)
        third = result.grad_centers if rule == "pytorch" else result.grad
        return result.loss, result.centers, third
    return step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", centerkern.RULES)
def test_every_backend_passes(backend, rule):
    check_center_loss(_backend_step(backend, rule), rule, max_examples=20 if backend == "cuda" else EXAMPLES)


@pytest.mark.parametrize("rule", centerkern.RULES)
def test_hand_written_numpy_steps_pass(rule):
    check_center_loss(getattr(numpy_steps, rule), rule, max_examples=EXAMPLES)


@pytest.mark.parametrize("step, rule, diagnosis", [
    (numpy_steps.fancy_index_scatter, "facenet", "duplicate labels are not accumulated"),
    (numpy_steps.gather_after_update, "facenet", "centers were gathered after the update"),
    (numpy_steps.wen_formula_called_facenet, "facenet", "this matches rule 'wen', not 'facenet'"),
    (numpy_steps.facenet, "wen", "this matches rule 'facenet', not 'wen'"),
    (numpy_steps.loss_over_batch_only, "facenet", "loss is scaled by 1/B vs 1/(B·D)"),
    (numpy_steps.off_by_one_labels, "facenet", "the labels look shifted by"),
    (numpy_steps.float32_inside, "facenet", "float64 inputs were computed in float32"),
])
def test_planted_bugs_are_caught_with_their_diagnosis(step, rule, diagnosis):
    with pytest.raises(AssertionError) as failure:
        check_center_loss(step, rule, max_examples=200)
    message = str(failure.value)
    assert diagnosis in message, message
    assert "case: B=" in message and "labels=" in message


def test_the_failing_case_is_shrunk():
    with pytest.raises(AssertionError) as failure:
        check_center_loss(numpy_steps.fancy_index_scatter, max_examples=200)
    # the smallest case that shows dropped duplicates: two samples of one class, one feature
    assert "B=2, D=1" in str(failure.value), str(failure.value)


def test_a_step_that_returns_the_wrong_thing_is_told_so():
    with pytest.raises(AssertionError, match=r"must return \(loss, new_centers\)"):
        check_center_loss(lambda f, y, c, a: 0.0, max_examples=5)


def test_unknown_rule_and_framework():
    with pytest.raises(ValueError, match="'facet'"):
        check_center_loss(numpy_steps.facenet, "facet")
    with pytest.raises(ValueError, match="'mxnet'"):
        check_center_loss(numpy_steps.facenet, framework="mxnet")


@settings(max_examples=30, deadline=None)
@given(center_loss_inputs())
def test_strategy_draws_valid_inputs(case):
    features, labels, centers, alpha = case
    assert features.dtype == centers.dtype and features.shape[1] == centers.shape[1]
    assert labels.shape == (features.shape[0],) and 0 <= labels.min() and labels.max() < centers.shape[0]
    assert 0 < alpha < 1


@settings(max_examples=30, deadline=None)
@given(labels_with_hot_classes(200, 50))
def test_hot_class_labels_have_duplicates(labels):
    assert labels.dtype == np.int64 and labels.size == 200 and np.bincount(labels).max() >= 4


def test_command_line_exit_codes(tmp_path):
    root = Path(__file__).resolve().parent
    for function, code in (("facenet", 0), ("fancy_index_scatter", 1)):
        run = subprocess.run([sys.executable, "-m", "centerkern", "check", f"oracle_steps.numpy_steps:{function}",
                              "--max-examples", "40"], cwd=root, capture_output=True, text=True, timeout=300)
        assert run.returncode == code, run.stdout + run.stderr
        assert ("OK" if code == 0 else "duplicate labels are not accumulated") in run.stdout


# --------------------------------------------------------------------------- frameworks


def test_torch_steps():
    torch = pytest.importorskip("torch")

    def good(features, labels, centers, alpha):
        differences = features - centers.index_select(0, labels)
        return (differences**2).mean(), centers.clone().index_add_(0, labels, differences, alpha=1 - alpha)

    def classic_bug(features, labels, centers, alpha):
        differences = features - centers[labels]
        centers = centers.clone()
        centers[labels] += (1 - alpha) * differences
        return (differences**2).mean(), centers

    check_center_loss(good, framework="torch", max_examples=EXAMPLES)
    with pytest.raises(AssertionError, match="duplicate labels are not accumulated"):
        check_center_loss(classic_bug, framework="torch", max_examples=200)
    assert torch.is_tensor(torch.zeros(1))


def test_jax_step():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy

    @jax.jit
    def good(features, labels, centers, alpha):
        differences = features - centers[labels]
        return jnp.mean(differences**2), centers.at[labels].add((1 - alpha) * differences)

    check_center_loss(good, framework="jax", max_examples=EXAMPLES)


def test_tensorflow_facenet_graph():
    tf = pytest.importorskip("tensorflow")

    def facenet_graph(features, labels, centers, alpha):
        # facenet's own code: gather, then scatter_sub into the centers variable
        centers_batch = tf.gather(centers, labels)
        diff = (1 - alpha) * (centers_batch - features)
        loss = tf.reduce_mean(tf.square(features - centers_batch))
        centers.scatter_sub(tf.IndexedSlices(diff, labels))
        return loss, centers

    check_center_loss(facenet_graph, framework="tensorflow", max_examples=30)
