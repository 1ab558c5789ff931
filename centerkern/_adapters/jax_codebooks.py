"""The codebook updates for JAX: ``centerkern.jax.codebook_step`` and ``centerkern.jax.ema_update``.

JAX's arrays are immutable, so these return the codebook's new state instead of writing it: the
kernels (``centerkern.codebooks``) run on the host, on copies of the state, as ``centerkern.jax``
runs its host functions (an XLA FFI target on the CPU, else ``jax.pure_callback``), usable
under ``jax.jit``. No gradient flows through them (the features are
``stop_gradient``-ed): a VQ layer passes gradients straight through its quantized rows itself,
``x + stop_gradient(quantized - x)``.

Inside ``shard_map`` or ``pmap``, ``axis_name=`` moves every shard's codebook by the whole
batch: each shard's per-code counts and sums (one K x (1 + D) table) are summed over the axis
with ``psum``, then applied (``ema_apply``), so the codebooks stay identical. The table is float64
where JAX runs with ``jax_enable_x64``, else float32 (JAX's own widest float).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import codebooks
from .._core import codebooks as checks


class CodebookState(NamedTuple):
    """An EMA codebook's state, a named tuple.

    Parameters
    ----------
    cluster_size : jax.Array, shape (K,)
        The EMA count of each code.
    embed_avg : jax.Array, shape (K, D)
        The EMA sum of each code's rows.
    embed : jax.Array, shape (K, D)
        The codes.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from centerkern.jax import CodebookState
    >>> state = CodebookState(jnp.zeros(4), jnp.zeros((4, 2)), jnp.ones((4, 2)))
    >>> state.embed.shape
    (4, 2)
    """

    cluster_size: Any
    embed_avg: Any
    embed: Any


class CodebookStep(NamedTuple):
    """What ``codebook_step`` returns, a named tuple.

    Parameters
    ----------
    quantized : jax.Array, shape (N, D)
        The rows' codes before the update.
    codes : jax.Array of int, shape (N,)
        Each row's nearest code.
    counts : jax.Array of int, shape (K,)
        The batch's rows per code (every shard's with ``axis_name``).
    state : CodebookState
        The new state.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import centerkern.jax
    >>> embed = jnp.array([[0.0], [5.0]])
    >>> result = centerkern.jax.codebook_step(jnp.array([[1.0], [4.0]]), jnp.ones(2), embed, embed, update=False)
    >>> result.codes.tolist(), result.quantized.tolist()
    ([0, 1], [[0.0], [5.0]])
    """

    quantized: Any
    codes: Any
    counts: Any
    state: CodebookState


# How a host function runs inside a traced step: ``centerkern.jax`` puts its ``_host_call`` here
# when it is imported (a layer above this module, which may not import it). It runs the function
# as an XLA FFI target on the device's own thread, where ``jax.pure_callback`` would put every
# shard's operands on device 0 and wait there: under ``shard_map`` on 4 host devices that
# deadlocked the first step, every time. ``host_call(key, function, shapes, *operands)``: ``key``
# names the function and must determine what it does (a target is registered once per key).
host_call = None


def _key(*settings) -> str:
    """A host function's key: its name and every setting it closes over, and JAX's x64 mode,
    which decides the types it returns."""
    return "_".join(map(str, (*settings, "x64" if jax.config.jax_enable_x64 else "x32")))


def _int_type():
    return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32


def _float_table_type():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _state_shapes(cluster_size, embed_avg, embed):
    return CodebookState(*(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (cluster_size, embed_avg, embed)))


def ema_update(features, codes, cluster_size, embed_avg, embed, *, decay: float = 0.99, eps: float = 1e-5,
               smoothing: str = "laplace", weights=None, backend: str = "auto"):
    """The EMA codebook update of a batch whose codes are known (``centerkern.codebooks.ema_update``).

    Parameters
    ----------
    features : jax.Array, shape (N, D), float32 or float64
    codes : jax.Array of int, shape (N,)
    cluster_size, embed_avg, embed : jax.Array
        The state, shapes (K,), (K, D), (K, D), the features' dtype.
    decay, eps, smoothing, weights, backend
        As for ``centerkern.codebooks.ema_update``.

    Returns
    -------
    counts : jax.Array of int, shape (K,)
        The batch's rows per code.
    state : CodebookState
        The new ``cluster_size``, ``embed_avg`` and ``embed``.

    Raises
    ------
    ValueError
        If ``decay``, ``eps`` or ``smoothing`` is out of its range (when traced); a bad code or
        shape fails the host call, as ``centerkern.codebooks`` says.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import centerkern.jax
    >>> embed = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    >>> counts, state = centerkern.jax.ema_update(jnp.array([[2.0, 2.0], [4.0, 4.0]]), jnp.array([1, 1]),
    ...                                           jnp.ones(2), embed, embed, decay=0.5, eps=0.0)
    >>> counts.tolist(), state.embed[1].tolist()
    ([0, 2], [2.3333332538604736, 2.3333332538604736])
    """
    checks.ema_settings(decay, eps, smoothing)  # a bad setting fails when traced, not in the callback
    options = dict(decay=decay, eps=eps, smoothing=smoothing, backend=backend)

    def host(rows, row_codes, row_weights, *state):
        state = [np.array(x) for x in state]
        counts = codebooks.ema_update(rows, row_codes, *state, weights=None if row_weights.size == 0 else row_weights,
                                      **options)
        return (counts.astype(_int_type()), *state)

    weights = jnp.zeros(0, jnp.float32) if weights is None else jnp.asarray(weights)
    shapes = (jax.ShapeDtypeStruct((embed.shape[0],), _int_type()), *_state_shapes(cluster_size, embed_avg, embed))
    counts, *state = host_call(_key("codebook_ema", decay, eps, smoothing, backend), host, shapes,
                               jax.lax.stop_gradient(features), codes, jax.lax.stop_gradient(weights),
                               cluster_size, embed_avg, embed)
    return counts, CodebookState(*state)


def codebook_step(features, cluster_size, embed_avg, embed, *, decay: float = 0.99, eps: float = 1e-5,
                  smoothing: str = "laplace", weights=None, update: bool = True, axis_name=None,
                  backend: str = "auto") -> CodebookStep:
    """A VQ layer's forward and its EMA codebook update (``centerkern.codebooks.quantize``).

    Parameters
    ----------
    features : jax.Array, shape (N, D), float32 or float64
    cluster_size, embed_avg, embed : jax.Array
        The codebook's state.
    decay, eps, smoothing, weights, backend
        As for ``centerkern.codebooks.ema_update``.
    update : bool, optional
        False: the forward only; the state comes back as it was.
    axis_name : hashable or tuple, optional
        Inside ``shard_map`` or ``pmap``: the axis (or axes) whose shards together make the batch.

    Returns
    -------
    CodebookStep
        ``quantized`` (N, D), ``codes`` (N,), ``counts`` (K,) and the new ``state``.

    Raises
    ------
    ValueError
        If ``decay``, ``eps`` or ``smoothing`` is out of its range (when traced); a bad code or
        shape fails the host call, as ``centerkern.codebooks`` says.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import centerkern.jax
    >>> embed = jax.random.normal(jax.random.key(0), (16, 4))
    >>> state = (jnp.zeros(16), jnp.zeros((16, 4)), embed)
    >>> step = jax.jit(lambda x, s: centerkern.jax.codebook_step(x, *s, decay=0.9))
    >>> result = step(jax.random.normal(jax.random.key(1), (32, 4)), state)
    >>> result.quantized.shape, int(result.counts.sum())
    ((32, 4), 32)
    """
    settings = checks.ema_settings(decay, eps, smoothing)
    features = jax.lax.stop_gradient(features)

    def assign(rows, codebook):
        codes, _ = codebooks.assign_codes(rows, codebook, backend=backend)
        return (codes.astype(_int_type()),)

    codes, = host_call(_key("codebook_assign", backend), assign,
                       (jax.ShapeDtypeStruct((features.shape[0],), _int_type()),), features, embed)
    quantized = jnp.take(embed, codes, axis=0)
    if not update:
        counts = jnp.zeros(embed.shape[0], _int_type()).at[codes].add(1)
        return CodebookStep(quantized, codes, counts, CodebookState(cluster_size, embed_avg, embed))
    if axis_name is None:
        counts, state = ema_update(features, codes, cluster_size, embed_avg, embed, decay=decay, eps=eps,
                                   smoothing=smoothing, weights=weights, backend=backend)
        return CodebookStep(quantized, codes, counts, state)
    return _data_parallel_step(features, codes, quantized, weights, cluster_size, embed_avg, embed, settings,
                               smoothing, axis_name, backend)


def _data_parallel_step(features, codes, quantized, weights, cluster_size, embed_avg, embed, settings, smoothing,
                        axis_name, backend):
    num_codes, width = embed.shape
    table_type = _float_table_type()

    def local_sums(rows, row_codes, row_weights):
        counts, sums = codebooks.class_sums(rows, row_codes, num_codes,
                                            weights=None if row_weights.size == 0 else row_weights, backend=backend)
        rows_per_code = np.bincount(row_codes, minlength=num_codes)
        return (np.concatenate([counts[:, None], sums], axis=1).astype(table_type),
                rows_per_code.astype(_int_type()))

    weights = jnp.zeros(0, jnp.float32) if weights is None else jnp.asarray(weights)
    table, counts = host_call(
        _key("codebook_sums", num_codes, backend), local_sums,
        (jax.ShapeDtypeStruct((num_codes, 1 + width), table_type), jax.ShapeDtypeStruct((num_codes,), _int_type())),
        features, codes, jax.lax.stop_gradient(weights))
    table, counts = jax.lax.psum((table, counts), axis_name)

    def apply(whole, *state):
        state = [np.array(x) for x in state]
        codebooks.ema_apply(whole[:, 0], whole[:, 1:], *state, decay=settings.decay, eps=settings.eps,
                            smoothing=smoothing, backend=backend)
        return tuple(state)

    state = host_call(_key("codebook_apply", settings.decay, settings.eps, smoothing, backend), apply,
                      tuple(_state_shapes(cluster_size, embed_avg, embed)), table, cluster_size, embed_avg, embed)
    return CodebookStep(quantized, codes, counts, CodebookState(*state))
