"""Center loss for JAX: ``centerkern.jax.center_loss``, differentiable and usable under ``jax.jit``.

::

    def objective(params, centers, images, labels):
        embeddings = model(params, images)
        loss, new_centers = centerkern.jax.center_loss(embeddings, labels, centers, 0.5, rule="wen")
        return loss, new_centers

    (loss, centers), grads = jax.value_and_grad(objective, has_aux=True)(params, centers, images, labels)

On the CPU the step is one XLA FFI custom call whose handler is machine code
(``centerkern._adapters.xla_native``, a Numba ``cfunc`` compiled when the step is traced): XLA
hands the kernels its buffers in place, no Python runs per step, and the new centers are
written over the centers' own buffer, so that a jitted step with the centers donated
(``donate_argnums``) copies nothing of size K x D and costs what the kernel call costs. With
``backend="numpy"`` the reference runs in a Python handler (``centerkern._adapters.xla_targets``).
Without ``jax.ffi``, or with JAX on a GPU (unless
``CENTERKERN_JAX_GPU_CUSTOM_CALL=1``), the kernels run as a ``jax.pure_callback`` on the batch's
classes only (see ``centerkern._adapters.batch_classes``): B rows cross to the host and back, never K.

The gradient with respect to ``features`` is the kernel's; the one with respect to ``centers``
(what rule ``pytorch`` trains) is ``-sum`` of the features' gradient per class. ``new_centers`` is
the rule's update, like an optimizer step: no gradient flows through it. The derivatives are
given as a JVP (``jax.custom_jvp``), so forward mode (``jvp``, ``jacfwd``) works as well as
reverse mode, and to any order (``hessian``, grad of grad), as in the torch and TensorFlow
adapters. Inside ``shard_map`` and ``pmap``, ``axis_name=`` makes the update the whole batch's
(see ``center_loss``). Costs are in ``benchmarks/jax_ffi.py`` and ``benchmarks/data_parallel.py``.

The codebook updates (``codebook_step``, ``ema_update``: VQ layers' EMA codebooks, see
``centerkern.codebooks``) live in ``centerkern._adapters.jax_codebooks``.

Longer than 600 lines because the one public function stands on three paths that must agree
(the custom call, the host callback, the data-parallel step with either exchange) and on one
derivative rule for all of them; each is short, and they share the typing of shards.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero, zero_from_primal

from ._adapters.batch_classes import (EXCHANGES, bad_label_template, check_labels_of_every_shard,
                                      check_shapes_and_dtypes, exchange_for, host_combine, host_partials, host_step,
                                      table_width)
from ._adapters import jax_codebooks
from ._adapters.jax_codebooks import CodebookState, CodebookStep, codebook_step, ema_update
from ._adapters.settings import computed_dtype, host_backend
from ._core.interop import FLOAT_DTYPES
from ._core.rules import RULES, coefficients_of, moves_centers, rule_coefficients
from ._core.validation import check_choice, check_labels

__all__ = ["GPU_CUSTOM_CALL_SWITCH", "CodebookState", "CodebookStep", "center_loss", "codebook_step", "ema_update",
           "ffi_path_available", "step_path"]


def center_loss(features, labels, centers, alpha, rule: str = "facenet", *, backend: str = "auto", axis_name=None,
                exchange: str = "auto"):
    """One center-loss step on JAX arrays: ``(loss, new_centers)``.

    The rules are those of ``centerkern.center_loss``. The function is pure: ``centers`` is
    not written, ``new_centers`` is a new array (or, in a jitted step with the centers donated,
    the centers' own buffer).

    Parameters
    ----------
    features : array_like
        A jax array, shape (B, D), float32 (or float64 with ``jax_enable_x64``); float16 and
        bfloat16 features are computed in the centers' dtype, and get their gradient back in
        their own.
    labels : array_like
        An integer jax array holding B values in [0, K), any shape (flattened).
    centers : array_like
        A jax array, shape (K, D), the dtype of ``features``.
    alpha : float or array_like
        A float or 0-d array; see ``centerkern.center_loss``.
    rule : {"facenet", "wen", "pytorch"}
        The update rule (see ``centerkern.center_loss``).
    backend : {"auto", "numba", "numpy"}
        The host kernels the step runs; ``auto`` is ``numba``, as ``centerkern.center_loss``
        takes for host arrays. The custom call on a GPU (``CENTERKERN_JAX_GPU_CUSTOM_CALL=1``)
        runs the cuda kernels whichever is named.
    axis_name : hashable or tuple, optional
        Data parallelism, inside ``jax.shard_map`` or ``jax.pmap`` with the centers replicated
        and the batch split over this mesh axis (or axes): the centers move as if one device had
        seen the whole batch, identical on every shard (each shard's per-class sums and counts
        are exchanged by one ``psum``, see ``exchange``, and every shard applies the rule to
        the same numbers). ``loss`` and its gradient stay the shard's own, as in ``jax.numpy``
        code. Rule
        ``pytorch`` moves no center, so it exchanges nothing: its ``grad_centers`` is what
        JAX's autodiff makes of any replicated parameter (summed over the shards under
        ``shard_map``, the device's own under ``pmap``, where the caller averages it).
    exchange : {"auto", "sparse", "dense"}
        With ``axis_name``: ``sparse`` exchanges the rows of the classes each shard saw (R·B
        rows of 2 + 2D words, float64 sums carried as their bits, whatever K); ``dense`` every
        class's count and sums (K rows of 1 + D, in the centers' dtype: what ``jax.numpy`` code
        would psum); ``auto`` takes ``sparse`` while R·B < K / 4, where it measured cheaper
        (``benchmarks/data_parallel.py``). Every shard gets the same bits either way. The dense
        exchange is the numba backend's on the CPU: elsewhere the sparse one serves.

    Returns
    -------
    loss : jax.Array
        0-d array of the dtype the step computes in (the features', or the centers' for
        half-precision features), differentiable with respect to features and centers.
    new_centers : jax.Array
        (K, D) array, the centers after the rule's update (unchanged for ``pytorch``).

    Raises
    ------
    ValueError
        For an unknown ``rule``, ``backend`` or ``exchange``, features or centers that are not
        2-D, features and centers of different D, or a number of labels other than B.
    TypeError
        For features and centers of different dtypes, or labels that are not integers.
    IndexError
        For a label outside [0, K) when the labels are concrete (outside ``jax.jit``), before
        anything runs.
    jax.errors.JaxRuntimeError
        When the computation runs, for what only the kernels can see: a traced label outside
        [0, K) (under ``jax.jit``, with the ``IndexError``'s message), an alpha that is not
        finite, or features neither float32 nor float64. Inside ``shard_map`` (and ``pmap``
        with ``axis_name``) a bad label fails every shard alike, nothing moved anywhere, each
        with the message of the first shard holding one: its number, the label's position and
        value, and the count over all shards.

    Notes
    -----
    Inside ``shard_map`` the results carry JAX's varying-manual-axes types: ``loss`` varies
    over the axes its inputs vary over, and so does ``new_centers`` unless ``axis_name`` made the
    update global, so that returning a per-shard value as replicated (``out_specs=P()``) is
    refused as it is for ``jax.numpy`` code.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from centerkern.jax import center_loss
    >>> features = jnp.array([[1.0, 2.0], [3.0, 4.0], [0.0, 2.0]])
    >>> labels = jnp.array([0, 0, 2])
    >>> centers = jnp.zeros((3, 2))

    One step of rule ``wen``. Class 0's two samples add up; class 1, absent from the batch,
    stays where it was.

    >>> loss, new_centers = center_loss(features, labels, centers, 0.5, rule="wen")
    >>> loss.shape, loss.dtype
    ((), dtype('float32'))
    >>> round(float(loss), 4)
    5.6667
    >>> print(np.round(np.asarray(new_centers), 4))
    [[0.6667 1.    ]
     [0.     0.    ]
     [0.     0.5   ]]

    A jitted training step: the gradient with respect to the features, the new centers as
    auxiliary output.

    >>> @jax.jit
    ... def step(features, labels, centers):
    ...     def objective(features):
    ...         return center_loss(features, labels, centers, 0.5, rule="wen")
    ...     (loss, new_centers), grad = jax.value_and_grad(objective, has_aux=True)(features)
    ...     return loss, grad, new_centers
    >>> loss, grad, centers = step(features, labels, centers)
    >>> print(np.round(np.asarray(grad), 4))
    [[0.3333 0.6667]
     [1.     1.3333]
     [0.     0.6667]]
    >>> print(np.round(np.asarray(centers), 4))
    [[0.6667 1.    ]
     [0.     0.    ]
     [0.     0.5   ]]

    Rule ``pytorch`` leaves the centers to an optimizer: ``jax.grad`` with respect to them is
    ``grad_centers``.

    >>> def pytorch_loss(centers):
    ...     return center_loss(features, labels, centers, 0.0, rule="pytorch")[0]
    >>> print(np.round(np.asarray(jax.jit(jax.grad(pytorch_loss))(jnp.zeros((3, 2)))), 4))
    [[-2.6667 -4.    ]
     [ 0.      0.    ]
     [ 0.     -1.3333]]
    """
    rule = check_choice(rule, "rule", RULES)
    backend = host_backend(backend)
    exchange = check_choice(exchange, "exchange", EXCHANGES)
    features, centers = jnp.asarray(features), jnp.asarray(centers)
    computed = computed_dtype(features.dtype, centers.dtype)  # the centers' for half-precision features
    features = features if computed == features.dtype else features.astype(computed)
    labels = jnp.ravel(jnp.asarray(labels))
    check_shapes_and_dtypes(features, centers, labels.shape[0], labels.dtype)

    num_classes, batch_size = centers.shape[0], features.shape[0]
    if not isinstance(labels, jax.core.Tracer):  # concrete labels: SPEC's IndexError right here
        check_labels(np.asarray(labels), batch_size, num_classes, f"features of shape {features.shape}")
    alpha = jnp.asarray(alpha, dtype=features.dtype)
    shard_axes = frozenset().union(*(_varying_axes(a) for a in (features, labels, centers, alpha)))
    if axis_name is not None:
        shard_axes |= frozenset(axis_name if isinstance(axis_name, tuple) else (axis_name,))
    if shard_axes:  # a shard must not raise alone while the others wait for it in a collective
        labels = _labels_checked_on_every_shard(labels, num_classes, shard_axes)
    if axis_name is not None and moves_centers(rule):
        return _global_step(features, labels, centers, alpha, rule, backend, axis_name, exchange)
    # inside shard_map: every operand varies as the most varying one does, so that the results,
    # typed alike, vary too, and the gradient of replicated centers is summed over the shards
    replicated_centers = centers
    features, labels, centers, alpha = _vary_alike(features, labels, centers, alpha)
    step = _ffi_step_or_none(rule, backend, features, centers, sharded=bool(shard_axes))
    if step is not None:  # the kernels read centers[labels] and write the new centers
        loss, new_centers = step(features, centers, labels, alpha)
        return loss, jax.lax.stop_gradient(new_centers)
    classes, index = _batch_classes(labels, batch_size, num_classes)  # size=B: static shapes under jit
    rows = centers.at[classes].get(mode="fill", fill_value=0)
    step = _callback_step(rule, backend, num_classes)  # the kernels read rows[index] and write new rows
    loss, new_rows = step(features, rows, index, labels, alpha)
    if moves_centers(rule):
        new_centers = centers.at[classes].set(new_rows, mode="drop")
    else:
        new_centers = replicated_centers  # as they came: no shard changed them
    return loss, jax.lax.stop_gradient(new_centers)


# --------------------------------------------------------------------------- manual axes


def _varying_axes(array) -> frozenset:
    """The mesh axes ``array`` varies over inside ``shard_map`` (empty elsewhere): JAX's type
    of it, spelled ``mat.varying`` in recent JAX and ``vma`` before."""
    aval = jax.typeof(array)
    manual = getattr(aval, "mat", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _as_varying(array, axes: frozenset):
    """``array`` typed as varying over ``axes`` too (a cast, no data moves)."""
    missing = tuple(sorted(axes - _varying_axes(array), key=str))
    if not missing:
        return array
    return jax.lax.pcast(array, missing, to="varying") if hasattr(jax.lax, "pcast") else jax.lax.pvary(array, missing)


def _vary_alike(*arrays):
    """``arrays`` all typed as varying over every axis any of them varies over."""
    axes = frozenset().union(*(_varying_axes(a) for a in arrays))
    return tuple(_as_varying(a, axes) for a in arrays) if axes else arrays


def _typed_like(results, operand):
    """A host call's results typed as varying as its operands (a custom call's and a callback's
    results are typed as replicated whatever they are computed from)."""
    axes = _varying_axes(operand)
    return tuple(_as_varying(r, axes) for r in results) if axes else tuple(results)


# --------------------------------------------------------------------------- data parallelism


def _axis_size(axis_name) -> int:
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if hasattr(jax.lax, "axis_size"):
        return int(np.prod([jax.lax.axis_size(name) for name in names]))
    return int(jax.lax.psum(1, axis_name))


def _global_step(features, labels, centers, alpha, rule, backend, axis_name, exchange):
    """The data-parallel step (``axis_name``): see ``centerkern._adapters.batch_classes``. The
    shards' per-class partials are added up by one psum, whose result JAX types as replicated, so
    the new centers are: sparse (each shard's table of the classes it saw, in its own block of a
    zero table) or dense (every class's sums and counts), whichever ``exchange_for`` picks."""
    num_classes, batch_size = centers.shape[0], features.shape[0]
    shards = _axis_size(axis_name)
    # machine code, as the one-device step (the Python host calls refuse other dtypes when run)
    native = backend == "numba" and _host_targets_serve() and np.dtype(features.dtype) in FLOAT_DTYPES
    if exchange_for(exchange, shards, batch_size, num_classes) == "dense" and native:
        return _dense_global_step(features, labels, centers, alpha, rule, axis_name)
    width = table_width(features.shape[1])
    classes, index = _batch_classes(labels, batch_size, num_classes)
    rows = centers.at[classes].get(mode="fill", fill_value=0)
    features, rows, index, classes, alpha = _vary_alike(features, rows, index, classes, alpha)
    loss, table = _partials_step(rule, backend, native)(features, rows, index, classes, alpha)

    blocks = jnp.zeros((shards, batch_size, width), jnp.uint32)
    tables = jax.lax.psum(blocks.at[jax.lax.axis_index(axis_name)].set(table), axis_name)
    tables = tables.reshape(shards * batch_size, width)
    touched, position = jnp.unique(tables[:, 0].astype(_wide_int()), return_inverse=True, size=shards * batch_size,
                                   fill_value=num_classes)
    # the new centers are the rule's update, not differentiated: the host call sees plain values
    centers, alpha = jax.lax.stop_gradient(centers), jax.lax.stop_gradient(alpha)
    rows = centers.at[touched].get(mode="fill", fill_value=0)
    shape = (jax.ShapeDtypeStruct(rows.shape, rows.dtype),)
    if native:
        new_rows, = _native_call("combine", shape, tables, position.reshape(-1), rows, alpha, _rule_index(rule))
    else:
        def combine(tables, position, rows, alpha):
            return (host_combine(tables, position, rows, alpha, rule=rule, backend=backend),)

        new_rows, = _host_call(f"combine_{rule}_{backend}", combine, shape, tables, position.reshape(-1), rows, alpha)
    return loss, centers.at[touched].set(new_rows, mode="drop")


def _dense_global_step(features, labels, centers, alpha, rule, axis_name):
    """The dense exchange: every shard's counts and sums over all K classes in one table
    (``xla_native``), added by one psum, and the rule applied to every class in XLA's own fused
    loop (in place with the centers donated): a class no shard saw has sums of 0 and a finite
    scale, so it moves by exactly 0."""
    loss, table = _dense_partials_step(rule)(*_vary_alike(features, centers, labels, alpha))
    table = jax.lax.psum(table, axis_name)  # typed as replicated: the new centers are, as the centers and alpha
    centers, alpha = jax.lax.stop_gradient(centers), jax.lax.stop_gradient(alpha)
    coefficients = coefficients_of(RULES.index(rule), alpha, 1, centers.shape[1])  # step, count weight
    scale = coefficients.step / (1 + coefficients.count_weight * table[:, :1])
    return loss, centers + (scale * table[:, 1:]).astype(centers.dtype)


def _alpha_template():
    """The message of an alpha that is not finite, for the data-parallel handlers (``xla_native``)."""
    from ._adapters import xla_native

    return jnp.asarray(xla_native.ALPHA_TEMPLATE)


def _rule_index(rule: str):
    return jnp.asarray(RULES.index(rule), jnp.int32)


def _native_call(name: str, shapes: tuple, *operands, aliases=None) -> tuple:
    """The data-parallel handler ``name`` of ``xla_native`` (compiled for the first operand's
    float type, or the third's where the first holds tables) on ``operands``, typed as ``shapes``."""
    from ._adapters import xla_native

    dtype = next(np.dtype(o.dtype) for o in operands if np.dtype(o.dtype) in FLOAT_DTYPES)
    target = _registered_compiled(f"centerkern_{name}_{dtype.name}",
                                  lambda: xla_native.data_parallel_handler(name, dtype))
    call = jax.ffi.ffi_call(target, shapes, vmap_method="sequential", input_output_aliases=aliases)
    return tuple(call(*operands))


def _wide_int():
    """The widest integer type JAX has in this mode, for class numbers."""
    return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32


def _batch_classes(labels, batch_size: int, num_classes: int):
    """``(classes, index)`` with ``labels == classes[index]``, ``classes`` padded to ``batch_size``
    with class K (out of range: reading it fills zeros, writing it is dropped). Found in the
    widest integer type: in a narrow label dtype (uint8, K = 256) K would wrap onto a real class."""
    classes, index = jnp.unique(labels.astype(_wide_int()), return_inverse=True, size=batch_size,
                                fill_value=num_classes)
    return classes, index.reshape(-1)


def _labels_checked_on_every_shard(labels, num_classes: int, axes: frozenset):
    """``labels``, passed on once the shards over ``axes`` have shared what they found (one
    psum): if any shard holds a bad label, every shard fails at this same point, each with the
    message of the first shard holding one (its number, the first bad label's position and
    value, and the count over all shards), whichever shard's error JAX surfaces."""
    axes = tuple(sorted(axes, key=str))
    wide = labels.astype(_wide_int())  # uint64 labels past the int range turn negative: still caught
    bad = (wide < 0) | (wide >= num_classes)
    first = jnp.argmax(jnp.append(bad, True))  # padded: an empty batch finds nothing at position 0
    finding = jnp.stack([jnp.sum(bad, dtype=wide.dtype), first.astype(wide.dtype), jnp.append(wide, 0)[first]])
    # each shard's finding in its own row of a zero table: the psum adds zeros only, exactly
    shard = jax.lax.axis_index(axes)
    records = jnp.zeros((_axis_size(axes), 3), wide.dtype).at[shard].set(finding)
    records = jax.lax.psum(_as_varying(records, frozenset(axes)), axes)
    shard_names = f" over mesh axes {axes}"
    if _host_targets_serve():  # machine code on XLA's threads: nothing of Python's can stall it
        from ._adapters import xla_native

        template = bad_label_template(num_classes=num_classes, shard_names=shard_names).format(*xla_native.MARKERS)
        target = _registered_compiled("centerkern_check_labels", xla_native.label_check)
        checked = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(labels.shape, labels.dtype), vmap_method="sequential",
                                   input_output_aliases={0: 0})(
            labels, records, jnp.asarray(xla_native.as_bytes(template)))
        return _typed_like((checked,), labels)[0]

    def check(labels, records):
        return (check_labels_of_every_shard(labels, records, num_classes=num_classes,
                                            shard_names=shard_names),)

    checked, = _host_call(f"check_labels_{num_classes}_{axes}", check,
                          (jax.ShapeDtypeStruct(labels.shape, labels.dtype),), labels, records)
    return _typed_like((checked,), labels)[0]


