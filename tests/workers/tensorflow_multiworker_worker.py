"""One worker of a two-worker ``MultiWorkerMirroredStrategy`` on localhost, in a process of its
own: what ``tests/test_tensorflow_multiworker.py`` starts twice.

``python tensorflow_multiworker_worker.py INDEX PORT0 PORT1 OUT.npz``: worker INDEX of the
cluster on 127.0.0.1:PORT0 and 127.0.0.1:PORT1 trains the centers of rule ``wen`` for ``STEPS``
steps of a custom training loop (``strategy.run``), each worker feeding its half of every
global batch, once per exchange; then one step with a bad label in worker 1's half. It saves its
copy of the centers and its losses after each, or the text of what a step raised."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

WORKERS, WIDTH, NUM_CLASSES, ALPHA, GLOBAL_BATCH, STEPS = 2, 4, 6, 0.5, 16, 3


def data():
    """``STEPS`` global batches: features and labels (class 1 hot on both halves, the last class never seen)."""
    rng = np.random.default_rng(7)
    features = rng.standard_normal((STEPS, GLOBAL_BATCH, WIDTH)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES - 1, (STEPS, GLOBAL_BATCH))
    labels[:, ::4] = 1
    return features, labels


def main(index: int, ports: list[int], out: str) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                                          "task": {"type": "worker", "index": index}})
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    import centerkern.tensorflow as center_tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    features, labels = data()
    half = GLOBAL_BATCH // WORKERS
    mine = slice(index * half, (index + 1) * half)
    results: dict[str, np.ndarray] = {}

    def train(name, exchange, batches):
        with strategy.scope():
            centers = tf.Variable(np.zeros((NUM_CLASSES, WIDTH), np.float32))

        @tf.function
        def step(f, y):
            return strategy.run(lambda f, y: center_tf.center_loss(f, y, centers, ALPHA, rule="wen", exchange=exchange),
                                args=(f, y))
        losses = []
        try:
            for f, y in batches:
                losses.append(float(strategy.experimental_local_results(step(f[mine], y[mine]))[0]))
        except Exception as error:  # noqa: BLE001 - the test reads it
            results[f"{name}.error"] = np.array(f"{type(error).__name__}: {error}")
        results[f"{name}.centers"] = np.asarray(centers.numpy())
        results[f"{name}.losses"] = np.array(losses)

    for exchange in ("sparse", "dense"):
        train(exchange, exchange, zip(features, labels))
    bad = labels[0].copy()
    bad[half + 5] = NUM_CLASSES + 2  # in worker 1's half, its position 5
    for exchange in ("sparse", "dense"):
        train(f"bad_label.{exchange}", exchange, [(features[0], bad)])
    np.savez(out, **results)


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(sys.argv[2]), int(sys.argv[3])], sys.argv[4])
