"""``MultiWorkerMirroredStrategy``, two workers on localhost, in a custom training loop: every
worker's copy of the centers moves by the whole global batch, the same bits on both workers, with
either exchange; a bad label on one worker fails the step on both, naming it, and moves nothing.
(``model.fit`` under this strategy fails in Keras itself, with or without centerkern: see the
scale-out guide.) Each worker is a process of its own (``tests/workers/tensorflow_multiworker_worker.py``)."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import centerkern  # noqa: E402
from conftest import assert_matches  # noqa: E402
from workers.tensorflow_multiworker_worker import ALPHA, NUM_CLASSES, STEPS, WIDTH, data  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    ports = _free_ports(2)
    outs = [tmp_path_factory.mktemp("workers") / f"worker{index}.npz" for index in range(2)]
    script = os.path.join(HERE, "workers", "tensorflow_multiworker_worker.py")
    processes = [subprocess.Popen([sys.executable, script, str(index), *map(str, ports), str(outs[index])],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for index in range(2)]
    try:
        logs = [process.communicate(timeout=300)[0] for process in processes]
    finally:
        for process in processes:  # a worker left waiting for its peer must not outlive the test
            process.kill()
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
    return [dict(np.load(out)) for out in outs]


@pytest.mark.parametrize("exchange", ["sparse", "dense"])
def test_both_workers_move_the_centers_by_the_whole_global_batch(workers, exchange):
    features, labels = data()
    expected = np.zeros((NUM_CLASSES, WIDTH), np.float32)
    for step in range(STEPS):
        expected = centerkern.center_loss(features[step], labels[step], expected, ALPHA, rule="wen",
                                          backend="numpy").centers
    first, second = (worker[f"{exchange}.centers"] for worker in workers)
    np.testing.assert_array_equal(first, second)  # the same bits on both workers
    assert_matches(first, expected, features.reshape(-1, WIDTH), expected)
    for worker in workers:
        assert f"{exchange}.error" not in worker
        assert worker[f"{exchange}.losses"].shape == (STEPS,)


@pytest.mark.parametrize("exchange", ["sparse", "dense"])
def test_a_bad_label_on_one_worker_fails_both_and_moves_nothing(workers, exchange):
    for worker in workers:
        error = str(worker[f"bad_label.{exchange}.error"])
        assert ("label 8 at position 5 is out of range: labels must lie in [0, 6) for 6 classes (in the batch of "
                "replica 1 of 2; bad labels in all: 1; no centers moved anywhere)") in error, error
        np.testing.assert_array_equal(worker[f"bad_label.{exchange}.centers"], 0)
