"""The step on the batch's own classes: how the JAX and TensorFlow adapters stay independent of K.

Inside ``jax.jit`` or ``tf.function`` the kernels run as a host callback, and whatever the
callback takes and returns is copied across. Passing the (K, D) centers would copy them twice
per step, for a batch that touches at most B of the K rows. So the adapters rewrite the step in
the framework's own ops: ``classes, index = unique(labels)`` (``labels == classes[index]``),
``rows = centers[classes]``, the kernel step on ``(features, index, rows)``, and the new rows
scattered back into ``classes``. Each class is one row of ``rows``, so the scatter back has no
duplicates, and the kernels still see every duplicate label of the batch through ``index``.
"""

from __future__ import annotations

import numpy as np

from .. import _api
from .._core import validation
from .._core.errors import label_out_of_range
from .._core.rules import rule_coefficients


def check_shapes_and_dtypes(features, centers, label_count: int | None, label_dtype) -> None:
    """``center_loss``'s checks that need no values, on a framework's own arrays (inside
    ``jax.jit`` or ``tf.function`` the values are not there yet; the labels' range is checked
    where they are). ``label_count`` None: not known until run time."""
    validation.check_same_dtype(features=features, centers=centers)
    if len(features.shape) != 2 or len(centers.shape) != 2:
        raise ValueError(f"features and centers must be 2-D, got shapes {features.shape} and {centers.shape}")
    validation.check_feature_size(features, "features", centers)
    if label_count is not None and features.shape[0] is not None and label_count != features.shape[0]:
        raise ValueError(f"{label_count} labels for features of shape {tuple(features.shape)}")
    if np.dtype(label_dtype).kind not in "iu":
        raise TypeError(f"labels must have an integer dtype (not bool), got dtype {np.dtype(label_dtype)}")


def host_step(features, labels, index, rows, alpha, *, num_classes: int, rule: str, backend: str):
    """``(loss, grad, new_rows)`` as NumPy arrays: the kernel step on the batch's classes.

    ``labels`` are the caller's, checked here against ``num_classes`` so that a bad label gets
    SPEC's ``IndexError`` (the framework's own gather would clip or fill it silently)."""
    # the frameworks hand over their own array types; on the host these views share memory
    features, labels, index, rows, alpha = (np.asarray(x) for x in (features, labels, index, rows, alpha))
    validation.check_labels(labels, features.shape[0], num_classes, f"features of shape {features.shape}")
    result = _api.center_loss(features, index, rows, alpha, rule=rule, backend=backend)
    return np.asarray(result.loss, dtype=features.dtype), result.grad, result.centers


# --------------------------------------------------------------------------- data parallelism
#
# The data-parallel step of a framework that replicates the centers and splits the batch (JAX's
# shard_map and pmap, TensorFlow's tf.distribute), as ``centerkern.distributed`` does for
# torch: the loss and grad are the shard's own; the update of class j needs the global
# S_j = sum of d_i and n_j, which are sums of per-shard partials, since every shard reads the
# same centers. Each shard reduces its batch to one row per class it saw, (class, count,
# float64 sums), the shards exchange those rows, and every shard adds them up in shard order and
# applies the rule to identical numbers: every replica computes the same bits.
#
# The rows travel as one uint32 table, the float64 sums as their bits: a framework without
# float64 (JAX outside x64 mode) carries them exactly, and an exchange made as a sum of tables
# that are zero outside each shard's own block (an all-reduce, whose result every framework
# types as replicated) adds only zeros to them, which is exact for integers.
#
# Each shard's table has as many rows as its batch (a shard sees at most that many classes;
# the rest are padding, class K and count 0), in columns: 0 the class, 1 its count, then 2·D
# words: the float64 sums S_j.
#
# Labels are checked before any of this, by ``check_labels_of_every_shard``: a shard that raised
# alone would leave the others waiting for it in the exchange (XLA's CPU collectives abort the
# process after 40 s).

TABLE_HEADER = 2

# How the shards' partials are exchanged: the tables of the classes each shard saw (``sparse``,
# R·B rows of 2 + 2D words, whatever K), or every class's sums and counts (``dense``, K rows of
# D + 1 words), as JAX's and TensorFlow's ``exchange=`` name them; ``auto`` takes the sparse
# exchange while R·B < SPARSE_BELOW_FRACTION · K (measured: benchmarks/data_parallel.py).
EXCHANGES = ("auto", "sparse", "dense")
SPARSE_BELOW_FRACTION = 0.25


def exchange_for(exchange: str, replicas: int, batch_size: int, num_classes: int) -> str:
    """``sparse`` or ``dense``: ``exchange``, or for ``auto`` the cheaper one for ``replicas``
    shards of ``batch_size`` rows each and ``num_classes`` classes (known when the step is
    traced: every shard makes the same choice)."""
    if exchange != "auto":
        return exchange
    return "sparse" if replicas * batch_size < SPARSE_BELOW_FRACTION * num_classes else "dense"