def _registered_compiled(name: str, compiled) -> str:
    """``name``, registered on first use as the FFI target of the handler ``compiled()`` gives
    (``xla_native``: machine code, compiled or loaded from the kernel cache), kept for the process."""
    if name not in _REGISTERED:
        handler = compiled()
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler.ctypes), platform="cpu")
        _REGISTERED[name] = [handler]
    return name


def _host_call(key: str, function, shapes: tuple, *operands) -> tuple:
    """``function(*operands)`` (NumPy arrays in, a tuple of arrays out, one per shape) run on
    the host, typed as ``shapes``. Where the custom call serves, the function is an XLA FFI
    target of its own (named by ``key``, which determines what it does), called on XLA's buffers
    on the device's own thread. Not ``jax.pure_callback`` there: with several host devices it
    puts its operands on CPU device 0 and waits for them, and device 0 may be waiting in a
    collective for the device whose callback waits (seen: two devices, a step that never
    finished). Elsewhere, or where XLA refuses the registration, ``jax.pure_callback``."""
    name = f"centerkern_host_{key}"
    if _host_targets_serve() and name not in _REGISTERED:
        from ._adapters.xla_targets import host_function

        try:
            _register(name, {"cpu": host_function(key, function)})
        except Exception as error:  # as _ffi_step_or_none: the callback serves, info says why
            _ffi_state.update(available=False, refused=f"{type(error).__name__}: {error}")
    if _host_targets_serve():
        return tuple(jax.ffi.ffi_call(name, shapes, vmap_method="sequential")(*operands))
    return tuple(jax.pure_callback(function, shapes, *operands, vmap_method="sequential"))


