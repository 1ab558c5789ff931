"""A training step through each framework adapter against that framework's own code for it.

One step = the loss, its gradient with respect to the features (autograd / jax.grad /
GradientTape) and the rule's center update, on the same inputs, timed in one process in
interleaved blocks (``centerkern._cli.alternatives.interleaved_medians``), medians. Each pair is first
checked to compute the same loss, gradient and centers.

* torch, rule ``wen``: ``centerkern.torch.CenterLoss`` against eager torch (gather, autograd,
  ``unique`` + ``index_add_`` on the touched rows).
* torch, rule ``pytorch``: the module (centers an ``nn.Parameter``) against
  KaiyangZhou/pytorch-center-loss's formulation (a B x K distance matrix) and against a gather
  with autograd.
* JAX, rule ``wen``: ``centerkern.jax.center_loss`` under ``jax.jit`` against the same step
  written in ``jax.numpy`` (``.at[].add``), jitted.
* TensorFlow, rule ``facenet``: ``centerkern.tensorflow.center_loss`` in a ``tf.function``
  against facenet's own ``tf.gather`` / ``scatter_sub`` graph in a ``tf.function``.

    python benchmarks/adapters.py                     # B=1024, D=512, K=10000, float32
    python benchmarks/adapters.py --size 256,64,1000 --repeats 10 --out /tmp/adapters.json
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from centerkern._cli.reports import provenance, write_report  # noqa: E402
from centerkern._cli.alternatives import interleaved_medians  # noqa: E402

ALPHA = 0.5


def _inputs(batch, width, classes):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, width)).astype(np.float32), rng.integers(0, classes, batch),
            rng.standard_normal((classes, width)).astype(np.float32))


def _torch_pairs(features, labels, start):
    import torch

    from centerkern.torch import CenterLoss

    batch = features.shape[0]
    labels_t = torch.from_numpy(labels)

    def module_step(rule):
        module = CenterLoss(*start.shape, alpha=ALPHA, rule=rule)
        with torch.no_grad():
            module.centers.copy_(torch.from_numpy(start))

        def run():
            tracked = torch.from_numpy(features).requires_grad_()
            loss = module(tracked, labels_t)
            loss.backward()
            return float(loss.detach()), tracked.grad, module.centers.detach()
        return run

    def eager_wen():
        centers = torch.from_numpy(start.copy())

        def run():
            tracked = torch.from_numpy(features).requires_grad_()
            difference = tracked - centers[labels_t]
            loss = difference.pow(2).sum() / (2 * batch)
            loss.backward()
            with torch.no_grad():
                classes, index = labels_t.unique(return_inverse=True)
                sums = torch.zeros(len(classes), centers.shape[1]).index_add_(0, index, difference)
                counts = torch.bincount(index, minlength=len(classes)).to(sums.dtype)
                centers.index_add_(0, classes, ALPHA * sums / (1 + counts)[:, None])
            return float(loss.detach()), tracked.grad, centers
        return run

    def distance_matrix_pytorch():  # KaiyangZhou/pytorch-center-loss's forward, rewritten
        centers = torch.nn.Parameter(torch.from_numpy(start.copy()))

        def run():
            centers.grad = None
            tracked = torch.from_numpy(features).requires_grad_()
            distances = (tracked.pow(2).sum(1, keepdim=True) + centers.pow(2).sum(1)[None, :]
                         - 2 * tracked @ centers.t())
            mask = labels_t[:, None] == torch.arange(centers.shape[0])[None, :]
            loss = (distances * mask.float()).clamp(min=1e-12, max=1e12).sum() / batch
            loss.backward()
            return float(loss.detach()), tracked.grad, centers.grad
        return run

    def gather_pytorch():
        centers = torch.nn.Parameter(torch.from_numpy(start.copy()))

        def run():
            centers.grad = None
            tracked = torch.from_numpy(features).requires_grad_()
            loss = (tracked - centers[labels_t]).pow(2).sum() / batch
            loss.backward()
            return float(loss.detach()), tracked.grad, centers.grad
        return run

    def module_pytorch():
        module = CenterLoss(*start.shape, rule="pytorch")
        with torch.no_grad():
            module.centers.copy_(torch.from_numpy(start))

        def run():
            module.centers.grad = None
            tracked = torch.from_numpy(features).requires_grad_()
            loss = module(tracked, labels_t)
            loss.backward()
            return float(loss.detach()), tracked.grad, module.centers.grad
        return run

    return [
        ("torch wen step", {"centerkern.torch.CenterLoss": module_step("wen"), "torch eager": eager_wen()}),
        ("torch pytorch-rule step", {"centerkern.torch.CenterLoss": module_pytorch(),
                                     "torch gather + autograd": gather_pytorch(),
                                     "pytorch-center-loss (B x K distances)": distance_matrix_pytorch()}),
    ]


def _jax_pairs(features, labels, start):
    import jax
    import jax.numpy as jnp

    import centerkern.jax as center_jax

    batch = features.shape[0]

    def native(features, labels, centers):
        def loss_of(features):
            return jnp.sum((features - centers[labels]) ** 2) / (2 * batch)

        loss, grad = jax.value_and_grad(loss_of)(features)
        difference = features - centers[labels]
        counts = jnp.bincount(labels, length=centers.shape[0])
        new = centers.at[labels].add(ALPHA * difference / (1 + counts[labels])[:, None])
        return loss, grad, new

    def ours(features, labels, centers):
        (loss, new), grad = jax.value_and_grad(
            lambda f: center_jax.center_loss(f, labels, centers, ALPHA, rule="wen"), has_aux=True
        )(features)
        return loss, grad, new

    def runner(step):
        jitted = jax.jit(step)
        arguments = (jnp.asarray(features), jnp.asarray(labels), jnp.asarray(start))

        def run():
            loss, grad, new = jitted(*arguments)
            new.block_until_ready()
            return float(loss), np.asarray(grad), np.asarray(new)
        return run

    return [("JAX wen step (jit)", {"centerkern.jax.center_loss": runner(ours), "jax.numpy (.at[].add)": runner(native)})]


def _tensorflow_pairs(features, labels, start):
    import tensorflow as tf

    import centerkern.tensorflow as center_tf

    def ours():
        centers = tf.Variable(start)

        @tf.function
        def step(features, labels):
            with tf.GradientTape() as tape:
                tape.watch(features)
                loss = center_tf.center_loss(features, labels, centers, 1 - ALPHA)
            return loss, tape.gradient(loss, features)
        return _tf_runner(step, centers, features, labels)

    def facenet():  # facenet's center_loss, as a tf.function step on a tf.Variable
        centers = tf.Variable(start)

        @tf.function
        def step(features, labels):
            with tf.GradientTape() as tape:
                tape.watch(features)
                centers_batch = tf.gather(centers, labels)
                loss = tf.reduce_mean(tf.square(features - centers_batch))
            grad = tape.gradient(loss, features)
            difference = ALPHA * (centers_batch - features)  # (1 - alpha) with facenet's alpha = 1 - ALPHA
            with tf.control_dependencies([loss, grad]):
                centers.scatter_sub(tf.IndexedSlices(difference, labels))
            return loss, grad
        return _tf_runner(step, centers, features, labels)

    return [("TensorFlow facenet step (tf.function)", {"centerkern.tensorflow.center_loss": ours(), "facenet (tf.gather + scatter_sub)": facenet()})]


def _tf_runner(step, centers, features, labels):
    import tensorflow as tf

    features_t, labels_t = tf.constant(features), tf.constant(labels)

    def run():
        loss, grad = step(features_t, labels_t)
        return float(loss), grad.numpy(), centers.numpy()
    return run


def _check_same(group, runs):
    """Every implementation's first step gives the reference's loss, grad and third output."""
    outputs = {name: run() for name, run in runs.items()}
    reference_name = next(iter(outputs))
    reference = outputs[reference_name]
    for name, output in outputs.items():
        assert abs(output[0] - reference[0]) <= 1e-4 * abs(reference[0]), (group, name, output[0], reference[0])
        for got, expected in zip(output[1:], reference[1:]):
            np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-3, atol=1e-5,
                                       err_msg=f"{group}: {name} against {reference_name}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1024,512,10000", help="B,D,K")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    batch, width, classes = (int(x) for x in args.size.split(","))
    features, labels, start = _inputs(batch, width, classes)

    report = {"what": "one training step per adapter against the framework's own code, median ms",
              **provenance(), "size": {"B": batch, "D": width, "K": classes}, "groups": {}}
    for make in (_torch_pairs, _jax_pairs, _tensorflow_pairs):
        # two sets of fresh state: one for the check, one to time (timing moves the centers
        # again and again, which changes nothing of the cost)
        for (group, fresh), (_, runs) in zip(make(features, labels, start), make(features, labels, start)):
            _check_same(group, fresh)
            medians = interleaved_medians(runs, args.repeats)
            report["groups"][group] = {name: 1e3 * seconds for name, seconds in medians.items()}
            print(group)
            ours = next(iter(medians.values()))
            for name, seconds in medians.items():
                print(f"  {name:42s} {1e3 * seconds:9.3f} ms   {seconds / ours:6.2f}x centerkern's")
    write_report(report, args.out or Path(__file__).parent / "results" / f"adapters-{report['date'][:10]}.json")


if __name__ == "__main__":
    main()
