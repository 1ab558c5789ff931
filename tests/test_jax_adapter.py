"""centerkern.jax.center_loss: values against the numpy backend, gradients against jax.grad of
the SPEC formulas, under jax.jit, value_and_grad(has_aux=True) and vmap."""

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import centerkern  # noqa: E402
import centerkern.jax as center_jax  # noqa: E402
from centerkern._core.rules import rule_coefficients  # noqa: E402
from centerkern.testing.strategies import center_loss_inputs  # noqa: E402
from conftest import assert_matches  # noqa: E402


def _batch(seed, batch=30, classes=8, width=4):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes - 1, batch)  # the last class never appears
    labels[: batch // 3] = 2  # a hot class
    return (rng.standard_normal((batch, width)).astype(np.float32), labels,
            rng.standard_normal((classes, width)).astype(np.float32))


@pytest.fixture(autouse=True, params=["ffi", "callback"])
def step_path(request, monkeypatch):
    """Every test on both paths: the XLA FFI custom call, and the host-callback fallback that an
    older jaxlib (no jax.ffi) gets."""
    if request.param == "ffi":
        assert center_jax.ffi_path_available()  # the jax installed here has jax.ffi
    monkeypatch.setitem(center_jax._ffi_state, "available", request.param == "ffi")
    return request.param


def _formula_loss(rule, features, labels, centers):
    scale = rule_coefficients(rule, 0.5, features.shape[0], features.shape[1]).loss_scale
    return scale * jnp.sum((features - centers[labels]) ** 2)


@pytest.mark.parametrize("rule", centerkern.RULES)
@pytest.mark.parametrize("jit", [False, True])
def test_values_and_gradients(rule, jit):
    features, labels, centers = _batch(0)
    expected = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, backend="numpy")

    def objective(features, centers):
        return center_jax.center_loss(features, labels, centers, 0.5, rule=rule)

    step = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
    (loss, new_centers), (grad_features, grad_centers) = (jax.jit(step) if jit else step)(features, centers)
    reference = jax.grad(_formula_loss, argnums=(1, 3))(rule, features, labels, centers)

    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert float(loss) == pytest.approx(expected.loss, rel=1e-6)
    assert isinstance(new_centers, jax.Array) and new_centers.dtype == jnp.float32
    assert_matches(np.asarray(new_centers), expected.centers, features, centers)
    assert_matches(np.asarray(grad_features), np.asarray(reference[0]), features, centers)
    assert_matches(np.asarray(grad_features), expected.grad, features, centers)
    assert_matches(np.asarray(grad_centers), np.asarray(reference[1]), features, centers)
    if rule == "pytorch":
        assert_matches(np.asarray(grad_centers), expected.grad_centers, features, centers)


def test_jitted_training_loop_matches_repeated_reference_steps():
    features, labels, centers = _batch(1)
    step = jax.jit(lambda f, l, c: center_jax.center_loss(f, l, c, 0.5, rule="wen"), donate_argnums=2)
    reference = centers.copy()
    current = jnp.asarray(centers)
    for seed in range(4):
        features, labels, _ = _batch(10 + seed)
        loss, current = step(features, labels, current)
        expected = centerkern.center_loss(features, labels, reference, 0.5, rule="wen", backend="numpy")
        reference = expected.centers
        assert float(loss) == pytest.approx(expected.loss, rel=1e-6)
    assert_matches(np.asarray(current), reference, features, centers)


def test_float64_in_x64_mode_and_labels_of_any_shape():
    features, labels, centers = _batch(2)
    with jax.enable_x64(True):
        loss, new_centers = center_jax.center_loss(
            features.astype(np.float64), labels.reshape(-1, 1), centers.astype(np.float64), 0.25, rule="facenet"
        )
        assert loss.dtype == jnp.float64 and new_centers.dtype == jnp.float64
    expected = centerkern.center_loss(features.astype(np.float64), labels, centers.astype(np.float64), 0.25, backend="numpy")
    assert float(loss) == pytest.approx(expected.loss, rel=1e-12)
    assert_matches(np.asarray(new_centers), expected.centers)


