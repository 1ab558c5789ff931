"""centerkern.tensorflow under tf.distribute: with MirroredStrategy on two CPU replicas, ``fit``
moves the centers as one process on the whole batch would, the same bits in every replica's
copy; a bad label on one replica fails the step on every replica with nothing moved; strategies
centerkern cannot serve are refused by name. The replicas are made in a process of their own
(``tests/workers/tensorflow_replica_workers.py``)."""

import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import centerkern  # noqa: E402
import centerkern.tensorflow as center_tf  # noqa: E402
from conftest import assert_matches  # noqa: E402
from workers.tensorflow_replica_workers import ALPHA, BATCH, LEARNING_RATE, REPLICAS, data  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("replicas") / "results.npz"
    completed = subprocess.run([sys.executable, os.path.join(HERE, "workers", "tensorflow_replica_workers.py"), str(out)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return dict(np.load(out))


def _assert_identical_copies(copies):
    assert copies.shape[0] == REPLICAS
    for replica in range(1, REPLICAS):
        np.testing.assert_array_equal(copies[replica], copies[0])


@pytest.mark.parametrize("scenario", ["facenet", "wen", "facenet.dense", "wen.dense"])
def test_fit_under_mirrored_strategy_moves_every_copy_by_the_whole_batch(results, scenario):
    """Either exchange (sparse where ``auto`` picks it, dense asked for) gives every copy the
    same bits, the whole batch's update."""
    rule = scenario.split(".")[0]
    features, labels = data(0, 25)
    centers = results[f"fit.{scenario}.start"][0]
    for start in range(0, 25, BATCH):  # the batches fit took, in order; the last one split 5 + 4
        centers = centerkern.center_loss(features[start:start + BATCH], labels[start:start + BATCH], centers, ALPHA,
                                         rule=rule, backend="numpy").centers
    copies = results[f"fit.{scenario}.copies"]
    _assert_identical_copies(copies)
    assert_matches(copies[0], centers, features, centers)


def test_rule_pytorch_under_mirrored_strategy_steps_the_centers_by_the_averaged_gradient(results):
    features, labels = data(0, 25)
    start = results["fit.pytorch.start"][0]
    expected = centerkern.center_loss(features[:BATCH], labels[:BATCH], start, ALPHA, rule="pytorch", backend="numpy")
    copies = results["fit.pytorch.copies"]
    _assert_identical_copies(copies)
    assert_matches(copies[0], start - LEARNING_RATE * expected.grad_centers, features, start)


@pytest.mark.parametrize("exchange", ["sparse", "dense"])
def test_a_bad_label_on_one_replica_fails_the_step_everywhere_and_moves_nothing(results, exchange):
    error = str(results[f"bad_label.{exchange}.error"])
    # whichever replica's error TensorFlow reports (the one holding the label, or the other),
    # it names the holder's finding
    assert ("label 8 at position 5 is out of range: labels must lie in [0, 6) for 6 classes (in the batch of "
            "replica 1 of 2; bad labels in all: 1; no centers moved anywhere)") in error, error
    copies = results[f"bad_label.{exchange}.copies"]
    _assert_identical_copies(copies)
    np.testing.assert_array_equal(copies[0], np.zeros_like(copies[0]))  # wen's centers start at zero


def test_the_dense_exchange_in_a_custom_training_loop(results):
    """``strategy.run`` with the dense exchange at D = 2: the whole batch's update on every copy;
    a bad label, and a traced alpha that is not finite, fail every replica and move nothing."""
    features, labels = data(0, 25)
    expected = centerkern.center_loss(features[:BATCH, :2], labels[:BATCH], np.zeros((6, 2), np.float32), ALPHA,
                                      rule="wen", backend="numpy").centers
    copies = results["narrow_dense.good.copies"]
    _assert_identical_copies(copies)
    assert_matches(copies[0], expected, features[:BATCH, :2], expected)
    error = str(results["narrow_dense.bad.error"])
    assert ("label 8 at position 5 is out of range: labels must lie in [0, 6) for 6 classes (in the batch of "
            "replica 1 of 2; bad labels in all: 1; no centers moved anywhere)") in error, error
    np.testing.assert_array_equal(results["narrow_dense.bad.copies"], 0)
    assert "alpha must be finite, got nan" in str(results["narrow_dense.nan_alpha.error"])
    np.testing.assert_array_equal(results["narrow_dense.nan_alpha.copies"], 0)


def test_a_strategy_centerkern_cannot_serve_is_refused_by_name():
    strategy = tf.distribute.experimental.CentralStorageStrategy()
    variable = tf.Variable(np.zeros((3, 2), np.float32))
    features = np.ones((4, 2), np.float32)
    with strategy.scope():
        with pytest.raises(RuntimeError, match="centerkern.tensorflow cannot serve CentralStorageStrategy"):
            center_tf.center_loss(features, np.array([0, 1, 2, 0]), variable, 0.5)
    np.testing.assert_array_equal(variable.numpy(), np.zeros((3, 2), np.float32))
