"""Center loss for TensorFlow and Keras 3: a ``tf.Variable`` of centers, eager or in ``tf.function``.

::

    center_loss = centerkern.tensorflow.CenterLoss(num_classes=10, alpha=0.95)   # facenet's rule
    with tf.GradientTape() as tape:
        embeddings, logits = model(images, training=True)
        loss = cross_entropy(labels, logits) + 0.01 * center_loss([embeddings, labels], training=True)

``center_loss(features, labels, centers, alpha, rule, training)`` is the function beneath the
layer: it returns the loss, differentiable with respect to ``features`` (and to ``centers``,
what rule ``pytorch`` trains, as sparse ``IndexedSlices`` like ``tf.gather``'s), and in
training mode moves the rows of ``centers`` that the batch touches with one
``scatter_update``, as facenet's ``tf.scatter_sub`` does. The kernels run as a
``tf.numpy_function`` on the batch's classes only (see ``centerkern._adapters.batch_classes``): a step reads
and writes B rows of the variable, never all K. For the same reason a ``tf.function`` holding it
cannot be compiled with XLA (``jit_compile=True``); the layer says so (``supports_jit = False``),
so that Keras's default ``jit_compile="auto"`` leaves XLA off for a model holding it.

Under ``tf.distribute.MirroredStrategy`` and ``MultiWorkerMirroredStrategy`` (``fit``, or
``strategy.run``) each replica's loss and gradient are its own, and the centers move by the whole
batch: every replica's per-class sums and counts are exchanged (``exchange``: the rows of the
classes each replica saw, gathered, or every class's, all-reduced), every replica computes the
same new rows from them and writes them into its own copy of the centers (see
``centerkern._adapters.batch_classes``), all in TensorFlow's own ops. Strategies this cannot
serve are refused by name.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from ._adapters.batch_classes import (EXCHANGES, TABLE_HEADER, bad_label_template, check_shapes_and_dtypes,
                                      exchange_for, host_step)
from ._adapters.settings import HOST_CHOICES, computed_dtype, host_backend
from ._core.rules import RULES, coefficients_of, moves_centers, rule_coefficients
from ._core.validation import ALPHA_NOT_FINITE, check_alpha, check_choice, check_labels

__all__ = ["CenterLoss", "center_loss"]


def center_loss(
    features, labels, centers, alpha, rule: str = "facenet", *, training: bool = True, backend: str = "auto",
    exchange: str = "auto",
):
    """One center-loss step in TensorFlow: the loss, and the centers moved in training mode.

    The rules are those of ``centerkern.center_loss``. Eager or inside ``tf.function`` (not
    compiled with XLA).

    Parameters
    ----------
    features : tf.Tensor
        Shape (B, D), float32 or float64 (float16/bfloat16 are promoted).
    labels : tf.Tensor
        An integer tensor holding B values in [0, K), any shape (flattened).
    centers : tf.Variable
        A ``tf.Variable`` (or Keras variable), shape (K, D): updated in place when
        ``training`` and the rule moves centers (``facenet``, ``wen``); any tensor otherwise.
    alpha : float or tf.Tensor
        A float or 0-d tensor; see ``centerkern.center_loss``.
    rule : {"facenet", "wen", "pytorch"}
        The update rule (see ``centerkern.center_loss``).
    training : bool
        False evaluates the loss and leaves the centers as they are.
    backend : {"auto", "numba", "numpy"}
        The host kernels the ``tf.numpy_function`` runs; ``auto`` is ``numba``, as
        ``centerkern.center_loss`` takes for host arrays.
    exchange : {"auto", "sparse", "dense"}
        Under ``tf.distribute`` with several replicas: how the replicas' per-class partials are
        exchanged. ``sparse`` gathers the rows of the classes each replica saw (R·B rows of
        2 + 2D words, whatever K); ``dense`` all-reduces every class's count and sums (K rows of
        1 + D); ``auto`` takes ``sparse`` while R·B < K / 4 (measured in
        ``benchmarks/data_parallel.py``; B unknown when traced counts as small). Either gives
        every replica the same bits. The replica step runs in TensorFlow's own ops, not the
        kernels (host calls on every replica at once wait for each other): the sparse
        exchange's sums are float64, the dense one's in the centers' dtype.

    Returns
    -------
    tf.Tensor
        0-d tensor of the centers' dtype: the loss, differentiable with respect to ``features``
        (and to ``centers``).

    Raises
    ------
    ValueError
        For an unknown ``rule`` or ``backend``, an ``alpha`` that is not finite, features or
        centers that are not 2-D, features and centers of different D, or a number of labels
        other than B.
    TypeError
        For an ``alpha`` that is not a real number, features of another dtype than the
        centers', labels that are not integers, or centers that are not a variable when
        ``training`` and the rule moves them.
    IndexError
        For a label outside [0, K), before anything moves. Inside a ``tf.function`` the kernel
        call finds it, and TensorFlow raises it as ``tf.errors.UnknownError`` carrying this
        message.
    tf.errors.InvalidArgumentError
        Under ``tf.distribute.MirroredStrategy`` with several replicas, for a bad label on any
        replica: every replica fails at once, before any moves its centers, with the
        ``IndexError``'s message of the first replica holding one, its number and the count
        over all replicas (``label 8 at position 5 is out of range: ... (in the batch of
        replica 1 of 2; bad labels in all: 1; no centers moved anywhere)``).
    RuntimeError
        Under a ``tf.distribute`` strategy other than ``MirroredStrategy``,
        ``MultiWorkerMirroredStrategy`` and ``OneDeviceStrategy``.

    Examples
    --------
    >>> import numpy as np
    >>> import tensorflow as tf
    >>> from centerkern.tensorflow import center_loss
    >>> centers = tf.Variable(tf.zeros((3, 2)))
    >>> features = tf.constant([[1.0, 2.0], [3.0, 4.0], [0.0, 2.0]])
    >>> labels = tf.constant([0, 0, 2])

    A training step of rule ``wen``: the gradient with respect to the features, and the
    variable updated in place. Class 0's two samples add up; class 1, absent from the batch,
    stays where it was.

    >>> with tf.GradientTape() as tape:
    ...     tape.watch(features)
    ...     loss = center_loss(features, labels, centers, 0.5, rule="wen")
    >>> loss.shape, loss.dtype
    (TensorShape([]), tf.float32)
    >>> round(float(loss), 4)
    5.6667
    >>> print(np.round(tape.gradient(loss, features).numpy(), 4))
    [[0.3333 0.6667]
     [1.     1.3333]
     [0.     0.6667]]
    >>> print(np.round(centers.numpy(), 4))
    [[0.6667 1.    ]
     [0.     0.    ]
     [0.     0.5   ]]

    ``training=False`` evaluates the loss only; in a ``tf.function`` too:

    >>> evaluate = tf.function(lambda f, y: center_loss(f, y, centers, 0.5, rule="wen", training=False))
    >>> round(float(evaluate(features, labels)), 4)
    2.9676
    >>> print(np.round(centers.numpy()[0], 4))
    [0.6667 1.    ]
    """
    rule = check_choice(rule, "rule", RULES)
    backend = host_backend(backend)
    exchange = check_choice(exchange, "exchange", EXCHANGES)
    if not tf.is_tensor(alpha):  # a tensor alpha (a schedule) is checked by the kernel call
        alpha = check_alpha(alpha)
    variable = _as_variable(centers)
    updates = training and moves_centers(rule)
    if updates and not isinstance(variable, tf.Variable):
        raise TypeError(
            f"centers must be a tf.Variable or a Keras variable to be updated in place, got {type(centers).__name__}"
        )
    features = tf.convert_to_tensor(features)
    computed = computed_dtype(features.dtype, variable.dtype)  # the centers' for mixed precision's features
    features = features if computed == features.dtype else tf.cast(features, computed)
    labels = tf.reshape(tf.convert_to_tensor(labels), [-1])
    check_shapes_and_dtypes(features, variable, labels.shape[0], labels.dtype.as_numpy_dtype)
    num_classes = int(variable.shape[0])
    replica = _replica_of_a_data_parallel_step()
    alpha = tf.cast(alpha, variable.dtype)
    if replica is not None and updates:  # the exchange checks the labels with the same collective
        return _data_parallel_step(features, labels, variable, alpha, rule, replica, exchange)
    if replica is not None:  # a replica must not raise alone while the others wait for it
        labels = _labels_checked_on_every_replica(labels, num_classes, replica)
    elif tf.executing_eagerly():  # SPEC's IndexError before the gather; in a graph, tf.gather's own error
        check_labels(labels.numpy(), int(features.shape[0]), num_classes, f"features of shape {tuple(features.shape)}")

    classes, index = tf.unique(labels, out_idx=tf.int64)
    # a bad label is reported by the kernel call, with its position and value (SPEC's message):
    # the gather before it must not fail first, with an index into the batch's classes
    in_range = tf.clip_by_value(tf.cast(classes, tf.int64), 0, max(num_classes - 1, 0))
    rows = tf.gather(variable, in_range)  # differentiable into the variable, sparsely
    loss, new_rows = _step(features, labels, index, rows, alpha, num_classes, rule, backend)
    if updates:
        variable.scatter_update(tf.IndexedSlices(new_rows, tf.cast(classes, tf.int64)))  # any integer labels
    return loss


# --------------------------------------------------------------------------- tf.distribute

# Strategies whose replicas run this step in a replica context with collectives, and whose
# mirrored variables take each replica's update into its own copy: the ones served. Others (TPUStrategy:
# no host callback on a TPU; ParameterServerStrategy: variables on other hosts, workers stepping
# asynchronously; CentralStorageStrategy) are refused by name.
_SERVED_STRATEGIES = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy,
                      tf.distribute.OneDeviceStrategy)


def _replica_of_a_data_parallel_step():
    """The replica context when this step runs in one replica of several (``strategy.run``,
    which ``fit`` uses), where the centers must move by every replica's batch; else None."""
    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, _SERVED_STRATEGIES):
        raise RuntimeError(
            f"centerkern.tensorflow cannot serve {type(strategy).__name__}: the center update needs every replica's "
            "per-class sums in one replica context, which centerkern runs under MirroredStrategy, "
            "MultiWorkerMirroredStrategy and OneDeviceStrategy (or no strategy)"
        )
    replica = tf.distribute.get_replica_context()
    if replica is None or strategy.num_replicas_in_sync == 1:  # cross-replica context: one batch, one update
        return None
    return replica