def test_vmap_over_independent_problems():
    batches = [_batch(20 + i) for i in range(3)]
    stacked = [np.stack(parts) for parts in zip(*batches)]
    losses, centers = jax.vmap(lambda f, l, c: center_jax.center_loss(f, l, c, 0.5, rule="wen"))(*stacked)
    for i, (features, labels, start) in enumerate(batches):
        expected = centerkern.center_loss(features, labels, start, 0.5, rule="wen", backend="numpy")
        assert float(losses[i]) == pytest.approx(expected.loss, rel=1e-6)
        assert_matches(np.asarray(centers[i]), expected.centers, features, start)


def test_empty_batch_and_errors():
    features, labels, centers = _batch(3)
    loss, new_centers = center_jax.center_loss(features[:0], labels[:0], centers, 0.5)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(np.asarray(new_centers), centers)
    with pytest.raises(TypeError, match="dtypes must match"):
        center_jax.center_loss(features, labels, centers.astype(np.float16), 0.5)
    with pytest.raises(TypeError, match="integer"):
        center_jax.center_loss(features, labels.astype(np.float32), centers, 0.5)
    with pytest.raises(ValueError, match="rule"):
        center_jax.center_loss(features, labels, centers, 0.5, rule="caffe")
    with pytest.raises(ValueError, match="29 labels for features of shape"):
        center_jax.center_loss(features, labels[:-1], centers, 0.5)
    bad = labels.copy()
    bad[5] = 8
    with pytest.raises(IndexError, match="label 8 at position 5"):
        center_jax.center_loss(features, bad, centers, 0.5)
    with pytest.raises(Exception, match="label 8 at position 5"):  # under jit the callback's error, wrapped by JAX
        jax.jit(lambda f, l, c: center_jax.center_loss(f, l, c, 0.5))(features, bad, centers)[0].block_until_ready()


@pytest.mark.parametrize("label_dtype, num_classes", [(np.uint8, 256), (np.int8, 128), (np.int16, 2**15)])
def test_narrow_label_dtypes_with_as_many_classes_as_they_can_name(label_dtype, num_classes):
    """The padding class K must not wrap onto class 0 (uint8, K=256) or onto a real row (int8, int16)."""
    rng = np.random.default_rng(5)
    labels = np.array([0, 0, num_classes - 1, 7, 7, 7], dtype=label_dtype)
    features = rng.standard_normal((6, 3)).astype(np.float32)
    centers = rng.standard_normal((num_classes, 3)).astype(np.float32)
    expected = centerkern.center_loss(features, labels, centers, 0.5, rule="wen", backend="numpy")
    loss, new_centers = jax.jit(lambda f, l, c: center_jax.center_loss(f, l, c, 0.5, rule="wen"))(features, labels, centers)
    assert_matches(np.asarray(new_centers), expected.centers, features, centers)


def test_donated_centers_are_updated_in_place_by_the_custom_call(step_path):
    """The custom call writes the new centers over the donated buffer; the host callback (which
    copies the batch's rows across) gives the same values."""
    features, labels, centers = _batch(12)
    expected = centerkern.center_loss(features, labels, centers, 0.5, rule="wen", backend="numpy")
    step = jax.jit(lambda f, l, c: center_jax.center_loss(f, l, c, 0.5, rule="wen"), donate_argnums=2)
    current = jnp.asarray(centers)
    address = current.unsafe_buffer_pointer()
    loss, moved = step(features, labels, current)
    if step_path == "ffi":
        assert center_jax.step_path().startswith("XLA FFI custom call")
        assert moved.unsafe_buffer_pointer() == address  # the donated buffer, updated: no K x D copy
    assert float(loss) == pytest.approx(expected.loss, rel=1e-6)
    assert_matches(np.asarray(moved), expected.centers, features, centers)


