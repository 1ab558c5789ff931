"""centerkern.tensorflow: the function on a tf.Variable (eager and tf.function) and the Keras 3
layer, against the numpy backend and TensorFlow's own gradients of the SPEC formulas."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import centerkern  # noqa: E402
import centerkern.tensorflow as center_tf  # noqa: E402
from centerkern._core.rules import rule_coefficients  # noqa: E402
from conftest import assert_matches  # noqa: E402


def _batch(seed, batch=30, classes=8, width=4, dtype=np.float32):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes - 1, batch)
    labels[: batch // 3] = 5
    return (rng.standard_normal((batch, width)).astype(dtype), labels,
            rng.standard_normal((classes, width)).astype(dtype))


def _formula_gradients(rule, features, labels, centers):
    features, centers = tf.constant(features), tf.Variable(centers)
    scale = rule_coefficients(rule, 0.5, features.shape[0], features.shape[1]).loss_scale
    with tf.GradientTape() as tape:
        tape.watch(features)
        loss = scale * tf.reduce_sum((features - tf.gather(centers, labels)) ** 2)
    return [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, [features, centers])]


@pytest.mark.parametrize("rule", centerkern.RULES)
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_function_on_a_variable(rule, graph, dtype):
    features, labels, start = _batch(0, dtype=dtype)
    variable = tf.Variable(start)
    expected = centerkern.center_loss(features, labels, start, 0.5, rule=rule, backend="numpy")
    reference = _formula_gradients(rule, features, labels, start)

    def step(features):
        with tf.GradientTape() as tape:
            tape.watch(features)
            loss = center_tf.center_loss(features, labels, variable, 0.5, rule, training=True)
        return loss, tape.gradient(loss, [features, variable])

    loss, (grad_features, grad_centers) = (tf.function(step) if graph else step)(tf.constant(features))
    assert loss.dtype == tf.as_dtype(dtype)
    assert float(loss) == pytest.approx(expected.loss, rel=1e-6)
    assert_matches(variable.numpy(), expected.centers, features, start)
    assert_matches(grad_features.numpy(), reference[0], features, start)
    assert isinstance(grad_centers, tf.IndexedSlices)  # sparse, as tf.gather's: B rows, not K
    assert_matches(tf.convert_to_tensor(grad_centers).numpy(), reference[1], features, start)


def test_facenet_training_steps_in_a_tf_function_and_inference_leaves_the_variable():
    features, labels, start = _batch(1)
    variable = tf.Variable(start)
    step = tf.function(lambda f, l, training: center_tf.center_loss(f, l, variable, 0.95, training=training))
    reference = start.copy()
    for seed in range(3):
        features, labels, _ = _batch(10 + seed)
        loss = step(features, labels, True)
        expected = centerkern.center_loss(features, labels, reference, 0.95, backend="numpy")
        reference = expected.centers
        assert float(loss) == pytest.approx(expected.loss, rel=1e-6)
        assert_matches(variable.numpy(), reference, features, start)
    before = variable.numpy().copy()
    loss = step(features, labels, False)
    np.testing.assert_array_equal(variable.numpy(), before)
    assert float(loss) == pytest.approx(centerkern.center_loss(features, labels, before, 0.95, backend="numpy").loss, rel=1e-6)


def test_keras_layer_in_a_custom_training_step_and_in_fit():
    features, labels, _ = _batch(2, batch=64)
    layer = center_tf.CenterLoss(8, alpha=0.5, rule="wen")
    assert layer([features, labels]).shape == ()  # builds; training=None is inference
    assert not layer.centers.trainable and np.count_nonzero(layer.centers.numpy()) == 0

    dense = keras.layers.Dense(4, kernel_initializer="ones")
    optimizer = keras.optimizers.SGD(0.01)

    @tf.function
    def train_step(inputs, labels):
        with tf.GradientTape() as tape:
            embeddings = dense(inputs)
            loss = layer([embeddings, labels], training=True)
        gradients = tape.gradient(loss, dense.trainable_variables)
        optimizer.apply_gradients(zip(gradients, dense.trainable_variables))
        return embeddings, loss

    centers = np.zeros((8, 4), np.float32)
    for _ in range(3):
        embeddings, loss = train_step(features, labels)
        expected = centerkern.center_loss(embeddings.numpy(), labels, centers, 0.5, rule="wen", backend="numpy")
        centers = expected.centers
        assert float(loss) == pytest.approx(expected.loss, rel=1e-5)
        assert_matches(layer.centers.numpy(), centers, embeddings.numpy())

    # model.fit with the loss added by a wrapping layer: the centers move during fit
    inputs, label_input = keras.Input((4,)), keras.Input((), dtype="int64")
    embedded = keras.layers.Dense(4)(inputs)

    class AddCenterLoss(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.center_loss = center_tf.CenterLoss(8, alpha=0.5, rule="wen")

        def call(self, embedded, labels, training=None):
            self.add_loss(self.center_loss([embedded, labels], training=training))
            return embedded

    adder = AddCenterLoss()
    outputs = adder(embedded, label_input)
    model = keras.Model([inputs, label_input], outputs)
    # asked for XLA, Keras declines it (the layer declares supports_jit = False) and fit runs
    with pytest.warns(UserWarning, match="doesn't support `jit_compile=True`"):
        model.compile(optimizer="sgd", loss=lambda y_true, y_pred: tf.reduce_mean(y_pred) * 0.0, jit_compile=True)
    assert model.jit_compile is False
    fit_layer = adder.center_loss
    history = model.fit([features, labels], np.zeros(64), epochs=2, batch_size=16, verbose=0)
    # the compiled loss is zero: what fit reports is the center loss that add_loss carried
    assert all(np.isfinite(loss) and loss > 0 for loss in history.history["loss"])
    assert np.count_nonzero(fit_layer.centers.numpy()[np.unique(labels)]) > 0


def test_keras_layer_config_round_trips_and_pytorch_rule_trains_its_centers():
    layer = center_tf.CenterLoss(8, alpha=0.25, rule="pytorch", name="centers_of_8")
    clone = center_tf.CenterLoss.from_config(layer.get_config())
    assert (clone.num_classes, clone.alpha, clone.rule, clone.name) == (8, 0.25, "pytorch", "centers_of_8")
    features, labels, _ = _batch(3)
    with tf.GradientTape() as tape:
        loss = layer([features, labels], training=True)
    assert layer.centers.trainable
    gradient = tape.gradient(loss, layer.trainable_variables)[0]
    reference = _formula_gradients("pytorch", features, labels, layer.centers.numpy())[1]
    assert_matches(tf.convert_to_tensor(gradient).numpy(), reference, features)


def test_backend_auto_is_the_default_kept_in_the_config_and_runs_numba():
    import inspect

    assert inspect.signature(center_tf.center_loss).parameters["backend"].default == "auto"
    layer = center_tf.CenterLoss(8, alpha=0.5, rule="wen")
    assert layer.backend == "auto" and layer.get_config()["backend"] == "auto"
    assert center_tf.CenterLoss.from_config(center_tf.CenterLoss(8, backend="numpy").get_config()).backend == "numpy"
    features, labels, start = _batch(12)
    expected = centerkern.center_loss(features, labels, start, 0.5, rule="wen", backend="numba")
    for backend in ("auto", "numba"):
        variable = tf.Variable(start)
        loss = tf.function(lambda f, y: center_tf.center_loss(f, y, variable, 0.5, rule="wen", backend=backend))(
            features, labels)
        assert float(loss) == pytest.approx(expected.loss, rel=1e-6)
        np.testing.assert_array_equal(variable.numpy(), expected.centers)
    with pytest.raises(ValueError, match="unknown backend 'cuda'; valid choices are 'auto', 'numpy', 'numba'"):
        center_tf.CenterLoss(8, backend="cuda")


@pytest.mark.parametrize("half", [tf.float16, tf.bfloat16])
def test_half_precision_features_are_computed_in_the_centers_dtype(half):
    features, labels, start = _batch(13)
    variable = tf.Variable(start)
    low = tf.cast(features, half)
    upcast = tf.cast(low, tf.float32).numpy()
    expected = centerkern.center_loss(upcast, labels, start, 0.5, rule="wen", backend="numpy")
    with tf.GradientTape() as tape:
        tape.watch(low)
        loss = center_tf.center_loss(low, labels, variable, 0.5, rule="wen")
    gradient = tape.gradient(loss, low)
    assert loss.dtype == tf.float32 and gradient.dtype == half
    assert float(loss) == pytest.approx(expected.loss, rel=1e-6)
    assert_matches(variable.numpy(), expected.centers, upcast, start)
    np.testing.assert_allclose(tf.cast(gradient, tf.float32).numpy(), expected.grad, rtol=1e-2, atol=1e-3)


def test_errors():
    features, labels, start = _batch(4)
    variable = tf.Variable(start)
    bad = labels.copy()
    bad[7] = 8
    with pytest.raises(IndexError, match="label 8 at position 7"):
        center_tf.center_loss(features, bad, variable, 0.5)
    with pytest.raises(TypeError, match="tf.Variable"):
        center_tf.center_loss(features, labels, tf.constant(start), 0.5)
    with pytest.raises(TypeError, match="dtypes must match"):
        center_tf.center_loss(features.astype(np.float64), labels, variable, 0.5)
    with pytest.raises(TypeError, match="integer"):
        center_tf.center_loss(features, labels.astype(np.float32), variable, 0.5)
    with pytest.raises(ValueError, match="29 labels for features of shape"):
        center_tf.center_loss(features, labels[:-1], variable, 0.5)
    with pytest.raises(ValueError, match="finite"):
        center_tf.center_loss(features, labels, variable, float("nan"))
    np.testing.assert_array_equal(variable.numpy(), start)


@keras.saving.register_keras_serializable(package="centerkern_tests")
class _AddCenterLoss(keras.layers.Layer):
    """The add_loss wrapper of the frameworks guide: the center loss added to the model's losses, the
    embeddings passed through."""

    def __init__(self, num_classes, rule="wen", **kwargs):
        kwargs.setdefault("dtype", "float32")  # a loss layer computes in float32 under mixed precision
        super().__init__(**kwargs)
        self.num_classes, self.rule = num_classes, rule
        self.center_loss = center_tf.CenterLoss(num_classes, alpha=0.5, rule=rule)

    def call(self, embedded, labels, training=None):
        self.add_loss(self.center_loss([embedded, labels], training=training))
        return embedded

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "rule": self.rule}


def _fit_under(policy, features, labels, path=None):
    """Two epochs of fit with the center loss added, under a dtype policy; the dense layer is
    fixed (learning rate 0) so that every policy sees the same embeddings up to its rounding."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        inputs, label_input = keras.Input((4,)), keras.Input((), dtype="int64")
        embedded = keras.layers.Dense(4, kernel_initializer=keras.initializers.Constant(0.3), dtype="float32")(inputs)
        adder = _AddCenterLoss(8)
        model = keras.Model([inputs, label_input], adder(embedded, label_input))
        model.compile(optimizer=keras.optimizers.SGD(0.0))  # the loss is add_loss's alone
        history = model.fit([features, labels], epochs=2, batch_size=16, shuffle=False, verbose=0)
        if path is not None:
            model.save(path)
            loaded = keras.models.load_model(path)
            loaded_layer = next(layer for layer in loaded.layers if isinstance(layer, _AddCenterLoss)).center_loss
            assert loaded_layer.centers.dtype == "float32"
            np.testing.assert_array_equal(loaded_layer.centers.numpy(), adder.center_loss.centers.numpy())
            loaded.fit([features, labels], epochs=1, batch_size=16, verbose=0)  # and trains on
        return history.history["loss"], adder.center_loss.centers.numpy(), adder.center_loss.centers.dtype
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_keras_fit_under_mixed_precision_matches_float32_training(policy, tmp_path):
    features, labels, _ = _batch(6, batch=64)
    losses, centers, _ = _fit_under("float32", features, labels)
    mixed_losses, mixed_centers, dtype = _fit_under(policy, features, labels, path=tmp_path / "model.keras")
    assert dtype == "float32"  # the centers stay float32 state, and move
    assert np.count_nonzero(mixed_centers[np.unique(labels)]) > 0
    np.testing.assert_allclose(mixed_losses, losses, rtol=1e-6)
    np.testing.assert_allclose(mixed_centers, centers, rtol=1e-6, atol=1e-7)


