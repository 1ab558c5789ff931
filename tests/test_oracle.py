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
from centerkern.testing import KNOWN_MISTAKES, CenterLossMismatch, check_center_loss
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


def test_the_papers_caffe_layer_written_as_loops_passes():
    check_center_loss(numpy_steps.caffe_face_loop, "wen", max_examples=EXAMPLES)


FORM = "diagnosis: the outputs do not have the form the rule asks for"

# each planted bug, the rule it claims, and what its report must say (any one of these)
PLANTED_BUGS = [
    (numpy_steps.fancy_index_scatter, "facenet", ["duplicate labels are not accumulated"]),
    (numpy_steps.gather_after_update, "facenet", ["centers were gathered after the update"]),
    (numpy_steps.wen_formula_called_facenet, "facenet", ["this matches rule 'wen'"]),
    (numpy_steps.facenet, "wen", ["this matches rule 'facenet'"]),
    (numpy_steps.loss_over_batch_only, "facenet", ["the loss is scaled by 1/B instead"]),
    (numpy_steps.off_by_one_labels, "facenet", ["the labels look shifted by +1"]),
    (numpy_steps.float32_inside, "facenet", ["float64 inputs were computed in float32"]),
    # the centers follow wen, the loss is facenet's: the centers are named as wen's, nothing else
    (numpy_steps.wen_centers_with_facenets_loss_in_float32, "facenet", ["centers: this matches rule 'wen'"]),
    (numpy_steps.pytorch_third_output_is_the_features_gradient, "pytorch",
     ["this looks like the gradient with respect to the features"]),
    (numpy_steps.facenet_alpha_as_step, "facenet", ["alpha is used as facenet's step"]),
    (numpy_steps.facenet_sign_flipped, "facenet", ["the update has the wrong sign"]),
    (numpy_steps.wen_count_without_one, "wen", ["wen's count is n_j instead of 1 + n_j"]),
    (numpy_steps.facenet_averaged_per_class, "facenet", ["each class's update is averaged over its n_j samples"]),
    (numpy_steps.loss_not_a_scalar, "facenet", ["the loss is not a scalar"]),
    (numpy_steps.centers_transposed, "facenet", ["the centers come back transposed"]),
    (numpy_steps.centers_in_float32, "facenet", ["the centers come back as float32 for float64 inputs"]),
    (numpy_steps.pytorch_moves_the_centers, "pytorch", ["new centers were returned for rule 'pytorch'"]),
    # mistakes a new user's steps made, written by hand
    (numpy_steps.wen_alpha_crossed, "wen", ["alpha is used as 1 - alpha in wen's update"]),
    (numpy_steps.pytorch_grad_centers_over_count, "pytorch", ["grad_centers is divided by 1 + n_j"]),
    (numpy_steps.wen_float32_sums, "wen", ["the per-class sums are accumulated in float32 for float64 inputs"]),
    (numpy_steps.facenet_labels_clamped, "facenet", ["the labels are clamped into range"]),
    (numpy_steps.wen_loss_summed_in_float32, "wen", ["the loss is accumulated in float32 for float64 inputs"]),
    # another rule under alpha read the other way: named as itself, never as an alpha to fix
    (numpy_steps.wen_without_its_count, "wen", ["wen's update is not divided by 1 + n_j"]),
    (numpy_steps.facenet_with_wens_count, "facenet", ["facenet's update is divided by 1 + n_j"]),
]
FORM_MISTAKES = {"the loss is not a scalar", "the centers come back transposed", "the centers come back as float32",
                 "this looks like the gradient with respect to the features",
                 "new centers were returned for rule 'pytorch'"}
# forms that hide the values: that quantity is not compared where its form is wrong (the others
# are); transposed centers are compared transposed back, and float32 values as they are
UNCOMPARABLE = {"the loss is not a scalar", "new centers were returned for rule 'pytorch'"}