def _labels_checked_on_every_replica(labels, num_classes: int, replica):
    """``labels``, passed on once the replicas have shared what they found (one all-reduce of
    their ``_label_findings``): if any replica holds a bad label, every replica fails at this
    same point (``_failing_if_any_bad``)."""
    with tf.control_dependencies([_failing_if_any_bad_anywhere(_label_findings(labels, num_classes), num_classes,
                                                               replica)]):
        return tf.identity(labels)


def _failing_if_any_bad_anywhere(findings, num_classes: int, replica):
    """``_failing_if_any_bad`` on every replica's ``findings`` (``_label_findings``), shared by one
    all-reduce: each replica's in its own row of a zero table, which the all-reduce adds zeros
    to only, exactly."""
    replicas = replica.num_replicas_in_sync
    records = tf.scatter_nd([[replica.replica_id_in_sync_group]], findings[None], [replicas, 3])
    return _failing_if_any_bad(replica.all_reduce(tf.distribute.ReduceOp.SUM, records), num_classes, replicas)


def _label_findings(labels, num_classes: int):
    """This replica's (count, first position, its value) of bad labels, int64."""
    wide = tf.cast(labels, tf.int64)  # uint64 labels past the int64 range turn negative: still caught
    bad = (wide < 0) | (wide >= num_classes)
    # padded: an empty batch finds nothing at position 0
    first = tf.argmax(tf.concat([tf.cast(bad, tf.int32), [1]], 0), output_type=tf.int64)
    return tf.stack([tf.reduce_sum(tf.cast(bad, tf.int64)), first, tf.gather(tf.concat([wide, [0]], 0), first)])