jax_codebooks.host_call = _host_call  # the codebook functions run their host work as this module does


def _host_targets_serve() -> bool:
    """Whether ``_host_call`` runs functions as FFI targets: they take host buffers, so JAX on a
    GPU (even with the custom-call switch on) keeps the callback."""
    return ffi_path_available() and jax.default_backend() == "cpu"


@functools.lru_cache(maxsize=None)
def _partials_step(rule: str, backend: str, native: bool):
    """``(features, rows, index, classes, alpha) -> (loss, table)`` of one shard: its loss, and
    its per-class partials for the exchange, in machine code (``native``) or a host call."""
    callback = functools.partial(host_partials, rule=rule, backend=backend)

    def run(features, rows, index, classes, alpha):
        shapes = (jax.ShapeDtypeStruct((), features.dtype), jax.ShapeDtypeStruct(features.shape, features.dtype),
                  jax.ShapeDtypeStruct((features.shape[0], table_width(features.shape[1])), jnp.uint32))
        if native:
            results = _native_call("partials", shapes, features, index, rows, classes, alpha, _rule_index(rule),
                                   _alpha_template())
        else:
            results = _host_call(f"partials_{rule}_{backend}", callback, shapes, features, classes, index, rows, alpha)
        return _typed_like(results, features)

    return _with_the_kernels_derivatives(run, rule)


