"""The implementations a user would otherwise write, and how they are timed beside centerkern's,
for ``python -m centerkern bench`` and ``demo``.

Each maker takes the inputs ``(features, labels, centers, updates)``, an operation
(``"step <rule>"`` or ``"scatter"``) and the rule's ``alpha``, and returns a ``Prepared`` implementation that runs it on
its own copy of the centers (so that repeated calls keep working on the same inputs), or raises
``Absent`` saying why it cannot run here.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np

from .._api import backends, center_loss, scatter_sub_update
from .._core.rules import rule_coefficients

ALPHA = 0.95  # facenet's training value: the alpha of every rule, unless a size says otherwise
FLOOR = "copy floor (same bytes)"
WITH_GRAD_OUT = "centerkern numba, grad_out="
TORCH = "torch eager"


class Absent(Exception):
    """An alternative that cannot run here; the message says why."""


@dataclass(frozen=True)
class Prepared:
    """One implementation, ready to time: ``run()`` does the operation once; ``centers()`` reads
    back the centers it keeps (None for the floor, which keeps none), to check it is correct."""

    run: Callable[[], object]
    centers: Callable[[], np.ndarray] | None


def _module(name: str):
    try:
        return importlib.import_module(name)
    except Exception as error:  # ImportError, or a framework that fails to load on this machine
        raise Absent(f"{name} not installed ({type(error).__name__})") from error


def _centerkern(backend: str):
    def make(features, labels, centers, updates, operation, alpha):
        own = centers.copy()
        if operation == "scatter":
            return Prepared(lambda: scatter_sub_update(own, labels, updates, out=own, backend=backend), lambda: own)
        rule = operation.split()[1]
        return Prepared(lambda: center_loss(features, labels, own, alpha, rule=rule, out=own, backend=backend),
                        lambda: own)
    return make


def _centerkern_grad_out(features, labels, centers, updates, operation, alpha):
    """The step as a training loop calls it: ``grad_out=`` a buffer it keeps, so that no B x D
    array is allocated (or page-faulted in) per call."""
    if operation == "scatter":
        raise Absent("the scatter writes no grad")
    own = centers.copy()
    grad = np.empty_like(features)
    rule = operation.split()[1]
    return Prepared(lambda: center_loss(features, labels, own, alpha, rule=rule, out=own, grad_out=grad,
                                        backend="numba"), lambda: own)


def _numpy_sorted(features, labels, centers, updates, operation, alpha):
    """A careful NumPy user: sort by label once, add each class's rows with ``np.add.reduceat``."""
    own = centers.copy()

    def segments():
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
        return order, sorted_labels[starts], starts, np.diff(np.r_[starts, labels.size])

    if operation == "scatter":
        def scatter():
            order, classes, starts, _ = segments()
            own[classes] -= np.add.reduceat(updates[order], starts, axis=0)
        return Prepared(scatter, lambda: own)
    rule = rule_coefficients(operation.split()[1], alpha, *features.shape)

    def step():
        order, classes, starts, counts = segments()
        differences = features - own[labels]
        loss = rule.loss_scale * float(np.sum(differences.astype(np.float64) ** 2))
        grad = rule.grad_scale * differences
        moved = (rule.step / (1.0 + rule.count_weight * counts))[:, None] * np.add.reduceat(differences[order], starts, axis=0)
        if rule.moves_centers:
            own[classes] += moved
            return loss, grad
        grad_centers = np.zeros_like(own)
        grad_centers[classes] = moved
        return loss, grad, grad_centers
    return Prepared(step, lambda: own)


def _numpy_groupies(features, labels, centers, updates, operation, alpha):
    npg = _module("numpy_groupies")
    own = centers.copy()
    classes = own.shape[0]
    if operation == "scatter":
        def scatter():
            own[...] -= npg.aggregate(labels, updates, func="sum", size=classes, axis=0)
        return Prepared(scatter, lambda: own)
    rule = rule_coefficients(operation.split()[1], alpha, *features.shape)

    def step():
        differences = features - own[labels]
        loss = rule.loss_scale * float(np.sum(differences.astype(np.float64) ** 2))
        grad = rule.grad_scale * differences
        sums = npg.aggregate(labels, differences, func="sum", size=classes, axis=0)
        if rule.count_weight:
            moved = (rule.step / (1.0 + rule.count_weight * np.bincount(labels, minlength=classes)))[:, None] * sums
        else:
            moved = rule.step * sums
        if rule.moves_centers:
            own[...] += moved
            return loss, grad
        return loss, grad, moved
    return Prepared(step, lambda: own)