def test_a_bad_label_inside_jit_names_its_position_and_value(step_path):
    features, labels, centers = _batch(13)
    bad = labels.copy()
    bad[4] = 9
    held = jnp.asarray(centers)
    step = jax.jit(lambda f, l, c: center_jax.center_loss(f, l, c, 0.5, rule="wen"))
    with pytest.raises(Exception, match=r"label 9 at position 4 is out of range: labels must lie in \[0, 8\)"):
        jax.block_until_ready(step(features, bad, held))
    np.testing.assert_array_equal(np.asarray(held), centers)  # nothing written


@pytest.mark.parametrize("alpha", [np.nan, np.inf, -np.inf])
def test_an_alpha_that_is_not_finite_inside_jit_is_refused_in_the_validations_words(alpha):
    """The traced alpha is checked by the handler, which writes the Python validation's own
    message (``check_alpha``'s), and nothing moves."""
    features, labels, centers = _batch(14)
    with pytest.raises(ValueError) as expected:
        centerkern.center_loss(features, labels, centers, alpha)
    assert str(expected.value) == f"alpha must be finite, got {float(alpha)!r}"
    held = jnp.asarray(centers)
    step = jax.jit(lambda f, l, c, a: center_jax.center_loss(f, l, c, a, rule="wen"))
    # the handler's words exactly; the host callback's name the float32 it got
    with pytest.raises(Exception, match=rf"alpha must be finite, got (np\.float32\()?{re.escape(repr(float(alpha)))}"):
        jax.block_until_ready(step(features, labels, held, np.float32(alpha)))
    np.testing.assert_array_equal(np.asarray(held), centers)


def test_the_cpu_steps_handler_is_compiled_code_that_needs_no_python():
    """The handler XLA calls for the numba backend is a Numba cfunc (no GIL, nothing to import),
    compiled when the step was traced."""
    from numba.core.ccallback import CFunc

    features, labels, centers = _batch(15)
    jax.block_until_ready(jax.jit(lambda f, l, c: center_jax.center_loss(f, l, c, 0.5, rule="wen"))(
        features, labels, centers))
    handlers = {name: kept for name, kept in center_jax._REGISTERED.items() if name.startswith("centerkern_center_loss_numba")}
    assert handlers and all(isinstance(kept[0], CFunc) for kept in handlers.values()), handlers


# the path fixture holds for every example of the test: it is the same on each
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=center_loss_inputs(max_batch=12, max_width=5, max_classes=6), rule=st.sampled_from(centerkern.RULES),
       label_dtype=st.sampled_from([np.int32, np.int64]), empty=st.booleans())
def test_property_values_and_gradients_under_jit(step_path, case, rule, label_dtype, empty):
    """Both dtypes (float64 under x64), int32 and int64 labels, hot labels, B=1, and B=0."""
    features, labels, centers, alpha = case
    if empty:
        features, labels = features[:0], labels[:0]
    labels = labels.astype(label_dtype)
    expected = centerkern.center_loss(features, labels, centers, alpha, rule=rule, backend="numpy")

    def objective(features, centers):
        return center_jax.center_loss(features, labels, centers, alpha, rule=rule)

    with jax.enable_x64(features.dtype == np.float64):
        (loss, moved), (grad_features, _) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
            features, centers)
        assert loss.dtype == features.dtype
    assert float(loss) == pytest.approx(expected.loss, rel=1e-5 if features.dtype == np.float32 else 1e-12, abs=1e-30)
    assert_matches(np.asarray(moved), expected.centers, features, centers)
    assert_matches(np.asarray(grad_features), expected.grad, features, centers)


def test_a_refused_registration_falls_back_to_the_host_callback(step_path, monkeypatch):
    """A jaxlib that refuses the custom call (say, no longer this API version) gets the host
    callback, and info says why, instead of every call failing."""
    features, labels, centers = _batch(14)
    expected = centerkern.center_loss(features, labels, centers, 0.5, rule="facenet", backend="numba")

    def refuse(*args, **kwargs):
        raise RuntimeError("Minimum supported API version is (0.9)")

    monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
    monkeypatch.setattr(center_jax, "_REGISTERED", {})
    center_jax._ffi_step.cache_clear()
    try:
        loss, moved = center_jax.center_loss(features, labels, centers, 0.5, rule="facenet", backend="numba")
        assert float(loss) == pytest.approx(expected.loss, rel=1e-6)
        assert_matches(np.asarray(moved), expected.centers, features, centers)
        if step_path == "ffi":
            assert center_jax.step_path().startswith("jax.pure_callback (XLA refused the custom call: RuntimeError")
    finally:
        center_jax._ffi_step.cache_clear()
        center_jax._ffi_state.pop("refused", None)