@functools.lru_cache(maxsize=None)
def _dense_partials_step(rule: str):
    """``(features, centers, labels, alpha) -> (loss, table)`` of one shard: its loss, and its
    counts and sums over all K classes, (K, 1 + D), for the dense exchange."""

    def run(features, centers, labels, alpha):
        shapes = (jax.ShapeDtypeStruct((), features.dtype), jax.ShapeDtypeStruct(features.shape, features.dtype),
                  jax.ShapeDtypeStruct((centers.shape[0], 1 + centers.shape[1]), features.dtype))
        return _typed_like(_native_call("dense_partials", shapes, features, labels.astype(_wide_int()), centers, alpha,
                                        _rule_index(rule), _alpha_template()), features)

    return _with_the_kernels_derivatives(run, rule)


# --------------------------------------------------------------------------- derivatives


def _with_the_kernels_derivatives(run, rule: str):
    """``step(features, rows, index, *rest) -> (loss, result)`` from ``run(...) -> (loss, grad,
    result)``, a kernel call in which sample i reads ``rows[index[i]]``: differentiable to any
    order, in reverse and forward mode, with the kernel's gradient as its value.

    The derivative is a JVP: d loss = <g, d features> - <g, d rows[index]>, where ``g`` is the
    kernel's ``grad`` (no gradient of its own) plus a term whose value is zero and whose
    derivative is the rule's, d g_i = s (d f_i - d rows[index_i]) with s the rule's grad scale,
    so that gradients of gradients are exact (as the torch and TensorFlow adapters make them).
    The kernel call inside sees its inputs with their gradients stopped, so no transform has to
    differentiate it. ``result`` (new centers, new rows, the exchange's table) has no derivative:
    it is the rule's update, like an optimizer step."""

    @jax.custom_jvp
    def step(features, rows, index, *rest):
        loss, _, result = run(features, rows, index, *rest)
        return loss, result

    def derivative(primals, tangents):
        features, rows, index = primals[:3]
        loss, grad, result = run(*(jax.lax.stop_gradient(p) for p in primals))
        scale = rule_coefficients(rule, 0.0, *features.shape).grad_scale
        grad = jax.lax.stop_gradient(grad) + scale * (_zero_moving_with(features) - _zero_moving_with(rows, index))
        d_features, d_rows = tangents[:2]
        d_loss = jnp.zeros((), loss.dtype)
        if not isinstance(d_features, SymbolicZero):
            d_loss = d_loss + jnp.sum(grad * d_features)
        if not isinstance(d_rows, SymbolicZero):
            d_loss = d_loss - jnp.sum(grad * d_rows.at[index].get(mode="fill", fill_value=0))
        # result has no derivative: a symbolic zero, typed as JAX wants (float0 for integers)
        return (loss, result), (d_loss.astype(loss.dtype), zero_from_primal(result, symbolic_zeros=True))

    step.defjvp(derivative, symbolic_zeros=True)
    return step