def _failing_if_any_bad(records, num_classes: int, replicas: int):
    """An ``Assert`` that fails, on every replica alike, if any of ``records`` (one row of
    ``_label_findings`` per replica, in replica order) counts a bad label: with
    ``bad_label_message``'s words, naming the first replica's first bad label. In TensorFlow's
    own ops, as the rest of the replica step: no host call."""
    total = tf.reduce_sum(records[:, 0])
    owner = tf.argmax(tf.cast(records[:, 0] > 0, tf.int32), output_type=tf.int64)
    template = bad_label_template(num_classes=num_classes, shard_names=f" of {replicas}", unit="replica")
    message = tf.strings.format(template, [records[owner, 2], records[owner, 1], owner, total])
    return tf.debugging.Assert(tf.equal(total, 0), [message], summarize=1)


# --------------------------------------------------------------------------- the data-parallel step
#
# See ``centerkern._adapters.batch_classes``: each replica's own loss (differentiable), and the
# centers moved by every replica's batch, the same bits in every replica's copy, the partials
# exchanged sparse or dense (``exchange_for``). In TensorFlow's own ops, not in host calls: a
# ``tf.numpy_function`` on every replica at once measured 10 ms a step for 0.2 ms of work (the
# replicas' Python calls wait for the GIL and for each other's threads). The sums are float64,
# as the kernels keep them; TensorFlow's CPU ``unsorted_segment_sum`` adds the rows of each
# class in order, so that every replica adds the gathered partials in replica order.


