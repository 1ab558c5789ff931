"""centerkern.jax's custom call on a GPU: the cuda kernels on XLA's device buffers and stream.
Needs JAX with a GPU (benchmarks/gpu_device_run.sh runs it there); elsewhere it is skipped."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs JAX computing on a GPU")

import jax.numpy as jnp  # noqa: E402

import centerkern  # noqa: E402
import centerkern.jax as center_jax  # noqa: E402
from conftest import assert_matches  # noqa: E402


@pytest.fixture(autouse=True)
def gpu_custom_call(monkeypatch):
    monkeypatch.setenv(center_jax.GPU_CUSTOM_CALL_SWITCH, "1")
    monkeypatch.delitem(center_jax._ffi_state, "available", raising=False)
    assert center_jax.step_path().startswith("XLA FFI custom call on the GPU")
    yield
    center_jax._ffi_state.pop("available", None)


@pytest.mark.parametrize("rule", centerkern.RULES)
def test_gpu_custom_call_equals_the_reference_and_writes_donated_centers_in_place(rule):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((300, 40)).astype(np.float32)
    labels = np.where(rng.random(300) < 0.8, 3, rng.integers(0, 50, 300))  # a hot class across tiles
    centers = rng.standard_normal((50, 40)).astype(np.float32)
    expected = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, backend="numpy")

    def step(features, centers):
        return jax.value_and_grad(lambda f: center_jax.center_loss(f, labels, centers, 0.5, rule=rule),
                                  has_aux=True)(features)

    current = jnp.asarray(centers)
    address = current.unsafe_buffer_pointer()
    (loss, moved), grad = jax.jit(step, donate_argnums=1)(jnp.asarray(features), current)
    assert float(loss) == pytest.approx(expected.loss, rel=1e-5)
    assert_matches(np.asarray(grad), expected.grad, features, centers)
    assert_matches(np.asarray(moved), expected.centers, features, centers)
    if rule != "pytorch":
        assert moved.unsafe_buffer_pointer() == address


def test_gpu_custom_call_bad_label_names_its_position_and_leaves_the_centers():
    rng = np.random.default_rng(1)
    features, centers = rng.standard_normal((20, 8)).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float32)
    labels = rng.integers(0, 5, 20)
    labels[7] = 9
    held = jnp.asarray(centers)
    with pytest.raises(Exception, match=r"label 9 at position 7 is out of range"):
        jax.block_until_ready(jax.jit(lambda f, c: center_jax.center_loss(f, labels, c, 0.5))(features, held))
    np.testing.assert_array_equal(np.asarray(held), centers)
