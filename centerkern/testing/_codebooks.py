"""The oracle for EMA codebook updates: a user's step on built cases, against ``ema_update``.

1. **The cases** (``codebook_cases``) are built, not drawn: a fresh codebook as EnCodec and
   vector-quantize-pytorch start one (counts zero, ``embed_avg`` a copy of ``embed``) under heavy
   duplicate codes, then an empty batch; one code only; a batch of one row on the last code, then
   dead codes; hot codes over several steps. Codes absent from a batch (dead codes) are in every
   case but the one of a single code.
2. **Each call on the reference's state.** Step ``t`` of a case hands the step the state the
   reference reached after step ``t - 1`` (fresh copies), so that one wrong step neither hides nor
   compounds the next, and every call is judged on its own.
3. **Ranks, honestly.** With ``shards`` > 1 every batch is split into that many contiguous shards,
   and the step runs once per rank, each in a thread of this process with its shard and its own
   copy of the state, and an ``all_reduce`` that sums an array over the ranks as
   ``torch.distributed.all_reduce`` does. Every rank must end where the reference does on the
   whole batch. This checks what a data-parallel step reduces and what it leaves out, not a
   communication backend.
4. **Mistakes are wrong steps** (``_codebook_mistakes``), run through the same harness on the same
   cases and ranks: a mistake reproduces a quantity if it gives the step's values on every call,
   and names the step if it reproduces all three.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, NamedTuple

import numpy as np

from ..codebooks import ema_update
from ._codebook_mistakes import CODEBOOK_MISTAKES, CodebookMistake
from ._comparison import difference, tolerance_of
from ._frameworks import to_framework, to_numpy

QUANTITIES = ("cluster_size", "embed_avg", "embed")
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# how long a rank waits at an all_reduce for the others before the round is called off
COLLECTIVE_TIMEOUT_S = 120.0


class CodebookCase(NamedTuple):
    """The inputs of one case: its steps' batches and the state before the first."""

    name: str
    batches: tuple  # ((features (N, D), codes (N,) int64), ...), one per step
    cluster_size: np.ndarray  # (K,)
    embed_avg: np.ndarray  # (K, D)
    embed: np.ndarray  # (K, D)

    @property
    def dtype(self) -> np.dtype:
        return self.embed.dtype

    @property
    def shape(self) -> str:
        return f"K={self.embed.shape[0]}, D={self.embed.shape[1]}"


def codebook_cases(dtype) -> list[CodebookCase]:
    """The built cases, in ``dtype`` (the same values for either dtype)."""
    rng = np.random.default_rng(20220928)
    dtype = np.dtype(dtype)

    def batch(embed, codes):  # rows near their codes, as a trained encoder gives them
        codes = np.asarray(codes, dtype=np.int64)
        rows = embed[codes] + 0.5 * rng.standard_normal((codes.size, embed.shape[1]))
        return rows.astype(dtype), codes

    def warm(num_codes, width, unused=()):  # a codebook some steps in, some codes never used
        embed = rng.standard_normal((num_codes, width))
        size = rng.uniform(0.5, 6.0, num_codes)
        size[list(unused)] = 0.0
        return size, embed * size[:, None] + 0.1 * rng.standard_normal(embed.shape), embed

    def case(name, batches, size, average, embed):
        return CodebookCase(name, tuple(batches), size.astype(dtype), average.astype(dtype), embed.astype(dtype))

    fresh = rng.standard_normal((5, 3))
    one = warm(1, 2)
    sparse = warm(6, 2, unused=(0, 3))
    hot = warm(8, 4, unused=(6,))
    hot_codes = [np.where(rng.random(48) < 0.75, 2, rng.integers(0, 7, 48)) for _ in range(3)]
    return [
        case("heavy duplicates on a fresh codebook, then an empty batch",
             [batch(fresh, [0, 0, 2, 0, 0, 3, 0, 2, 0, 0, 0]), batch(fresh, [0] * 7 + [3]), batch(fresh, [])],
             np.zeros(5), fresh.copy(), fresh.copy()),
        case("one code only", [batch(one[2], [0] * 6), batch(one[2], [0] * 3)], *one),
        case("one row on the last code, then dead codes",
             [batch(sparse[2], [5]), batch(sparse[2], [1, 1, 4, 4, 4, 1, 1, 4, 1])], *sparse),
        case("hot codes over three steps", [batch(hot[2], codes) for codes in hot_codes], *hot),
    ]