def _data_parallel_step(features, labels, variable, alpha, rule: str, replica, exchange: str):
    """The replica's loss, and every replica's copy moved by the whole batch, the exchange
    ``exchange_for`` picks (a batch size unknown when traced, as in ``fit``, taken as small). The
    replicas share their label findings (with the sparse exchange's partials, or in an
    all-reduce of their own before the dense one): a bad label anywhere fails every replica
    before any copy moves. Labels are read in range all the same."""
    num_classes, width = (int(n) for n in variable.shape)
    findings = _label_findings(labels, num_classes)
    labels = tf.clip_by_value(tf.cast(labels, tf.int64), 0, max(num_classes - 1, 0))
    if tf.is_tensor(alpha):  # a schedule: the same on every replica, so every replica fails alike
        message = tf.strings.format(ALPHA_NOT_FINITE, [alpha])
        with tf.control_dependencies([tf.debugging.Assert(tf.math.is_finite(alpha), [message])]):
            alpha = tf.identity(alpha)
    batch_size = features.shape[0] if features.shape[0] is not None else 0
    if exchange_for(exchange, replica.num_replicas_in_sync, batch_size, num_classes) == "dense":
        return _dense_step(features, labels, findings, variable, alpha, rule, replica)
    return _sparse_step(features, labels, findings, variable, alpha, rule, replica)


def _coefficients(rule: str, alpha, width: int):
    """The rule's step and count weight (which need no B) as float64 tensors."""
    return coefficients_of(RULES.index(rule), tf.cast(alpha, tf.float64), 1, width)


def _dense_step(features, labels, findings, variable, alpha, rule: str, replica):
    """Every class's count and sums, K rows of 1 + D in the centers' dtype, added by one
    all-reduce once the replicas' findings have been (one all-reduce of their own, cheaper here
    than carrying them in the table); the rule applied in the centers' dtype. All of it as the
    framework's own dense code computes: where K is small, float64 passes over the batch or
    K x D would cost more than the exchange, whose sums are in the centers' dtype anyway."""
    num_classes, width = (int(n) for n in variable.shape)
    dtype = variable.dtype
    check = _failing_if_any_bad_anywhere(findings, num_classes, replica)
    difference, loss = _differences_and_loss(features, _sparse_read(variable, labels), rule, dtype)
    table = tf.math.unsorted_segment_sum(
        tf.concat([tf.ones_like(difference[:, :1]), tf.stop_gradient(difference)], 1), labels, num_classes)
    with tf.control_dependencies([check]):
        table = replica.all_reduce(tf.distribute.ReduceOp.SUM, table)
    coefficients = _coefficients(rule, alpha, width)
    scale = tf.cast(coefficients.step, dtype) / (1.0 + tf.cast(coefficients.count_weight, dtype) * table[:, :1])
    # a class no replica saw has sums of 0 and a finite scale: it moves by exactly 0
    variable.assign_add(scale * table[:, 1:])  # the replica's own copy
    return loss