def _torch_functions(torch, labels_tensor, classes, operation, features_shape, alpha):
    """The step (or scatter) as a torch user writes it; shared by eager and torch.compile."""
    if operation == "scatter":
        def scatter(centers, updates):
            centers.index_add_(0, labels_tensor, updates, alpha=-1.0)
        return scatter
    rule = rule_coefficients(operation.split()[1], alpha, *features_shape)

    def step(centers, features):
        differences = features - centers.index_select(0, labels_tensor)
        loss = rule.loss_scale * differences.square().sum()
        grad = rule.grad_scale * differences
        if rule.count_weight:
            per_class = rule.step / (1.0 + rule.count_weight * torch.bincount(labels_tensor, minlength=classes))
            moved = differences * per_class.index_select(0, labels_tensor).unsqueeze(1).to(differences.dtype)
        else:
            moved = differences * rule.step
        if rule.moves_centers:
            centers.index_add_(0, labels_tensor, moved)
            return loss, grad
        return loss, grad, torch.zeros_like(centers).index_add_(0, labels_tensor, moved)
    return step


def _torch(compiled: bool):
    def make(features, labels, centers, updates, operation, alpha):
        torch = _module("torch")
        own = torch.from_numpy(centers.copy())
        function = _torch_functions(torch, torch.from_numpy(labels), own.shape[0], operation, features.shape, alpha)
        if compiled:
            try:
                function = torch.compile(function)
                second = torch.from_numpy(features if operation != "scatter" else updates)
                function(own, second)  # compiles here, so a failure is reported as absent
            except Exception as error:
                raise Absent(f"torch.compile failed here ({type(error).__name__}: {str(error)[:80]})") from error
        second = torch.from_numpy(features if operation != "scatter" else updates)
        return Prepared(lambda: function(own, second), own.numpy)
    return make


def _jax(features, labels, centers, updates, operation, alpha):
    jax = _module("jax")
    jnp = jax.numpy
    state = {"centers": jnp.asarray(centers)}
    device_labels = jnp.asarray(labels)
    classes = centers.shape[0]
    if operation == "scatter":
        device_updates = jnp.asarray(updates)
        scatter = jax.jit(lambda c: c.at[device_labels].add(-device_updates), donate_argnums=0)

        def run_scatter():
            state["centers"] = scatter(state["centers"]).block_until_ready()
        return Prepared(run_scatter, lambda: np.asarray(state["centers"]))
    rule = rule_coefficients(operation.split()[1], alpha, *features.shape)
    device_features = jnp.asarray(features)

    def step(c):
        differences = device_features - c[device_labels]
        loss = rule.loss_scale * jnp.sum(differences * differences)
        grad = rule.grad_scale * differences
        if rule.count_weight:
            per_class = rule.step / (1.0 + rule.count_weight * jnp.bincount(device_labels, length=classes))
            moved = differences * per_class[device_labels][:, None].astype(differences.dtype)
        else:
            moved = differences * rule.step
        if rule.moves_centers:
            return loss, grad, c.at[device_labels].add(moved)
        return loss, grad, jnp.zeros_like(c).at[device_labels].add(moved)

    # centers that move are donated, so XLA may update them in place as the others do
    step = jax.jit(step, donate_argnums=0 if rule.moves_centers else ())

    def run_step():
        loss, grad, result = step(state["centers"])
        result.block_until_ready()
        if rule.moves_centers:
            state["centers"] = result
            return loss, grad
        return loss, grad, result
    return Prepared(run_step, lambda: np.asarray(state["centers"]))


def _tensorflow(features, labels, centers, updates, operation, alpha):
    tf = _module("tensorflow")
    variable = tf.Variable(centers)
    tf_labels = tf.constant(labels)
    classes = centers.shape[0]
    if operation == "scatter":
        tf_updates = tf.constant(updates)

        @tf.function
        def scatter():
            variable.scatter_sub(tf.IndexedSlices(tf_updates, tf_labels))
        return Prepared(scatter, variable.numpy)
    rule = rule_coefficients(operation.split()[1], alpha, *features.shape)
    tf_features = tf.constant(features)

    @tf.function
    def step():
        differences = tf_features - tf.gather(variable, tf_labels)
        loss = rule.loss_scale * tf.reduce_sum(differences * differences)
        grad = rule.grad_scale * differences
        if rule.count_weight:
            counts = tf.cast(tf.math.bincount(tf.cast(tf_labels, tf.int32), minlength=classes), tf.float32)
            per_class = rule.step / (1.0 + rule.count_weight * counts)
            moved = differences * tf.expand_dims(tf.gather(per_class, tf_labels), 1)
        else:
            moved = differences * rule.step
        if rule.moves_centers:
            variable.scatter_sub(tf.IndexedSlices(-moved, tf_labels))  # facenet's own primitive
            return loss, grad
        return loss, grad, tf.tensor_scatter_nd_add(tf.zeros_like(variable), tf.expand_dims(tf_labels, 1), moved)
    return Prepared(step, variable.numpy)


