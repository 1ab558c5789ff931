"""The three published center-loss rules, reduced to four numbers and a flag.

Every rule in SPEC.md has the same shape. With ``d_i = features[i] - c_{y_i}`` (the centers as
they were before the call) and ``S_j = sum over i with y_i == j of d_i``:

    loss            = loss_scale * sum_i ||d_i||^2
    grad[i]         = grad_scale * d_i                 (grad_scale == 2 * loss_scale)
    written_row[j]  = c_j + step / (1 + count_weight * n_j) * S_j     if moves_centers
                    =       step / (1 + count_weight * n_j) * S_j     otherwise

``written_row`` goes into the centers for ``facenet`` and ``wen``, and into ``grad_centers`` for
``pytorch``, whose centers are left to the caller's optimizer. (The ``c_j`` term is dropped by a
branch, not multiplied by zero, so that an infinite center does not turn ``grad_centers`` to NaN.)
Writing the rules this way lets one kernel per backend serve all three; the ``numpy`` reference
uses the same numbers, and the tests check them against SPEC's worked example independently.
"""

from __future__ import annotations

from typing import NamedTuple

# public as centerkern.RULES (documented there)
RULES = ("facenet", "wen", "pytorch")


class RuleCoefficients(NamedTuple):
    """A rule's numbers for one batch, as every backend takes them: whole, built once per call.

    A named tuple of four Python floats and a bool, so that the numba and CUDA kernels receive it
    as one argument (Numba types it as a record of float64 and boolean fields)."""

    loss_scale: float
    grad_scale: float
    step: float
    count_weight: float
    moves_centers: bool  # False: the row update is grad_centers, the centers stay as they were


def rule_coefficients(rule: str, alpha: float, batch_size: int, feature_size: int) -> RuleCoefficients:
    """The coefficients of ``rule`` for a batch of ``batch_size`` rows of ``feature_size``."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; valid rules are {', '.join(map(repr, RULES))}")
    return coefficients_of(RULES.index(rule), float(alpha), batch_size, feature_size)


def coefficients_of(rule_index: int, alpha: float, batch_size: int, feature_size: int) -> RuleCoefficients:
    """``rule_coefficients`` of ``RULES[rule_index]``: plain arithmetic, which Numba compiles as
    it is (the XLA handler computes them from a traced alpha, ``centerkern._adapters.xla_native``)."""
    # An empty batch has no loss and moves nothing; any finite scale keeps the kernels simple.
    batch = max(batch_size, 1)
    elements = max(batch_size * feature_size, 1)
    if rule_index == 0:  # facenet
        # mean over B*D elements; alpha is the retention, so each sample moves its center by 1 - alpha
        return RuleCoefficients(1.0 / elements, 2.0 / elements, 1.0 - alpha, 0.0, True)
    if rule_index == 1:  # wen
        # paper Eq. 2-4: 1/(2B) loss, the step alpha divided by 1 + n_j
        return RuleCoefficients(0.5 / batch, 1.0 / batch, alpha, 1.0, True)
    # pytorch: trainable centers, grad_centers[j] = -(2/B) * S_j, the centers themselves unchanged
    return RuleCoefficients(1.0 / batch, 2.0 / batch, -2.0 / batch, 0.0, False)


#: ``scatter_sub_update`` in the kernels' terms: the rows (the updates) of each class are summed
#: and subtracted from its center (a step of -1, whatever the class's count), with no loss and no
#: grad. The kernels that run a rule's step run the scatter with these numbers.
SCATTER_SUB = RuleCoefficients(loss_scale=0.0, grad_scale=0.0, step=-1.0, count_weight=0.0, moves_centers=True)

_MOVES_CENTERS = {rule: rule_coefficients(rule, 0.0, 1, 1).moves_centers for rule in RULES}


def moves_centers(rule: str) -> bool:
    """Whether ``rule`` moves the centers itself (``facenet``, ``wen``) or leaves them to the
    caller's optimizer (``pytorch``): where the adapters keep them as state or as a parameter."""
    try:
        return _MOVES_CENTERS[rule]
    except (KeyError, TypeError):
        raise ValueError(f"unknown rule {rule!r}; valid rules are {', '.join(map(repr, RULES))}") from None
