"""centerkern.jax's codebook updates: equal to centerkern.codebooks on NumPy, under jax.jit,
with no gradient through them; and inside shard_map on 2 and 4 host devices (a process of its own:
JAX must be told how many devices to make before it is imported), every shard's codebook moved
by the whole batch."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import centerkern.jax  # noqa: E402
from centerkern import codebooks  # noqa: E402


def _inputs(seed=0, rows=120, num_codes=20, width=6):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(rows, width)).astype(np.float32)
    state = (rng.uniform(0, 2, num_codes).astype(np.float32), rng.normal(size=(num_codes, width)).astype(np.float32),
             rng.normal(size=(num_codes, width)).astype(np.float32))
    return features, state


@pytest.mark.parametrize("smoothing", codebooks.SMOOTHINGS)
def test_codebook_step_under_jit_equals_quantize_on_numpy(smoothing):
    features, state = _inputs()
    weights = (np.arange(len(features)) % 3 > 0).astype(np.float32)
    expected_state = [s.copy() for s in state]
    expected = codebooks.quantize(features, *expected_state, decay=0.9, smoothing=smoothing, weights=weights)
    step = jax.jit(lambda x, w, s: centerkern.jax.codebook_step(x, *s, decay=0.9, smoothing=smoothing, weights=w))
    result = step(jnp.asarray(features), jnp.asarray(weights), tuple(jnp.asarray(s) for s in state))
    np.testing.assert_array_equal(result.codes, expected.codes)
    np.testing.assert_array_equal(result.quantized, expected.quantized)
    np.testing.assert_array_equal(result.counts, expected.counts)
    for got, e in zip(result.state, expected_state):
        np.testing.assert_allclose(got, e, rtol=1e-6, atol=1e-6)
    frozen = centerkern.jax.codebook_step(jnp.asarray(features), *state, update=False)
    for got, e in zip(frozen.state, state):
        np.testing.assert_array_equal(got, e)


def test_straight_through_gradient_passes_the_step_by():
    features, state = _inputs(1)

    def loss(x):
        result = centerkern.jax.codebook_step(x, *state)
        quantized = x + jax.lax.stop_gradient(result.quantized - x)
        return jnp.sum(quantized ** 2)

    grad = jax.grad(loss)(jnp.asarray(features))
    codes = codebooks.assign_codes(features, state[2]).codes
    np.testing.assert_allclose(grad, 2 * state[2][codes], rtol=1e-5, atol=1e-6)  # x + (q - x) rounds


def test_bad_settings_fail_when_traced():
    features, state = _inputs(2)
    with pytest.raises(ValueError, match="decay must lie in"):
        centerkern.jax.codebook_step(jnp.asarray(features), *state, decay=2.0)
    with pytest.raises(ValueError, match="unknown smoothing"):
        centerkern.jax.ema_update(jnp.asarray(features), jnp.zeros(len(features), jnp.int32), *state, smoothing="x")


SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[2]}"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import centerkern.jax
    rng = np.random.default_rng(4)
    features = rng.normal(size=(3, 64, 5)).astype(np.float32)
    state = (np.zeros(24, np.float32), np.zeros((24, 5), np.float32), rng.normal(size=(24, 5)).astype(np.float32))
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    def step(x, cluster_size, embed_avg, embed):
        result = centerkern.jax.codebook_step(x, cluster_size, embed_avg, embed, decay=0.8, axis_name="batch")
        return result.codes, result.counts[None], *(s[None] for s in result.state)
    sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("batch"), P(), P(), P()),
                                    out_specs=(P("batch"), P("batch"), P("batch"), P("batch"), P("batch"))))
    current, saved = tuple(jnp.asarray(s) for s in state), {}
    for number, x in enumerate(features):
        codes, counts, *shards = sharded(jnp.asarray(x), *current)
        saved[f"codes{number}"], saved[f"counts{number}"] = np.asarray(codes), np.asarray(counts)
        for name, value in zip(("cluster_size", "embed_avg", "embed"), shards):
            saved[f"{name}{number}"] = np.asarray(value)
        current = tuple(s[0] for s in shards)
    np.savez(sys.argv[1], features=features, **{f"start_{i}": s for i, s in enumerate(state)}, **saved)
""")


@pytest.mark.parametrize("devices", [2, 4])
def test_shard_map_moves_every_shard_by_the_whole_batch(tmp_path, devices):
    """Also a regression test: with ``jax.pure_callback`` the host work of 4 shards on this
    2-core machine deadlocked the first step (the process is killed after 120 s, and fails)."""
    out = tmp_path / "sharded.npz"
    completed = subprocess.run([sys.executable, "-c", SHARDED, str(out), str(devices)], capture_output=True,
                               text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    saved = dict(np.load(out))
    state = [saved[f"start_{i}"].copy() for i in range(3)]
    for number, x in enumerate(saved["features"]):
        expected = codebooks.quantize(x, *state, decay=0.8, backend="numpy")
        np.testing.assert_array_equal(saved[f"codes{number}"], expected.codes)
        for shard in range(devices):
            np.testing.assert_array_equal(saved[f"counts{number}"][shard], expected.counts)
            for name, value in zip(("cluster_size", "embed_avg", "embed"), state):
                np.testing.assert_allclose(saved[f"{name}{number}"][shard], value, rtol=1e-5, atol=1e-6)
        for name in ("cluster_size", "embed_avg", "embed"):  # the shards agree bit for bit
            for shard in range(1, devices):
                np.testing.assert_array_equal(saved[f"{name}{number}"][0], saved[f"{name}{number}"][shard])