@jax.custom_jvp
def _zero_moving_with(array, index=None):
    """Zeros shaped like ``array[index]`` (``array`` without ``index``) whose derivative is that
    of ``array[index]``. It reads nothing of ``array``: the custom call may be writing the
    centers in place (a read would make XLA copy them first), and an infinite value must not
    turn the zero into NaN."""
    shape = array.shape if index is None else (index.shape[0], *array.shape[1:])
    zeros = jnp.zeros(shape, array.dtype)
    return _as_varying(zeros, _varying_axes(array) | (frozenset() if index is None else _varying_axes(index)))


@_zero_moving_with.defjvp
def _zero_moving_with_derivative(primals, tangents):
    array, index = primals
    d_array = tangents[0]
    return _zero_moving_with(array, index), d_array if index is None else d_array.at[index].get(mode="fill", fill_value=0)


# --------------------------------------------------------------------------- XLA FFI


_ffi_state: dict = {}


#: The environment variable that, set to ``1``, runs the step on a GPU as the XLA FFI custom call
#: (the cuda kernels on XLA's stream, on XLA's device buffers). That custom call has not yet run
#: on a GPU: until it has, it is taken only when asked for, and JAX on a GPU otherwise keeps the
#: host callback.
GPU_CUSTOM_CALL_SWITCH = "CENTERKERN_JAX_GPU_CUSTOM_CALL"