def _sparse_step(features, labels, findings, variable, alpha, rule: str, replica):
    """The rows of the classes this replica saw (the class, its count and its float64 sums as
    int32 words: the collectives take no uint32 and no pairs) below a first row of its findings,
    gathered in replica order."""
    width = int(variable.shape[1])
    classes, index = tf.unique(labels, out_idx=tf.int64)
    difference, loss = _differences_and_loss(features, tf.gather(_sparse_read(variable, classes), index), rule)
    held = tf.shape(classes, out_type=tf.int64)[0]
    sums = tf.math.unsorted_segment_sum(tf.stop_gradient(difference), index, held)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(index, tf.int32), index, held)
    count, position, value = tf.unstack(findings)
    # the findings' row: -1 - position in the class column marks it, then the count and the value's two words
    findings_row = tf.concat([tf.cast(tf.stack([-1 - position, count]), tf.int32), tf.bitcast(value, tf.int32),
                              tf.zeros([TABLE_HEADER + 2 * width - 4], tf.int32)], 0)
    class_rows = tf.concat([tf.cast(classes, tf.int32)[:, None], counts[:, None],
                            tf.reshape(tf.bitcast(sums, tf.int32), [-1, 2 * width])], 1)
    tables = replica.all_gather(tf.concat([findings_row[None], class_rows], 0), axis=0)
    is_findings = tables[:, 0] < 0
    found = tf.boolean_mask(tables, is_findings)  # one row per replica, in replica order
    records = tf.stack([tf.cast(found[:, 1], tf.int64), tf.cast(-1 - found[:, 0], tf.int64),
                        tf.bitcast(found[:, 2:4], tf.int64)], 1)
    with tf.control_dependencies([_failing_if_any_bad(records, int(variable.shape[0]), replica.num_replicas_in_sync)]):
        tables = tf.boolean_mask(tables, tf.logical_not(is_findings))
    # on the host: a GPU's unsorted_segment_sum adds in no fixed order, which would let the
    # replicas' copies part by a rounding; the CPU's adds each class's rows in table order
    with tf.device("CPU:0"):
        touched, position = tf.unique(tf.cast(tables[:, 0], tf.int64), out_idx=tf.int64)
        touched_count = tf.shape(touched, out_type=tf.int64)[0]
        counts = tf.math.unsorted_segment_sum(tf.cast(tables[:, 1], tf.float64), position, touched_count)
        sums = tf.bitcast(tf.reshape(tables[:, TABLE_HEADER:], [-1, width, 2]), tf.float64)
        totals = tf.math.unsorted_segment_sum(sums, position, touched_count)
    coefficients = _coefficients(rule, alpha, width)
    scale = coefficients.step / (1.0 + coefficients.count_weight * counts)
    new_rows = tf.cast(tf.cast(_sparse_read(variable, touched), tf.float64) + scale[:, None] * totals, variable.dtype)
    # every replica writes the same rows into its own copy (a mirrored variable's update in a
    # replica context goes to the replica's copy); a merge_call updating every copy from one
    # context measured 10 ms a step more at K = 10^5, D = 128
    variable.scatter_update(tf.IndexedSlices(new_rows, touched))
    return loss


def _sparse_read(variable, indices):
    """``variable``'s rows ``indices``, read as rows (not differentiated: the centers of a rule
    that moves them). ``tf.gather`` on a mirrored variable reads the replica's whole copy, whose
    buffer the ``scatter_update`` of the same step must then copy before writing: K x D a step,
    measured 10 ms at K = 10^5, D = 128. Here the replica's copy is read through its handle."""
    return tf.raw_ops.ResourceGather(resource=variable.handle, indices=indices, dtype=variable.dtype)


def _differences_and_loss(features, centers_of_samples, rule: str, dtype=tf.float64):
    """``(d, loss)``: ``d_i = f_i - centers_of_samples[i]`` computed in ``dtype`` (float64: the
    kernels' arithmetic), and the replica's loss, differentiable in ``features`` to any order by
    TensorFlow itself. Every rule's loss scale is its value at B = 1 divided by B."""
    per_sample = rule_coefficients(rule, 0.0, 1, int(features.shape[1]))
    batch_size = tf.cast(tf.maximum(tf.shape(features)[0], 1), dtype)
    difference = tf.cast(features, dtype) - tf.cast(centers_of_samples, dtype)
    loss = tf.cast(per_sample.loss_scale / batch_size * tf.reduce_sum(tf.square(difference)), features.dtype)
    return difference, loss