@numba.njit(cache=True)
def _serial_scatter_sub(centers, labels, updates):
    for i in range(labels.size):
        for k in range(centers.shape[1]):
            centers[labels[i], k] -= updates[i, k]


def _numba_serial(features, labels, centers, updates, operation, alpha):
    """What a first ``@njit`` attempt looks like: a serial loop over rows (scatter only)."""
    if operation != "scatter":
        raise Absent("written for the scatter only")
    own = centers.copy()
    return Prepared(lambda: _serial_scatter_sub(own, labels, updates), lambda: own)


def _numpy_subtract_at(features, labels, centers, updates, operation, alpha):
    if operation != "scatter":
        raise Absent("the step is centerkern's numpy backend (np.add.at inside)")
    own = centers.copy()
    return Prepared(lambda: np.subtract.at(own, labels, updates), lambda: own)


def floor_bytes(features, labels) -> int:
    """The bytes a step must move at least: read the features (the scatter: the updates), the
    labels and the touched center rows; write the grad (the scatter: nothing) and those rows.
    A copy of this many bytes reads and writes exactly this much, labels included twice."""
    touched = np.unique(labels).size
    return (features.size + touched * features.shape[1]) * features.itemsize + labels.nbytes


@numba.njit(parallel=True, cache=True)
def _parallel_copy(destination, source):
    chunk = 1 << 16
    for start in numba.prange((source.size + chunk - 1) // chunk):
        destination[start * chunk:(start + 1) * chunk] = source[start * chunk:(start + 1) * chunk]


def _floor(features, labels, centers, updates, operation, alpha):
    """The bandwidth floor: a parallel copy of ``floor_bytes``, on every core (torch's
    ``dst.copy_(src)``; Numba's threads where torch is missing)."""
    count = floor_bytes(features, labels)
    try:
        import torch
    except ImportError:
        source = np.ones(count, np.uint8)
        destination = np.zeros_like(source)
        return Prepared(lambda: _parallel_copy(destination, source), None)
    source = torch.ones(count, dtype=torch.uint8)
    destination = torch.zeros_like(source)
    return Prepared(lambda: destination.copy_(source), None)


def implementations(with_compile: bool) -> dict[str, Callable]:
    """Every maker by name: centerkern's backends, then the alternatives, then the floor."""
    makers = {f"centerkern {b}": _centerkern(b) for b in backends() if b != "numpy"}
    makers.update({
        WITH_GRAD_OUT: _centerkern_grad_out,
        "centerkern numpy (reference)": _centerkern("numpy"),
        "np.subtract.at": _numpy_subtract_at,
        "numpy sort + reduceat": _numpy_sorted,
        "numpy-groupies": _numpy_groupies,
        "numba serial loop": _numba_serial,
        TORCH: _torch(compiled=False),
        "torch.compile": _torch(compiled=True) if with_compile else None,
        "jax jit": _jax,
        "tensorflow tf.function": _tensorflow,
        FLOOR: _floor,
    })
    return {name: maker for name, maker in makers.items() if maker is not None}


def interleaved_medians(implementations: dict[str, Callable[[], object]], repeats: int,
                        rounds: int = 5) -> dict[str, float]:
    """Median seconds per call of each implementation, all measured in this process.

    Each round runs every implementation in turn, a block of calls each, so that a slow moment
    of the machine hits every row alike. Blocks rather than single calls, and one untimed call
    first: torch and Numba each keep a pool of OpenMP threads that spin for a while after a
    parallel region, and a call made right after the other library's pays for that.
    """
    samples: dict[str, list[float]] = {name: [] for name in implementations}
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for name, run in implementations.items():
            run()
            for _ in range(per_round):
                start = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}