def reference_states(case: CodebookCase, settings: dict) -> list[tuple]:
    """The state before each step and after the last: ``ema_update`` with ``backend="numpy"``."""
    states = [(case.cluster_size, case.embed_avg, case.embed)]
    for features, codes in case.batches:
        state = tuple(array.copy() for array in states[-1])
        ema_update(features, codes, *state, **settings, backend="numpy")
        states.append(state)
    return states


# --------------------------------------------------------------------------- ranks


class _Collective:
    """The all-reduce of ``ranks`` threads: each round, every rank hands in an array (or says it
    has returned), and each gets the sum. A rank that returns while another reduces again is a
    step whose ranks disagree on the collective: the ones still reducing are told so."""

    def __init__(self, ranks: int, framework: str):
        self.barrier = threading.Barrier(ranks, timeout=COLLECTIVE_TIMEOUT_S)
        self.slots: list = [None] * ranks
        self.calls = [0] * ranks
        self.framework = framework

    def _round(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # every rank has read this round before the next one is written
        return values

    def finish(self, rank: int) -> None:
        self._round(rank, None)

    def all_reduce_of(self, rank: int) -> Callable:
        def all_reduce(value):
            """The sum of ``value`` over the ranks, written into it where it can be (as
            torch.distributed.all_reduce does) and returned."""
            mine = np.array(to_numpy(value))  # a copy: a rank writes the sum into its own array
            self.calls[rank] += 1
            values = self._round(rank, mine)
            returned = [r for r, other in enumerate(values) if other is None]
            if returned:
                raise AssertionError(
                    f"rank {rank} called all_reduce a {_nth(self.calls[rank])} time, while rank {returned[0]} had "
                    f"returned after {self.calls[rank] - 1}: all_reduce is a collective, every rank must call it alike")
            if any(np.shape(other) != np.shape(mine) for other in values):
                raise AssertionError(f"the ranks handed all_reduce arrays of shapes {[np.shape(v) for v in values]} "
                                     f"at its {_nth(self.calls[rank])} call: every rank must reduce the same shape")
            total = np.sum([np.asarray(other, dtype=np.float64) for other in values], axis=0).astype(mine.dtype)
            return _written_back(value, total, self.framework)
        return all_reduce


def _nth(number: int) -> str:
    return f"{number}{'th' if 10 <= number % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(number % 10, 'th')}"


def _written_back(value, total: np.ndarray, framework: str):
    if isinstance(value, np.ndarray):
        if value.flags.writeable:
            value[...] = total
            return value
        return total
    if hasattr(value, "copy_") and hasattr(value, "detach"):  # torch
        import torch

        with torch.no_grad():
            value.copy_(torch.from_numpy(total))
        return value
    if hasattr(value, "assign"):  # a TensorFlow Variable
        value.assign(total)
        return value
    return to_framework(framework, total)


def _call(step, framework, features, codes, state, all_reduce) -> tuple:
    arguments = [to_framework(framework, features), to_framework(framework, codes)]
    arguments += [to_framework(framework, array, variable=True) for array in state]
    outputs = step(*arguments) if all_reduce is None else step(*arguments, all_reduce=all_reduce)
    if not isinstance(outputs, (tuple, list)) or len(outputs) != 3:
        items = f" of {len(outputs)} items" if hasattr(outputs, "__len__") else ""
        raise AssertionError("the codebook step must return (cluster_size, embed_avg, embed), got "
                             f"{type(outputs).__name__}{items}")
    return tuple(np.array(to_numpy(output)) for output in outputs)


def run_on_ranks(step, framework: str, features, codes, state, shards: int) -> list[tuple]:
    """The step's outputs on one batch, one (cluster_size, embed_avg, embed) per rank, as NumPy."""
    if shards == 1:
        return [_call(step, framework, features, codes, state, None)]
    parts = list(zip(np.array_split(features, shards), np.array_split(codes, shards)))
    collective = _Collective(shards, framework)
    results: list = [None] * shards
    errors: list = [None] * shards

    def rank(number):
        try:
            results[number] = _call(step, framework, *parts[number], state, collective.all_reduce_of(number))
            collective.finish(number)
        except BaseException as error:  # handed to the caller's thread below
            errors[number] = error
            collective.barrier.abort()  # the others stop waiting for this rank

    threads = [threading.Thread(target=rank, args=(number,), daemon=True) for number in range(shards)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    raised = [error for error in errors if error is not None]
    if raised:  # the rank's own error, not the broken barrier of the ranks it left waiting
        raise next((e for e in raised if not isinstance(e, threading.BrokenBarrierError)), raised[0])
    return results


# --------------------------------------------------------------------------- comparison


def agrees(got, expected, tolerance: float, previous, floor: float) -> bool:
    """Equal to within ``tolerance``, each code's row relative to the larger of its own values
    (expected, and the state before the step) and ``floor`` (the scale of a row of the batch): a
    code never used holds values 10^5 times its neighbours', which must not loosen theirs. A
    value that is not finite must be the same (NaN where NaN, inf of the same sign)."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return False
    finite = np.isfinite(expected)
    if not np.array_equal(got[~finite], expected[~finite], equal_nan=True) or not np.all(np.isfinite(got[finite])):
        return False

    def rows(array):  # one row per code (the counts: one row)
        return np.asarray(array, dtype=np.float64).reshape(expected.shape[0] if expected.ndim > 1 else 1, -1)

    wanted, before = np.abs(rows(np.where(finite, expected, 0.0))), rows(previous)
    largest = np.maximum(wanted, np.where(np.isfinite(before), np.abs(before), 0.0)).max(axis=1, initial=0.0)
    bound = tolerance * (wanted + np.maximum(largest, floor)[:, None])
    return bool(np.all((np.abs(rows(got) - rows(np.where(finite, expected, 0.0))) <= bound)[rows(finite) > 0]))


@dataclass
class Call:
    """One call of the step: which case, step and rank, its inputs, what it returned."""

    label: str
    case: CodebookCase
    step: int  # from 0
    rank: int
    before: tuple  # the state handed to the step
    expected: tuple  # the reference's state after the step (the same on every rank)
    returned: tuple  # the step's outputs, as NumPy
    floor: float  # the scale of a row of the batch

    def comparable(self, quantity: str):
        """The returned value, or None where its shape hides its values."""
        index = QUANTITIES.index(quantity)
        value = self.returned[index]
        return value if value.shape == self.expected[index].shape else None

    def matches(self, quantity: str, target: tuple) -> bool:
        """Whether the step's ``quantity`` equals that of ``target`` (the reference, or a mistake)."""
        index, got = QUANTITIES.index(quantity), self.comparable(quantity)
        if got is None:
            return True  # not compared: says nothing either way
        floor = 1.0 if quantity == "cluster_size" else self.floor
        return agrees(got, target[index], tolerance_of(self.case.dtype, got), self.before[index], floor)

    def differing(self) -> list[str]:
        """The quantities compared that differ from the reference here."""
        return [q for q in QUANTITIES if self.comparable(q) is not None and not self.matches(q, self.expected)]

    def form(self) -> list[str]:
        problems = []
        for quantity, value, expected in zip(QUANTITIES, self.returned, self.expected):
            if value.shape != expected.shape:
                problems.append(f"{quantity} has shape {value.shape}, expected {expected.shape}")
            elif not np.issubdtype(value.dtype, np.floating) or value.dtype.itemsize < expected.dtype.itemsize:
                problems.append(f"{quantity} comes back as {value.dtype} for {expected.dtype} inputs")
        return problems


def observe(step, framework: str, cases: list[CodebookCase], settings: dict, shards: int) -> list[Call]:
    """Every call of the step on every case, step and rank, each on the reference's state."""
    calls = []
    for case in cases:
        states = reference_states(case, settings)
        for number, (features, codes) in enumerate(case.batches):
            try:
                outputs = run_on_ranks(step, framework, features, codes, states[number], shards)
            except BaseException as error:
                error.add_note(f"(raised by the codebook step on case {case.name!r}, {case.dtype}, step {number + 1})")
                raise
            floor = float(np.max(np.abs(features), initial=1.0))
            for rank, returned in enumerate(outputs):
                where = f"case {case.name!r} ({case.dtype}, {case.shape}), step {number + 1} of {len(case.batches)}"
                calls.append(Call(where + (f", rank {rank}" if shards > 1 else ""), case, number, rank,
                                  states[number], states[number + 1], returned, floor))
    return calls


# --------------------------------------------------------------------------- the diagnosis


@dataclass
class CodebookFinding:
    """What the report says of one quantity over every call."""

    quantity: str
    differs_on: list[str] = field(default_factory=list)  # the calls' labels
    how_much: dict[str, str] = field(default_factory=dict)
    not_compared_on: list[str] = field(default_factory=list)
    explained_by: list[CodebookMistake] = field(default_factory=list)  # reproduce it on every call

    @property
    def agrees(self) -> bool:
        return not self.differs_on and not self.not_compared_on


@dataclass
class CodebookDiagnosis:
    """The findings of ``check_codebook_update`` on a step that disagrees with the reference.

    ``CodebookMismatch`` carries one (``.diagnosis``). A call is one run of the step on one step
    of a case (on one rank, with ``shards`` > 1); the quantities are the three state arrays the
    step returns. ``verdict`` is the report's last line (the diagnosis), ``render()`` the
    report's findings in words.

    Parameters
    ----------
    settings : dict
        ``decay``, ``eps``, ``smoothing``, ``shards`` and ``framework``, as checked.
    cases : list
        The cases run: named tuples ``(name, batches, cluster_size, embed_avg, embed)``, the
        batches a tuple of ``(features, codes)`` per step, the arrays the state before the first.
    form : list of str
        The outputs' form problems (a shape, or a dtype coarser than the inputs'), each once.
    findings : list
        Per quantity (``cluster_size``, ``embed_avg``, ``embed``): ``differs_on`` (the calls
        where it differs, as labels), ``how_much`` (label to difference, in words),
        ``not_compared_on``, ``explained_by`` (the known mistakes that reproduce it on every
        call) and ``agrees``.
    named : list
        The known mistakes (of ``CODEBOOK_MISTAKES``) that reproduce every quantity on every call.

    See Also
    --------
    check_codebook_update : What makes it.

    Examples
    --------
    >>> import numpy as np
    >>> from centerkern.testing import CodebookMismatch, check_codebook_update
    >>> def step(features, codes, cluster_size, embed_avg, embed):   # no smoothing
    ...     counts = np.bincount(codes, minlength=embed.shape[0])
    ...     sums = np.zeros(embed.shape)
    ...     np.add.at(sums, codes, features)
    ...     cluster_size[:] = 0.99 * cluster_size + 0.01 * counts
    ...     embed_avg[:] = 0.99 * embed_avg + 0.01 * sums
    ...     with np.errstate(divide="ignore", invalid="ignore"):
    ...         embed[:] = embed_avg / cluster_size[:, None]
    ...     return cluster_size, embed_avg, embed
    >>> try:
    ...     check_codebook_update(step)
    ... except CodebookMismatch as error:
    ...     diagnosis = error.diagnosis
    >>> [finding.quantity for finding in diagnosis.findings if not finding.agrees]
    ['embed']
    >>> diagnosis.verdict.startswith("diagnosis: the smoothing is left out")
    True
    """

    settings: dict
    cases: list[CodebookCase]
    form: list[str]
    findings: list[CodebookFinding]
    named: list[CodebookMistake]

    @property
    def verdict(self) -> str:
        """The last line of the report: the mistake, several, none known, or the outputs' form."""
        differing = [f for f in self.findings if f.differs_on]
        if self.named:
            what = "; or ".join(m.explanation for m in self.named)
        elif differing and all(f.explained_by for f in differing):
            what = "several mistakes at once, each reproducing its quantity on every call: " + "; ".join(
                f"the {f.quantity}: {' or '.join(m.explanation for m in f.explained_by)}" for f in differing)
        elif differing:
            unexplained = " and the ".join(f.quantity for f in differing if not f.explained_by)
            what = (f"no known mistake of EMA codebook updates, alone or one per quantity, reproduces the "
                    f"{unexplained} on every call")
        else:
            return "diagnosis: the outputs do not have the form asked for (above); their values agree"
        return ("diagnosis: the outputs do not have the form asked for (above); the values compared: " if self.form
                else "diagnosis: ") + what

    def render(self) -> str:
        """The findings in words: form problems, each quantity over every call, the verdict."""
        lines = []
        if self.form:
            lines.append("what is wrong with the outputs' form:\n  - " + "\n  - ".join(self.form))
        dtypes = " and ".join(dict.fromkeys(str(case.dtype) for case in self.cases))
        calls = sum(len(case.batches) for case in self.cases) * self.settings["shards"]
        names = list(dict.fromkeys(case.name for case in self.cases))
        lines.append(f"what each quantity matches, over {calls} calls ({len(names)} cases, in {dtypes}: "
                     + "; ".join(names) + "):")
        for finding in self.findings:
            if finding.agrees:
                lines.append(f"  - {finding.quantity}: agrees with the reference on every call")
                continue
            parts = []
            if finding.differs_on:
                first = finding.differs_on[0]
                parts.append(f"differs on {len(finding.differs_on)} of {calls} calls, first on {first}: "
                             f"{finding.how_much[first]}")
            if finding.not_compared_on:
                parts.append(f"not compared on {len(finding.not_compared_on)} calls (its shape hides its values)")
            what = ("; or ".join(m.explanation for m in finding.explained_by) if finding.explained_by
                    else "no known mistake reproduces it on every call" if finding.differs_on else "")
            lines.append(f"  - {finding.quantity}: " + (f"{what} ({'; '.join(parts)})" if what else "; ".join(parts)))
        return "\n".join(lines + [self.verdict])


def diagnose(calls: list[Call], cases: list[CodebookCase], settings: dict) -> CodebookDiagnosis:
    """What each quantity does on every call, and the known mistakes that reproduce it there."""
    findings = [CodebookFinding(quantity) for quantity in QUANTITIES]
    for call in calls:
        for finding in findings:
            if call.comparable(finding.quantity) is None:
                finding.not_compared_on.append(call.label)
            elif not call.matches(finding.quantity, call.expected):
                index = QUANTITIES.index(finding.quantity)
                finding.differs_on.append(call.label)
                finding.how_much[call.label] = difference(call.returned[index], call.expected[index])
    form = list(dict.fromkeys(problem for call in calls for problem in call.form()))
    differing = [f for f in findings if f.differs_on]
    named = []
    if differing:
        ema = {name: settings[name] for name in ("decay", "eps", "smoothing")}
        for mistake in CODEBOOK_MISTAKES:
            if mistake.sharded_only and settings["shards"] == 1:
                continue
            reproduced = set()
            for variant in mistake.variants:
                predicted = observe(partial(variant, **ema), "numpy", cases, ema, settings["shards"])
                this = {q for q in QUANTITIES if all(call.matches(q, prediction.returned)
                                                     for call, prediction in zip(calls, predicted))}
                if this == set(QUANTITIES) and mistake not in named:
                    named.append(mistake)
                reproduced |= this
            for finding in differing:
                if finding.quantity in reproduced:
                    finding.explained_by.append(mistake)
        if named:  # each quantity told as the mistakes that explain the whole step
            for finding in differing:
                finding.explained_by = [m for m in finding.explained_by if m in named]
    return CodebookDiagnosis(dict(settings), list(cases), form, findings, named)


def report(calls: list[Call], diagnosis: CodebookDiagnosis) -> str:
    """The message of ``CodebookMismatch``: the first call that disagrees, then the diagnosis."""
    settings = diagnosis.settings
    first = next(call for call in calls if call.form() or call.differing())
    codes = first.case.batches[first.step][1]
    if settings["shards"] > 1:  # the rank's own shard
        codes = np.array_split(codes, settings["shards"])[first.rank]
    problems = [f"{q} differs: {difference(first.returned[i], first.expected[i])}"
                for i, q in enumerate(QUANTITIES) if q in first.differing()]
    shards = settings["shards"]
    return (f"codebook update disagrees with centerkern's reference (smoothing {settings['smoothing']!r}, decay "
            f"{settings['decay']:g}, eps {settings['eps']:g}, {shards} rank{'s' if shards > 1 else ''}):\n"
            f"first on {first.label} (B={codes.size}, codes={codes.tolist()}):\n  - "
            + "\n  - ".join(problems + first.form()) + "\n" + diagnosis.render())