def _gpu_custom_call_asked() -> bool:
    return os.environ.get(GPU_CUSTOM_CALL_SWITCH) == "1"


def ffi_path_available() -> bool:
    """Whether steps run as an XLA FFI custom call rather than a host callback: where jax.ffi
    exists and JAX computes on the CPU (or on a GPU, with ``CENTERKERN_JAX_GPU_CUSTOM_CALL=1``).

    The answer is found on the first call and kept for the process (it becomes False if XLA
    refuses to register the custom call).

    Returns
    -------
    bool
        True where ``center_loss`` runs the kernels as an XLA FFI custom call.

    Examples
    --------
    >>> import jax
    >>> from centerkern.jax import ffi_path_available
    >>> available = ffi_path_available()
    >>> isinstance(available, bool)
    True
    >>> available or jax.default_backend() != "cpu" or not hasattr(jax, "ffi")
    True
    """
    if "available" not in _ffi_state:
        platform = jax.default_backend()
        _ffi_state["available"] = (hasattr(jax, "ffi") and hasattr(jax.ffi, "ffi_call")
                                   and (platform == "cpu" or (platform == "gpu" and _gpu_custom_call_asked())))
    return _ffi_state["available"]


def step_path() -> str:
    """How ``center_loss`` runs the kernels here, for ``python -m centerkern info``.

    Returns
    -------
    str
        A sentence starting with ``XLA FFI custom call`` where ``ffi_path_available()`` is
        True, else with ``jax.pure_callback`` and the reason the custom call does not serve.

    Examples
    --------
    >>> from centerkern.jax import ffi_path_available, step_path
    >>> path = step_path()
    >>> path.startswith("XLA FFI custom call" if ffi_path_available() else "jax.pure_callback")
    True
    """
    if ffi_path_available():
        return f"XLA FFI custom call on the {jax.default_backend().upper()} (in place, no host callback)"
    if not hasattr(jax, "ffi"):
        return "jax.pure_callback (this jaxlib has no jax.ffi)"
    if "refused" in _ffi_state:
        return f"jax.pure_callback (XLA refused the custom call: {_ffi_state['refused']})"
    return (f"jax.pure_callback (JAX computes on {jax.default_backend()}; {GPU_CUSTOM_CALL_SWITCH}=1 takes "
            "the custom call there, not yet run on a GPU)")