def test_second_order_gradients_match_tensorflows_own():
    """A gradient penalty through the center loss (a nested tape) gets its second-order part."""
    features, labels, start = _batch(7, dtype=np.float64)
    weight = tf.Variable(np.linspace(-1, 1, 16).reshape(4, 4))

    def penalised(loss_of):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                embedded = tf.constant(features) @ weight
                inner.watch(embedded)
                loss = loss_of(embedded)
            gradient = inner.gradient(loss, embedded)
            total = loss + tf.reduce_sum(gradient**2)
        return outer.gradient(total, weight).numpy()

    for rule in centerkern.RULES:
        variable = tf.Variable(start)
        scale = rule_coefficients(rule, 0.5, *features.shape).loss_scale
        ours = penalised(lambda f: center_tf.center_loss(f, labels, variable, 0.5, rule, training=False))
        theirs = penalised(lambda f: scale * tf.reduce_sum((f - tf.gather(tf.constant(start), labels)) ** 2))
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_a_bad_label_inside_a_tf_function_names_its_position_and_value():
    features, labels, start = _batch(8)
    variable = tf.Variable(start)
    bad = labels.copy()
    bad[5] = 8

    @tf.function
    def step(features, labels):
        return center_tf.center_loss(features, labels, variable, 0.5, training=True)

    with pytest.raises(tf.errors.OpError, match=r"label 8 at position 5 is out of range: labels must "
                                                             r"lie in \[0, 8\) for 8 classes"):
        step(tf.constant(features), tf.constant(bad))
    np.testing.assert_array_equal(variable.numpy(), start)