@pytest.mark.parametrize("step, rule, right", PLANTED_BUGS, ids=[bug[0].__name__ for bug in PLANTED_BUGS])
def test_planted_bugs_get_their_diagnosis_and_never_a_wrong_one(step, rule, right):
    """With hypothesis's own shrinking, over several seeds: the report names the planted mistake,
    and no other known mistake anywhere (a wrong lead costs more than none)."""
    for seed in range(5):
        with pytest.raises(AssertionError) as failure:
            check_center_loss(step, rule, max_examples=100, seed=seed)
        message = str(failure.value)
        assert any(name in message for name in right), message
        # the larger cases ran in both dtypes: every "agrees" of the report holds in each
        assert {case.dtype for case in failure.value.diagnosis.cases} == {np.dtype(np.float32), np.dtype(np.float64)}
        wrong = [mistake.explanation for mistake in KNOWN_MISTAKES if mistake.explanation in message
                 and not any(name in mistake.explanation or mistake.explanation in name for name in right)]
        assert not wrong, message
        assert "case: B=" in message and "labels=" in message
        if any(name in message for name in FORM_MISTAKES):  # form first: no formula diagnosis on it
            assert FORM in message and "diagnosis (confirmed" not in message, message
        if any(name in message for name in UNCOMPARABLE):
            assert "not compared" in message or "no formula is matched" in message, message


def test_a_mistake_is_named_only_after_the_larger_cases_confirm_it():
    """At B = D = 1 the loss scales coincide; the larger cases leave only the right one."""
    with pytest.raises(AssertionError) as failure:
        check_center_loss(numpy_steps.loss_over_batch_only, "facenet", max_examples=100, seed=0)
    message = str(failure.value)
    assert "diagnosis (confirmed on the larger cases): the loss is scaled by 1/B instead" in message, message
    assert "what each quantity matches (on this case and 4 larger one(s)" in message
    assert "centers: agrees with the reference" in message


def test_a_report_with_nothing_known_says_so_and_shows_the_evidence():
    def odd(features, labels, centers, alpha):
        loss, new, _ = numpy_steps.facenet(features, labels, centers, alpha)
        return loss * 1.7, new  # no known scale

    with pytest.raises(AssertionError) as failure:
        check_center_loss(odd, "facenet", max_examples=50, seed=1)
    message = str(failure.value)
    assert "loss: no known mistake reproduces it" in message
    assert "diagnosis: no known mistake matches every quantity the step returned" in message


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


def test_command_line_saves_a_reports_cases_and_reruns_them(tmp_path):
    root = Path(__file__).resolve().parent
    saved = tmp_path / "cases.npz"

    def run(function, *options):
        return subprocess.run([sys.executable, "-m", "centerkern", "check", f"oracle_steps.numpy_steps:{function}",
                               "--rule", "wen", *options], cwd=root, capture_output=True, text=True, timeout=300)

    failed = run("wen_float32_sums", "--max-examples", "40", "--save-cases", str(saved))
    assert failed.returncode == 1 and "cases of this report are saved in" in failed.stdout, failed.stdout
    again = run("wen_float32_sums", "--max-examples", "0", "--cases", str(saved))
    assert again.returncode == 1 and "the per-class sums are accumulated in float32" in again.stdout, again.stdout
    fixed = run("wen", "--max-examples", "0", "--cases", str(saved))
    assert fixed.returncode == 0 and "on 5 cases" in fixed.stdout, fixed.stdout + fixed.stderr
    nothing = run("wen", "--max-examples", "0")
    assert nothing.returncode == 2 and "--max-examples must be at least 1, or 0 with --cases" in nothing.stderr


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


def test_pytorch_center_loss_style_distance_matrix_passes():
    """KaiyangZhou/pytorch-center-loss's forward as its author writes it: a B x K matrix of squared
    distances by ||x||^2 + ||c||^2 - 2 x c^T (float32 cancellation included), masked to each
    sample's class and clamped; grad_centers from autograd."""
    torch = pytest.importorskip("torch")

    def distance_matrix_module(features, labels, centers, alpha):
        batch, classes = features.shape[0], centers.shape[0]
        centers = centers.clone().requires_grad_()
        distmat = (torch.pow(features, 2).sum(dim=1, keepdim=True).expand(batch, classes)
                   + torch.pow(centers, 2).sum(dim=1, keepdim=True).expand(classes, batch).t())
        distmat = distmat.addmm(features, centers.t(), beta=1, alpha=-2)
        mask = labels.unsqueeze(1).expand(batch, classes).eq(torch.arange(classes).expand(batch, classes))
        loss = (distmat * mask.to(distmat.dtype)).clamp(min=1e-12, max=1e12).sum() / batch
        loss.backward()
        return loss.detach(), centers.detach(), centers.grad

    # float32, as the module's parameters are: its cancellation must stay within the tolerance
    # the oracle gives other people's code
    check_center_loss(distance_matrix_module, "pytorch", framework="torch", max_examples=EXAMPLES,
                      dtypes=(np.float32,))