# XLA holds pointers to the registered handlers: they must live as long as the process (kept
# apart from _ffi_state, which tests reset, and kept across a reload of this module)
_REGISTERED: dict = globals().get("_REGISTERED", {})


def _ffi_step_or_none(rule: str, backend: str, features, centers, sharded: bool):
    """The custom-call step, or None where the host callback must serve: jax.ffi missing, JAX on
    a GPU without the switch, or XLA refusing the registration (its reason kept for ``info``).
    Its target is registered here, for the ``features``' dtype and shape and the ``centers``'."""
    if not ffi_path_available():
        return None
    try:
        _ffi_target(rule, backend, features.dtype, *features.shape, centers.shape[0], sharded)
        return _ffi_step(rule, backend, sharded)
    except Exception as error:  # e.g. a jaxlib that no longer accepts this API version
        _ffi_state.update(available=False, refused=f"{type(error).__name__}: {error}")
        return None


def _ffi_target(rule: str, backend: str, dtype, batch_size: int, feature_size: int, num_classes: int,
                sharded: bool) -> tuple[str, tuple]:
    """``(name, settings)``: the FFI target of a step of ``rule`` on a batch of these sizes,
    registered with XLA on first use, and the operands it takes after the four of the step.

    On the CPU with the numba backend: the compiled handler (``xla_native``) for the dtype and
    the regime, taking the shape-derived ``settings`` and its messages' templates, compiled or
    loaded here, while the step is traced, so that XLA's threads run machine code only. With
    ``numpy`` (or features of a dtype the kernels do not take, which it refuses when the step
    runs): the reference in a Python handler (``xla_targets.host_center_loss``). On a GPU: the
    cuda kernels."""
    if backend == "numba" and jax.default_backend() == "cpu" and np.dtype(dtype) in FLOAT_DTYPES:
        from ._adapters import xla_native

        # a shard of shard_map is one of XLA's threads already, as the data-parallel handlers are:
        # the serial regime (measured: Numba's parallel regions on several of XLA's threads at
        # once let a script that ends during its first step hang at exit, 1 run in 12 on 4 devices)
        parallel = not sharded and xla_native.parallel_regime(batch_size, feature_size)
        regime = "parallel" if parallel else "serial"
        name = _registered_compiled(f"centerkern_center_loss_numba_{np.dtype(dtype).name}_{regime}",
                                    lambda: xla_native.handler(dtype, parallel))
        operands = (xla_native.settings(rule, batch_size, feature_size, parallel),
                    xla_native.bad_label_template(num_classes), xla_native.ALPHA_TEMPLATE)
        return name, tuple(jnp.asarray(operand) for operand in operands)
    name = f"centerkern_center_loss_{rule}_{backend}"
    if name not in _REGISTERED:
        from ._adapters import xla_targets

        calls = {"cpu": functools.partial(xla_targets.host_center_loss, rule=rule, backend=backend)}
        if jax.default_backend() == "gpu" and _gpu_custom_call_asked():
            calls["CUDA"] = functools.partial(xla_targets.device_center_loss, rule=rule)
        _register(name, calls)
    return name, ()