def table_width(feature_size: int) -> int:
    """Columns of one shard's table of per-class partials, for features of ``feature_size``."""
    return TABLE_HEADER + 2 * feature_size


def host_partials(features, classes, index, rows, alpha, *, rule: str, backend: str):
    """``(loss, grad, table)`` of one shard, whose labels are checked: its own loss and gradient,
    and its partial sums and counts per class, one row per entry of ``classes`` (the batch's
    classes, ``labels == classes[index]``, padded or not), as ``table_width(D)`` uint32 columns."""
    features, classes, index, rows = (np.asarray(x) for x in (features, classes, index, rows))
    result = _api.center_loss(features, index, rows, float(alpha), rule=rule, backend=backend)
    # float64 sums, as the kernels keep them: -(rows[index] - features) summed per class
    sums = np.zeros((classes.size, features.shape[1]), np.float64)
    _api.scatter_sub_update(sums, index, rows[index].astype(np.float64) - features, out=sums, backend=backend)
    table = np.zeros((classes.size, table_width(features.shape[1])), np.uint32)
    table[:, 0] = classes
    table[:, 1] = np.bincount(index, minlength=classes.size)[:classes.size]
    table[:, TABLE_HEADER:] = sums.view(np.uint32)
    return np.asarray(result.loss, dtype=features.dtype), result.grad, table


def host_combine(tables, position, rows, alpha, *, rule: str, backend: str):
    """The new rows of the classes every shard touched: ``rows`` (those classes' centers as
    they were, one per entry of ``position``'s range) moved by the rule with the sums and counts
    of the shards' tables, stacked in ``tables``, added up in shard order. ``tables`` may come as
    int32, the same bits (a framework whose collectives take no uint32)."""
    tables = np.ascontiguousarray(tables).view(np.uint32)
    position, rows = np.asarray(position), np.asarray(rows)
    feature_size = rows.shape[1]
    partials = np.empty((tables.shape[0], 1 + feature_size), np.float64)
    partials[:, 0] = tables[:, 1]
    partials[:, 1:] = np.ascontiguousarray(tables[:, TABLE_HEADER:]).view(np.float64)
    totals = np.zeros((rows.shape[0], 1 + feature_size), np.float64)
    # the scatter kernel adds duplicates in table order, that is shard order: the same bits everywhere
    _api.scatter_sub_update(totals, position, -partials, out=totals, backend=backend, deterministic=True)
    coefficients = rule_coefficients(rule, float(alpha), 1, feature_size)  # step and count weight need no B
    scale = coefficients.step / (1.0 + coefficients.count_weight * totals[:, 0])
    return (rows.astype(np.float64) + scale[:, None] * totals[:, 1:]).astype(rows.dtype)


FINDING = ("count", "first position", "its value")


def bad_label_template(*, num_classes: int, shard_names: str, unit: str = "shard") -> str:
    """``bad_label_message``'s words, with ``{}`` for the first bad label's value, its position,
    the shard holding it and the count over all shards, in that order (for ``str.format`` and
    ``tf.strings.format``)."""
    found = label_out_of_range("{}", "{}", num_classes)  # type: ignore[arg-type] - placeholders
    names = shard_names.replace("{", "{{").replace("}", "}}")
    return f"{found} (in the batch of {unit} {{}}{names}; bad labels in all: {{}}; no centers moved anywhere)"


def bad_label_message(records, *, num_classes: int, shard_names: str) -> str | None:
    """The error of a data-parallel step in which some shard holds a bad label, the same on every
    shard: the first such shard's first bad label, and the count over all shards; None if no
    shard holds one. ``records``: one row per shard, its ``FINDING``; ``shard_names``: the words
    after a shard's number (``" over mesh axes ('batch',)"``). ``centerkern._adapters.xla_native``
    and TensorFlow's replica step write the same words (``bad_label_template``)."""
    records = np.asarray(records, dtype=np.int64).reshape(-1, len(FINDING))
    total = int(records[:, 0].sum())
    if not total:
        return None
    owner = int(np.flatnonzero(records[:, 0])[0])
    template = bad_label_template(num_classes=num_classes, shard_names=shard_names)
    return template.format(int(records[owner, 2]), int(records[owner, 1]), owner, total)


def check_labels_of_every_shard(labels, records, *, num_classes: int, shard_names: str):
    """``labels``, once every shard knows what all of them found (``records``, see
    ``bad_label_message``): if any shard holds a bad label, every shard raises here the same
    ``IndexError``, naming it, and nothing moves anywhere."""
    message = bad_label_message(records, num_classes=num_classes, shard_names=shard_names)
    if message is not None:
        raise IndexError(message)
    return np.asarray(labels)