def _as_variable(centers):
    """The tf.Variable behind ``centers``, or the centers as a tensor when there is none."""
    if isinstance(centers, tf.Variable):
        return centers
    value = getattr(centers, "value", None)  # a Keras 3 variable holds its tf.Variable here
    return value if isinstance(value, tf.Variable) else tf.convert_to_tensor(centers)


def _step(features, labels, index, rows, alpha, num_classes, rule, backend):
    """``(loss, new_rows)``, differentiable in ``features`` and ``rows``."""
    step_on_host = functools.partial(host_step, num_classes=num_classes, rule=rule, backend=backend)

    def callback(features, labels, index, rows, alpha):
        loss, grad, second = step_on_host(features, labels, index, rows, alpha)
        # the rule's d grad / d features, for the second-order term below (B is known here even
        # where the graph knows it only at run time)
        grad_scale = rule_coefficients(rule, 0.0, *np.shape(features)).grad_scale
        return loss, grad, second, np.asarray(grad_scale, dtype=grad.dtype)

    @tf.custom_gradient
    def step(features, rows):
        dtype = features.dtype
        loss, grad, second, grad_scale = tf.numpy_function(
            callback, [features, labels, index, rows, alpha], [dtype, dtype, dtype, dtype],
            stateful=False,
        )
        loss.set_shape(())
        grad.set_shape(features.shape)
        second.set_shape(rows.shape)
        grad_scale.set_shape(())

        @tf.custom_gradient
        def kernel_grad(features, rows):
            """The kernel's gradient as a function of the inputs, so that a nested tape can
            differentiate it (a gradient penalty): d grad_i / d f_i = grad_scale, and
            -grad_scale along the sample's row."""
            def second_order(upstream):
                return (grad_scale * upstream,
                        -grad_scale * tf.math.unsorted_segment_sum(upstream, index, tf.shape(rows)[0]))
            return tf.identity(grad), second_order

        def backward(grad_loss, grad_second):  # the rule's update: not differentiated
            per_sample = kernel_grad(features, rows)
            grad_rows = -grad_loss * tf.math.unsorted_segment_sum(per_sample, index, tf.shape(rows)[0])
            return grad_loss * per_sample, grad_rows

        return (loss, second), backward

    loss, second = step(features, rows)
    return loss, tf.stop_gradient(second)