def test_another_keras_backend_is_refused_at_construction():
    import subprocess
    import sys

    code = "import centerkern.tensorflow as t; t.CenterLoss(4)"
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KERAS_BACKEND": "jax"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert ("RuntimeError: centerkern.tensorflow.CenterLoss is a layer for Keras's TensorFlow backend, and Keras "
            "runs on 'jax' here (KERAS_BACKEND): use centerkern.jax.center_loss with JAX, "
            "centerkern.torch.CenterLoss with torch") in run.stderr, run.stderr


def test_the_loss_as_a_model_output_with_an_identity_loss():
    """The guide's second pattern: the center loss is an output, compiled with an identity loss."""
    features, labels, _ = _batch(9, batch=64)
    inputs, label_input = keras.Input((4,)), keras.Input((), dtype="int64")
    embedded = keras.layers.Dense(4, kernel_initializer=keras.initializers.Constant(0.3))(inputs)
    layer = center_tf.CenterLoss(8, alpha=0.5, rule="wen")
    model = keras.Model([inputs, label_input], {"center": layer([embedded, label_input])})
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss={"center": lambda y_true, y_pred: y_pred})
    history = model.fit([features, labels], {"center": np.zeros(64)}, epochs=1, batch_size=64, verbose=0)
    embeddings = features @ np.full((4, 4), 0.3, np.float32)
    expected = centerkern.center_loss(embeddings, labels, np.zeros((8, 4), np.float32), 0.5, rule="wen",
                                      backend="numpy")
    assert history.history["loss"][0] == pytest.approx(expected.loss, rel=1e-5)
    assert_matches(layer.centers.numpy(), expected.centers, embeddings)


