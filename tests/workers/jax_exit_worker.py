"""A training script that ends while its first data-parallel step is still running: what
``tests/test_jax_exit.py`` runs in a child process, to see that it exits.

``python jax_exit_worker.py DEVICES ENDING EXCHANGE``: on DEVICES host devices, dispatch one
jitted ``shard_map`` step of ``centerkern.jax.center_loss`` (``EXCHANGE`` ``none``: each
shard's own update, else the whole batch's, ``axis_name=`` with that ``exchange=``) and,
without waiting for it, either raise (ENDING ``raise``, exit status 1) or end (``end``, exit
status 0)."""

from __future__ import annotations

import os
import sys


def main(devices: int, ending: str, exchange: str) -> None:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    import jax
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import centerkern.jax as center_jax

    mesh = Mesh(np.array(jax.devices()[:devices]), ("batch",))
    options = {} if exchange == "none" else {"axis_name": "batch", "exchange": exchange}

    def step(features, labels, centers):
        (loss, new_centers), grad = jax.value_and_grad(lambda f: center_jax.center_loss(
            f, labels, centers, 0.5, rule="wen", **options), has_aux=True)(features)
        return jax.lax.pmean(loss, "batch"), grad, new_centers[None]

    sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("batch"), P("batch"), P()),
                                    out_specs=(P(), P("batch"), P("batch"))))
    rng = np.random.default_rng(0)
    batch = 2048 * devices
    results = sharded(rng.standard_normal((batch, 256)).astype(np.float32), rng.integers(0, 1000, batch),
                      np.zeros((1000, 256), np.float32))  # dispatched, not waited for
    if ending == "raise":
        raise RuntimeError(f"the script fails after its first step was dispatched ({type(results).__name__})")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
