"""What the tf.distribute tests run in a process of its own: TensorFlow's logical CPU devices
must be made before TensorFlow first uses a device.

``python tests/tensorflow_replica_workers.py OUT.npz`` trains with ``MirroredStrategy`` on two
CPU replicas and saves what each scenario returned (or the text of what it raised); the test
module compares them with the single-process reference on the whole batch."""

from __future__ import annotations

import os
import sys

import numpy as np

REPLICAS, WIDTH, NUM_CLASSES, ALPHA, BATCH, LEARNING_RATE = 2, 4, 6, 0.5, 16, 0.5


def data(seed: int, samples: int):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((samples, WIDTH)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES - 1, samples)  # the last class never appears
    labels[::4] = 1
    return features, labels


def main(out: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS)
    import centerkern.tensorflow as center_tf

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(REPLICAS)])
    results: dict[str, np.ndarray] = {}

    class AddLoss(keras.layers.Layer):
        def call(self, embedded, loss):
            self.add_loss(loss)
            return embedded

    def model_with(layer):
        inputs, label_input = keras.Input((WIDTH,)), keras.Input((), dtype="int64")
        embedded = keras.layers.Identity()(inputs)  # the features as they are: the reference sees them
        model = keras.Model([inputs, label_input], AddLoss()(embedded, layer([embedded, label_input], training=True)))
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
        return model

    def copies(layer):
        return np.stack([np.asarray(copy) for copy in layer.centers.value.values])

    # fit: 25 samples in batches of 16, so the last batch (9) splits unevenly over the replicas
    features, labels = data(0, 25)
    # each rule with the exchange auto picks (sparse: fit's batch size is unknown when traced),
    # and facenet and wen with the dense one
    for rule, exchange in [(rule, "auto") for rule in ("facenet", "wen", "pytorch")] + [("facenet", "dense"),
                                                                                       ("wen", "dense")]:
        scenario = rule if exchange == "auto" else f"{rule}.{exchange}"
        with strategy.scope():
            layer = center_tf.CenterLoss(NUM_CLASSES, alpha=ALPHA, rule=rule, exchange=exchange)
            model = model_with(layer)
        results[f"fit.{scenario}.start"] = copies(layer)
        samples = 16 if rule == "pytorch" else 25  # pytorch: Keras averages the replicas' gradients of even halves
        model.fit([features[:samples], labels[:samples]], epochs=1, batch_size=BATCH, shuffle=False, verbose=0)
        results[f"fit.{scenario}.copies"] = copies(layer)

    # a bad label on the second replica: every replica raises, no copy moves, nothing hangs
    bad = labels[:BATCH].copy()
    bad[-3] = NUM_CLASSES + 2
    for exchange in ("sparse", "dense"):
        with strategy.scope():
            layer = center_tf.CenterLoss(NUM_CLASSES, alpha=ALPHA, rule="wen", exchange=exchange)
            model = model_with(layer)
        try:
            model.fit([features[:BATCH], bad], epochs=1, batch_size=BATCH, shuffle=False, verbose=0)
        except Exception as error:  # noqa: BLE001 - the test reads it
            results[f"bad_label.{exchange}.error"] = np.array(f"{type(error).__name__}: {error}")
        results[f"bad_label.{exchange}.copies"] = copies(layer)

    # a custom training loop (strategy.run), the dense exchange at D = 2: good labels, a bad
    # one, and a traced alpha that is not finite
    narrow = features[:BATCH, :2]
    for name, batch_labels, alpha in (("good", labels[:BATCH], ALPHA), ("bad", bad, ALPHA),
                                      ("nan_alpha", labels[:BATCH], np.nan)):
        with strategy.scope():
            centers = tf.Variable(np.zeros((NUM_CLASSES, 2), np.float32))
        dataset = tf.data.Dataset.from_tensors((narrow, batch_labels.astype(np.int64)))
        per_replica = next(iter(strategy.experimental_distribute_dataset(dataset)))

        @tf.function
        def step(batch, centers=centers, alpha=tf.constant(alpha, tf.float32)):
            return strategy.run(lambda f, y: center_tf.center_loss(f, y, centers, alpha, rule="wen", exchange="dense"),
                                args=batch)
        try:
            step(per_replica)
        except Exception as error:  # noqa: BLE001 - the test reads it
            results[f"narrow_dense.{name}.error"] = np.array(f"{type(error).__name__}: {error}")
        results[f"narrow_dense.{name}.copies"] = np.stack([np.asarray(copy) for copy in centers.values])
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