def test_a_small_float64_deviation_is_not_called_a_float32_downcast():
    """float32's tolerance would let "computed in float32" explain any small deviation; it is named
    only for values that are float32 numbers, as a float32 computation returns."""
    def nearly(features, labels, centers, alpha):
        loss, new, _ = numpy_steps.facenet(features, labels, centers, alpha)
        return loss * (1 + 5e-8), new  # e.g. pytorch-center-loss's clamp(min=1e-12) on the masked-out entries

    with pytest.raises(AssertionError) as failure:
        check_center_loss(nearly, "facenet", max_examples=50, seed=2)
    message = str(failure.value)
    assert "dtype float64" in message and "computed in float32" not in message, message
    assert "diagnosis: no known mistake matches every quantity" in message


# --------------------------------------------------------------------------- half precision


def _torch_half_steps():
    torch = pytest.importorskip("torch")

    def good(features, labels, centers, alpha):
        differences = features - centers[labels]
        # the loss in float32, as mixed precision computes it: summed in float16, it overflows at scale 10
        return (differences.float() ** 2).mean(), centers.clone().index_add_(0, labels, differences, alpha=1 - alpha)

    def classic_bug(features, labels, centers, alpha):
        differences = features - centers[labels]
        centers = centers.clone()
        centers[labels] += (1 - alpha) * differences
        return (differences.float() ** 2).mean(), centers
    return torch, good, classic_bug


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_steps_at_their_own_tolerance(half):
    """A torch step that takes half-precision inputs passes at that dtype's tolerance; the classic
    bug is found there, and its report's cases (and their "agrees") are all in that dtype."""
    if half == "bfloat16":
        pytest.importorskip("ml_dtypes")
    torch, good, classic_bug = _torch_half_steps()
    for seed in range(3):
        check_center_loss(good, framework="torch", dtypes=(half,), max_examples=EXAMPLES, seed=seed)
    with pytest.raises(CenterLossMismatch) as failure:
        check_center_loss(classic_bug, framework="torch", dtypes=(half,), max_examples=100, seed=0)
    diagnosis = failure.value.diagnosis
    assert {str(case.dtype) for case in diagnosis.cases} == {half}
    assert "duplicate labels are not accumulated" in str(failure.value)
    assert "loss: agrees with the reference on every case" in str(failure.value)


def test_float32_and_bfloat16_together():
    pytest.importorskip("ml_dtypes")
    torch, good, classic_bug = _torch_half_steps()
    check_center_loss(good, framework="torch", dtypes=(np.float32, "bfloat16"), max_examples=EXAMPLES, seed=0)
    with pytest.raises(CenterLossMismatch) as failure:
        check_center_loss(classic_bug, framework="torch", dtypes=(np.float32, "bfloat16"), max_examples=100, seed=0)
    assert {str(case.dtype) for case in failure.value.diagnosis.cases} == {"float32", "bfloat16"}


def test_dtypes_the_oracle_cannot_check_in_are_refused():
    with pytest.raises(ValueError, match="dtypes may be .*float16.*got 'int32'"):
        check_center_loss(numpy_steps.facenet, dtypes=("int32",))
    with pytest.raises(ValueError, match="at least one dtype"):
        check_center_loss(numpy_steps.facenet, dtypes=())


def test_jax_and_tensorflow_steps_in_bfloat16():
    """Each framework's own bfloat16 arrays in and out (read back through ml_dtypes)."""
    pytest.importorskip("ml_dtypes")
    jax = pytest.importorskip("jax")
    tf = pytest.importorskip("tensorflow")

    def jax_step(features, labels, centers, alpha):
        differences = features - centers[labels]
        return jax.numpy.mean(differences.astype("float32") ** 2), centers.at[labels].add((1 - alpha) * differences)

    def tensorflow_step(features, labels, centers, alpha):
        centers_batch = tf.gather(centers, labels)
        loss = tf.reduce_mean(tf.square(tf.cast(features - centers_batch, tf.float32)))
        centers.scatter_sub(tf.IndexedSlices((1 - alpha) * (centers_batch - features), labels))
        return loss, centers

    check_center_loss(jax_step, framework="jax", dtypes=("bfloat16",), max_examples=30, seed=0)
    check_center_loss(tensorflow_step, framework="tensorflow", dtypes=("bfloat16",), max_examples=30, seed=0)