@pytest.mark.parametrize("rule", centerkern.RULES)
def test_forward_mode_and_higher_order_derivatives_match_jax_on_the_formulas(rule):
    """jvp, jacfwd, hessian and grad of grad, in features and centers: the kernel's gradient
    carries the rule's derivative (a zero-valued term), and no transform differentiates the
    kernel call itself."""
    features, labels, centers = _batch(31, batch=9, classes=5, width=3)

    def loss(features, centers):
        return center_jax.center_loss(features, labels, centers, 0.5, rule=rule)[0]

    def formula(features, centers):
        return _formula_loss(rule, features, labels, centers)

    def grad_of_grad(objective):
        inner = jax.grad(objective, argnums=(0, 1))
        return jax.grad(lambda f, c: sum(jnp.sum(g ** 3) for g in inner(f, c)), argnums=(0, 1))(features, centers)

    checks = {
        "jvp": lambda objective: jax.jvp(objective, (features, centers), (0.3 * features, 0.7 * centers))[1],
        "jacfwd": lambda objective: jax.jacfwd(objective, argnums=(0, 1))(features, centers),
        "hessian": lambda objective: jax.hessian(objective, argnums=(0, 1))(features, centers),
        "grad of grad": grad_of_grad,
        "grad of grad under jit": lambda objective: jax.jit(lambda: grad_of_grad(objective))(),
    }
    for name, check in checks.items():
        got, expected = jax.tree.leaves(check(loss)), jax.tree.leaves(check(formula))
        assert len(got) == len(expected), name
        for g, e in zip(got, expected):
            assert_matches(np.asarray(g), np.asarray(e), features, centers)


def test_backend_auto_is_the_default_and_runs_numba_as_for_host_arrays():
    import inspect

    assert inspect.signature(center_jax.center_loss).parameters["backend"].default == "auto"
    features, labels, centers = _batch(41)
    expected = centerkern.center_loss(features, labels, centers, 0.5, rule="wen", backend="numba")
    for backend in ("auto", "numba"):
        loss, moved = jax.jit(lambda f, l, c: center_jax.center_loss(f, l, c, 0.5, rule="wen", backend=backend))(
            features, labels, centers)
        assert float(loss) == pytest.approx(expected.loss, rel=1e-6)
        np.testing.assert_array_equal(np.asarray(moved), expected.centers)
    with pytest.raises(ValueError, match="unknown backend 'cuda'; valid choices are 'auto', 'numpy', 'numba'"):
        center_jax.center_loss(features, labels, centers, 0.5, backend="cuda")


@pytest.mark.parametrize("half", [jnp.float16, jnp.bfloat16])
def test_half_precision_features_are_computed_in_the_centers_dtype(half):
    """As the torch and TensorFlow adapters: float16/bfloat16 features meet float32 centers in
    float32, and their gradient comes back in their own dtype."""
    features, labels, centers = _batch(42)
    features = jnp.asarray(features).astype(half)
    upcast = np.asarray(features.astype(jnp.float32))
    expected = centerkern.center_loss(upcast, labels, centers, 0.5, rule="wen", backend="numpy")
    (loss, moved), grad = jax.value_and_grad(
        lambda f: center_jax.center_loss(f, labels, centers, 0.5, rule="wen"), has_aux=True)(features)
    assert loss.dtype == jnp.float32 and moved.dtype == jnp.float32 and grad.dtype == half
    assert float(loss) == pytest.approx(expected.loss, rel=1e-6)
    assert_matches(np.asarray(moved), expected.centers, upcast, centers)
    np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), expected.grad, rtol=1e-2, atol=1e-3)