def _register(name: str, calls: dict) -> None:
    """Register ``calls`` (platform -> ``function(frame, arguments, results)``) as XLA FFI
    target ``name``, their handlers kept for as long as the process."""
    from ._adapters.xla_ffi import handler

    kept = []
    for platform, function in calls.items():
        kept.append(handler(function))
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(kept[-1]), platform=platform)
    _REGISTERED[name] = kept


@functools.lru_cache(maxsize=None)
def _ffi_step(rule: str, backend: str, sharded: bool):
    """``(features, centers, labels, alpha) -> (loss, new_centers)`` as one custom call, with its
    derivatives."""

    def run(features, centers, labels, alpha):
        target, settings = _ffi_target(rule, backend, features.dtype, *features.shape, centers.shape[0], sharded)
        # the widest integer type JAX has, the one the handlers take (a wider label wraps
        # negative, which is still out of range)
        operands = (features, labels.astype(_wide_int()), centers, alpha, *_typed_like(settings, features))
        shapes = (jax.ShapeDtypeStruct((), features.dtype), jax.ShapeDtypeStruct(features.shape, features.dtype))
        if not moves_centers(rule):  # pytorch: the centers stay as they are, and no buffer is written
            loss, grad = jax.ffi.ffi_call(target, shapes, vmap_method="sequential")(*operands)
            return (*_typed_like((loss, grad), features), centers)
        # the new centers are written over the centers' buffer: with the centers donated
        # (jax.jit(..., donate_argnums)) no K x D copy is made
        call = jax.ffi.ffi_call(target, (*shapes, jax.ShapeDtypeStruct(centers.shape, centers.dtype)),
                                vmap_method="sequential", input_output_aliases={2: 2})
        return _typed_like(call(*operands), features)

    return _with_the_kernels_derivatives(run, rule)


@functools.lru_cache(maxsize=None)
def _callback_step(rule: str, backend: str, num_classes: int):
    """``(features, rows, index, labels, alpha) -> (loss, new_rows)`` as a host call on the
    batch's rows, with its derivatives: where the single custom call on the centers does not
    serve (see ``_host_call``)."""
    callback = functools.partial(host_step, num_classes=num_classes, rule=rule, backend=backend)

    def run(features, rows, index, labels, alpha):
        shapes = (
            jax.ShapeDtypeStruct((), features.dtype),
            jax.ShapeDtypeStruct(features.shape, features.dtype),
            jax.ShapeDtypeStruct(rows.shape, rows.dtype),
        )
        results = _host_call(f"step_{rule}_{backend}_{num_classes}", callback, shapes, features, labels, index, rows,
                             alpha)
        return _typed_like(results, features)

    return _with_the_kernels_derivatives(run, rule)
