"""What the JAX data-parallel tests run in a process of its own: JAX must be told how many host
devices to make (``--xla_force_host_platform_device_count``) before it is imported.

``python tests/jax_shard_workers.py DEVICES OUT.npz`` runs every scenario on DEVICES host devices
and saves what each returned; a scenario that raises saves its error's text instead. The test
module compares them with the single-process reference on the whole batch."""

from __future__ import annotations

import os
import sys

import numpy as np

BATCH, WIDTH, NUM_CLASSES, ALPHA, STEPS = 24, 5, 7, 0.5, 3
RULES = ("facenet", "wen", "pytorch")


def batches(seed: int):
    """``STEPS`` global batches (a hot class on every shard, one class never seen) and centers."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((STEPS, BATCH, WIDTH)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES - 1, (STEPS, BATCH)).astype(np.int32)
    labels[:, ::3] = 2
    centers = rng.standard_normal((NUM_CLASSES, WIDTH)).astype(np.float32)
    return features, labels, centers


def main(devices: int, out: str) -> None:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import centerkern.jax as center_jax

    mesh = Mesh(np.array(jax.devices()[:devices]), ("batch",))
    results: dict[str, np.ndarray] = {}

    def record(name, run):
        try:
            results[name] = np.asarray(run())
        except Exception as error:  # noqa: BLE001 - the test reads what each scenario raised
            results[f"{name}.error"] = np.array(f"{type(error).__name__}: {error}")

    def sharded(function, out_specs):
        return jax.jit(jax.shard_map(function, mesh=mesh, in_specs=(P("batch"), P("batch"), P()),
                                     out_specs=out_specs))

    features, labels, centers = batches(devices)
    # each rule with the exchange auto picks (here, R·B >= K: dense), and facenet and wen with the other
    scenarios = [(rule, "auto") for rule in RULES] + [("facenet", "sparse"), ("wen", "sparse")]
    for rule, exchange in scenarios:
        def objective(f, y, c, rule=rule, exchange=exchange):
            loss, new_centers = center_jax.center_loss(f, y, c, ALPHA, rule=rule, axis_name="batch", exchange=exchange)
            return jax.lax.pmean(loss, "batch"), new_centers

        step = jax.value_and_grad(objective, argnums=(0, 2), has_aux=True)
        # every shard's copy of the new centers, stacked, to compare them bit for bit
        training = sharded(lambda f, y, c, step=step: (lambda r: (r[0][0], r[0][1][None], r[1][0], r[1][1]))(
            step(f, y, c)), (P(), P("batch"), P("batch"), P()))

        def train(training=training):
            current, out = centers, []
            for s in range(STEPS):
                loss, copies, grad_features, grad_centers = training(features[s], labels[s], current)
                out.append((loss, copies, grad_features, grad_centers))
                current = copies[0]
            return out

        trained = train()
        scenario = rule if exchange == "auto" else f"{rule}.{exchange}"
        for index, name in enumerate(("loss", "copies", "grad_features", "grad_centers")):
            results[f"shard_map.{scenario}.{name}"] = np.stack([np.asarray(r[index]) for r in trained])

        # pmap: the same global update, one copy per device
        def pmapped(rule=rule):
            step = jax.pmap(lambda f, y, c: center_jax.center_loss(f, y, c, ALPHA, rule=rule, axis_name="batch"),
                            axis_name="batch", in_axes=(0, 0, None), devices=jax.devices()[:devices])
            return step(features[0].reshape(devices, -1, WIDTH), labels[0].reshape(devices, -1), centers)[1]
        record(f"pmap.{rule}.copies", pmapped)

    # without axis_name: each shard's own update, typed as varying, so that a replicated output is refused
    def per_shard(f, y, c):
        loss, new_centers = center_jax.center_loss(f, y, c, ALPHA, rule="wen")
        return loss[None], new_centers[None]
    record("per_shard.loss_and_centers", lambda: sharded(per_shard, (P("batch"), P("batch")))(
        features[0], labels[0], centers)[1])
    record("per_shard.loss_as_replicated", lambda: sharded(
        lambda f, y, c: center_jax.center_loss(f, y, c, ALPHA, rule="wen")[0], P())(features[0], labels[0], centers))
    record("per_shard.centers_as_replicated", lambda: sharded(
        lambda f, y, c: center_jax.center_loss(f, y, c, ALPHA, rule="wen")[1], P())(features[0], labels[0], centers))
    record("per_shard.grad", lambda: sharded(jax.grad(
        lambda f, y, c: jax.lax.pmean(center_jax.center_loss(f, y, c, ALPHA, rule="wen")[0], "batch")), P("batch"))(
        features[0], labels[0], centers))

    # a bad label on the last shard: every shard raises, nothing hangs
    bad = labels[0].copy()
    bad[-2] = NUM_CLASSES + 4
    for global_update in (True, False):
        def bad_step(f, y, c, global_update=global_update):
            loss, new_centers = center_jax.center_loss(f, y, c, ALPHA, rule="facenet",
                                                       axis_name="batch" if global_update else None)
            return jax.lax.pmean(loss, "batch"), new_centers[None]
        record(f"bad_label.{'global' if global_update else 'per_shard'}", lambda bad_step=bad_step: jax.block_until_ready(
            sharded(bad_step, (P(), P("batch")))(features[0], bad, centers)))
    # an alpha that is not finite, traced: every shard fails alike, with either exchange
    for exchange in ("sparse", "dense"):
        def nan_alpha_step(f, y, c, exchange=exchange):
            loss, new_centers = center_jax.center_loss(f, y, c, jnp.float32(np.nan), rule="wen", axis_name="batch",
                                                       exchange=exchange)
            return jax.lax.pmean(loss, "batch"), new_centers[None]
        record(f"nan_alpha.{exchange}", lambda nan_alpha_step=nan_alpha_step: jax.block_until_ready(
            sharded(nan_alpha_step, (P(), P("batch")))(features[0], labels[0], centers)))
    for global_update in (True, False):  # and under pmap
        def bad_pmapped(global_update=global_update):
            step = jax.pmap(lambda f, y, c: center_jax.center_loss(
                f, y, c, ALPHA, rule="facenet", axis_name="batch" if global_update else None)[1],
                axis_name="batch", in_axes=(0, 0, None))
            return jax.block_until_ready(step(features[0].reshape(devices, BATCH // devices, WIDTH),
                                              bad.reshape(devices, BATCH // devices), centers))
        record(f"bad_label.pmap.{'global' if global_update else 'per_shard'}", bad_pmapped)
    np.savez(out, **results)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