@keras.saving.register_keras_serializable(package="centerkern")
class CenterLoss(keras.layers.Layer):
    """A Keras 3 layer (TensorFlow backend) holding the centers as a weight.

    ``layer([features, labels], training=...)`` returns the center loss of the batch. With
    ``training=True`` rules ``facenet`` and ``wen`` move the centers, which are a non-trainable
    weight; for ``pytorch`` they are trainable and the optimizer moves them. Following Keras,
    ``training=None`` outside ``fit`` means inference: the centers stay where they are.

    Under a mixed-precision policy (``mixed_float16``, ``mixed_bfloat16``) the layer computes in
    float32 and its centers stay float32 state. Keras's other backends are refused at
    construction (``centerkern.jax`` and ``centerkern.torch`` serve them).

    Parameters
    ----------
    num_classes : int
        K: the centers are a (num_classes, D) weight, ``layer.centers``, made when the layer is
        built (D from the features).
    alpha : float
        The rule's alpha (see ``centerkern.center_loss``).
    rule : {"facenet", "wen", "pytorch"}
        The update rule: the centers start at zero for ``facenet`` and ``wen``, and from Keras's
        ``random_normal`` for ``pytorch``.
    backend : {"auto", "numba", "numpy"}
        The host kernels each step runs; ``auto`` is ``numba`` (see ``center_loss``).
    exchange : {"auto", "sparse", "dense"}
        Under ``tf.distribute``: how the replicas' partials are exchanged (see ``center_loss``).
    **kwargs
        Passed on to ``keras.layers.Layer`` (``name``, ``dtype``, ...); ``dtype`` defaults to
        the dtype policy's variable dtype.

    Raises
    ------
    RuntimeError
        When Keras runs on another backend than TensorFlow (``KERAS_BACKEND``).
    ValueError
        For an unknown ``rule`` or ``backend``, or an ``alpha`` that is not finite.
    TypeError
        For an ``alpha`` that is not a real number.

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.tensorflow import CenterLoss
    >>> layer = CenterLoss(num_classes=3, alpha=0.5, rule="wen")
    >>> features = np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 2.0]], dtype="float32")
    >>> labels = np.array([0, 0, 2])
    >>> loss = layer([features, labels], training=True)
    >>> round(float(loss), 4)
    5.6667
    >>> tuple(layer.centers.shape), layer.centers.trainable
    ((3, 2), False)
    >>> print(np.round(layer.centers.numpy(), 4))
    [[0.6667 1.    ]
     [0.     0.    ]
     [0.     0.5   ]]

    Without ``training=True`` (outside ``fit``) the centers stay where they are:

    >>> round(float(layer([features, labels])), 4)
    2.9676
    >>> print(np.round(layer.centers.numpy()[0], 4))
    [0.6667 1.    ]
    """

    def __init__(self, num_classes: int, alpha: float = 0.5, rule: str = "facenet", backend: str = "auto",
                 exchange: str = "auto", **kwargs):
        backend_name = keras.backend.backend()
        if backend_name != "tensorflow":
            raise RuntimeError(
                f"centerkern.tensorflow.CenterLoss is a layer for Keras's TensorFlow backend, and Keras runs on "
                f"{backend_name!r} here (KERAS_BACKEND): use centerkern.jax.center_loss with JAX, "
                "centerkern.torch.CenterLoss with torch"
            )
        # the kernels compute in float32 or float64: under a mixed-precision policy the layer
        # computes in the policy's variable dtype (float32; low-precision features are cast up,
        # exactly), as Keras advises for a model's loss layers; a float64 policy stays float64
        kwargs.setdefault("dtype", keras.config.dtype_policy().variable_dtype)
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.alpha = check_alpha(alpha)
        self.rule = check_choice(rule, "rule", RULES)
        # kept as given, so that get_config gives back what the layer was made with
        self.backend = check_choice(backend, "backend", HOST_CHOICES)
        self.exchange = check_choice(exchange, "exchange", EXCHANGES)
        self.supports_jit = False  # a tf.numpy_function inside: Keras must not compile it with XLA

    def build(self, input_shape):
        features_shape = input_shape[0]
        trainable = not moves_centers(self.rule)
        self.centers = self.add_weight(
            name="centers",
            shape=(self.num_classes, int(features_shape[-1])),
            initializer="random_normal" if trainable else "zeros",
            trainable=trainable,
            # the centers are float32 state whatever the mixed-precision policy: read as they are
            # (not cast to the compute dtype), they stay the variable the update writes
            dtype=self.variable_dtype,
            autocast=False,
        )

    def call(self, inputs, training=None):
        """The center loss of the batch; Keras calls it as ``layer([features, labels], training=...)``.

        Parameters
        ----------
        inputs : list
            ``[features, labels]``: features of shape (B, D), and integer labels holding B
            values in [0, num_classes) (see ``center_loss``).
        training : bool or None, optional
            True moves the centers for rules ``facenet`` and ``wen``; False or None (inference,
            outside ``fit``) leaves them where they are.

        Returns
        -------
        tf.Tensor
            The loss, a 0-d tensor of the centers' dtype.

        Raises
        ------
        IndexError, TypeError, ValueError
            As ``center_loss`` for malformed input.

        Examples
        --------
        >>> import numpy as np
        >>> from centerkern.tensorflow import CenterLoss
        >>> layer = CenterLoss(num_classes=2, alpha=0.5, rule="facenet")
        >>> features = np.array([[1.0, 2.0], [3.0, 4.0]], dtype="float32")
        >>> loss = layer([features, np.array([1, 1])], training=True)
        >>> round(float(loss), 4)
        7.5
        >>> print(layer.centers.numpy()[1])  # (1 - alpha) times the sum of both offsets
        [2. 3.]
        """
        features, labels = inputs
        # Keras traces layers in a stateless scope to infer output shapes; there the weight is a
        # plain tensor, and nothing may be written
        writable = isinstance(self.centers.value, tf.Variable)
        return center_loss(
            features, labels, self.centers, self.alpha, self.rule, training=bool(training) and writable,
            backend=self.backend, exchange=self.exchange,
        )

    def compute_output_shape(self, input_shape):
        return ()

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "alpha": self.alpha,
                "rule": self.rule, "backend": self.backend, "exchange": self.exchange}