def test_an_infinite_feature_keeps_its_first_order_gradient():
    """The second-order term is zero in value; where a feature is infinite it stays zero (not
    inf - inf), so the gradient is the kernel's, as before."""
    features, labels, start = _batch(10, dtype=np.float64)
    features[3, 1] = np.inf
    variable = tf.Variable(start)
    expected = centerkern.center_loss(features, labels, start, 0.5, rule="wen", backend="numpy")
    tensor = tf.constant(features)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        loss = center_tf.center_loss(tensor, labels, variable, 0.5, "wen", training=False)
    np.testing.assert_array_equal(tape.gradient(loss, tensor).numpy(), expected.grad)


def test_narrow_integer_labels_train_and_a_float64_policy_stays_float64():
    features, labels, start = _batch(11)
    variable = tf.Variable(start)
    expected = centerkern.center_loss(features, labels, start, 0.5, rule="wen", backend="numpy")
    loss = center_tf.center_loss(features, labels.astype(np.uint8), variable, 0.5, "wen", training=True)
    assert float(loss) == pytest.approx(expected.loss, rel=1e-6)
    assert_matches(variable.numpy(), expected.centers, features, start)
    keras.mixed_precision.set_global_policy("float64")
    try:
        layer = center_tf.CenterLoss(8, alpha=0.5, rule="wen")
        layer([features.astype(np.float64), labels], training=True)
        assert layer.centers.dtype == "float64" and layer.compute_dtype == "float64"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _guide_block(marker: str) -> str:
    """The Python block of the frameworks guide (docs/frameworks.md) holding ``marker``, with
    its indentation removed."""
    import re
    import textwrap
    from pathlib import Path

    guide = (Path(__file__).parent.parent / "docs" / "frameworks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    return textwrap.dedent(next(block for block in blocks if marker in block))


def test_the_guide_keras_wrapper_saves_and_loads_with_its_centers(tmp_path):
    """The guide's AddCenterLoss, run as it is written there: fit, model.save, load_model, the
    same centers, and the loaded model trains on (a wrapper that passed dtype= itself failed to
    load: 'got multiple values for keyword argument dtype')."""
    code = _guide_block("class AddCenterLoss")
    inputs, label_input = keras.Input((4,)), keras.Input((), dtype="int64")
    namespace = {"keras": keras, "centerkern": centerkern,
                 "embeddings": keras.layers.Dense(4, kernel_initializer="identity")(inputs), "label_input": label_input}
    exec(compile(code, "docs/frameworks.md", "exec"), namespace)
    namespace["embeddings"] = namespace["AddCenterLoss"](8)(namespace["embeddings"], label_input)
    model = keras.Model([inputs, label_input], namespace["embeddings"])
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    features, labels, _ = _batch(9, batch=32)
    model.fit([features, labels], epochs=1, batch_size=16, verbose=0)
    wrapper = next(layer for layer in model.layers if type(layer).__name__ == "AddCenterLoss")
    assert np.any(wrapper.center_loss.centers.numpy() != 0)

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    loaded_wrapper = next(layer for layer in loaded.layers if type(layer).__name__ == "AddCenterLoss")
    assert loaded_wrapper.weight == 0.01 and loaded_wrapper.num_classes == 8
    np.testing.assert_array_equal(loaded_wrapper.center_loss.centers.numpy(), wrapper.center_loss.centers.numpy())
    np.testing.assert_array_equal(loaded.predict([features, labels], verbose=0), model.predict([features, labels], verbose=0))
    before = loaded_wrapper.center_loss.centers.numpy().copy()
    loaded.fit([features, labels], epochs=1, batch_size=16, verbose=0)
    assert np.any(loaded_wrapper.center_loss.centers.numpy() != before)
