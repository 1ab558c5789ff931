"""SPEC.md's worked example: TensorFlow's own numbers (facenet) and the formulas' (wen, pytorch)."""

import numpy as np
import pytest

import centerkern

import naive

FEATURES = [[1, 1, 1, 1, 1], [1, 1, 2, 1, 1], [1, 1, 3, 1, 1], [1, 1, 4, 1, 1], [2, 2, 2, 1, 2],
            [2, 2, 2, 2, 2], [2, 2, 2, 3, 2], [3, 3, 3, 3, 1], [3, 3, 3, 3, 2]]
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2]
ALPHA = 0.5

FACENET_STEPS = [  # (loss, centers after the step), from tf.compat.v1 graph mode
    (4.1111111, [[2, 2, 5, 2, 2], [3, 3, 3, 3, 3], [3, 3, 3, 3, 1.5]]),
    (1.4111111, [[0, 0, 0, 0, 0], [1.5] * 5, [3, 3, 3, 3, 1.5]]),
    (1.1611111, [[2, 2, 5, 2, 2], [2.25] * 5, [3, 3, 3, 3, 1.5]]),
]
WEN_STEPS = [
    (10.2777778, [[0.4, 0.4, 1, 0.4, 0.4], [0.75] * 5, [1, 1, 1, 1, 0.5]]),
    (4.4276389, [[0.64, 0.64, 1.6, 0.64, 0.64], [1.21875] * 5, [5 / 3] * 4 + [5 / 6]]),
    (2.0599991, [[0.784, 0.784, 1.96, 0.784, 0.784], [1.51171875] * 5, [19 / 9] * 4 + [19 / 18]]),
]
PYTORCH_LOSS = 20.5555556
PYTORCH_GRAD_CENTERS = [[-8 / 9, -8 / 9, -20 / 9, -8 / 9, -8 / 9], [-4 / 3] * 5, [-4 / 3] * 4 + [-2 / 3]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule, steps", [("facenet", FACENET_STEPS), ("wen", WEN_STEPS)])
def test_three_steps_match_spec(backend, rule, steps, dtype):
    features = np.array(FEATURES, dtype=dtype)
    centers = np.zeros((3, 5), dtype=dtype)
    for loss, expected_centers in steps:
        result = centerkern.center_loss(features, LABELS, centers, ALPHA, rule=rule, out=centers, backend=backend)
        assert result.centers is centers
        assert result.loss == pytest.approx(loss, rel=1e-6)
        np.testing.assert_allclose(centers, np.array(expected_centers, dtype=float), rtol=1e-6, atol=1e-6)


def test_pytorch_rule_matches_spec(backend):
    centers = np.zeros((3, 5))
    result = centerkern.center_loss(np.array(FEATURES, float), LABELS, centers, ALPHA, rule="pytorch", backend=backend)
    assert result.loss == pytest.approx(PYTORCH_LOSS, rel=1e-8)
    np.testing.assert_allclose(result.grad_centers, PYTORCH_GRAD_CENTERS, rtol=1e-12)
    np.testing.assert_array_equal(result.centers, np.zeros((3, 5)))  # moved by the optimizer, not here
    np.testing.assert_allclose(result.grad, 2 * np.array(FEATURES) / 9, rtol=1e-12)


def test_facenet_grad_is_the_mean_square_derivative(backend):
    features = np.array(FEATURES, dtype=np.float64)
    result = centerkern.center_loss(features, LABELS, np.zeros((3, 5)), ALPHA, backend=backend)
    np.testing.assert_allclose(result.grad, 2 * features / features.size, rtol=1e-12)


def test_tf_scatter_sub_seed(backend):
    # tf.scatter_sub([1,2,3], [0,0,1,1], [9,10,11,12]) = [-18,-21,3]
    centers = np.array([[1.0], [2.0], [3.0]])
    result = centerkern.scatter_sub_update(centers, [0, 0, 1, 1], np.array([[9.0], [10.0], [11.0], [12.0]]),
                                           backend=backend)
    np.testing.assert_array_equal(result, [[-18.0], [-21.0], [3.0]])
    np.testing.assert_array_equal(centers, [[1.0], [2.0], [3.0]])  # out=None: untouched


@pytest.mark.parametrize("rule, steps", [("facenet", FACENET_STEPS), ("wen", WEN_STEPS)])
def test_naive_oracle_reproduces_spec(rule, steps):
    centers = np.zeros((3, 5))
    for loss, expected in steps:
        got_loss, _, centers, _ = naive.center_loss(FEATURES, LABELS, centers, ALPHA, rule)
        assert got_loss == pytest.approx(loss, rel=1e-6)
        np.testing.assert_allclose(centers, expected, rtol=1e-6, atol=1e-6)
    assert naive.scatter_sub([[1.0], [2.0], [3.0]], [0, 0, 1, 1], [[9.0], [10.0], [11.0], [12.0]]).ravel().tolist() == [-18, -21, 3]
