"""centerkern.testing: check somebody else's center-loss step against the reference.

    from . import check_center_loss

    def my_step(features, labels, centers, alpha):      # torch tensors in, torch tensors out
        diff = features - centers[labels]
        centers = centers.clone()
        centers[labels] += (1 - alpha) * diff             # the classic bug: duplicates dropped
        return (diff ** 2).mean(), centers

    check_center_loss(my_step, rule="facenet", framework="torch")
    # AssertionError: ... centers differ ... diagnosis: duplicate labels are not accumulated ...

``check_center_loss`` draws cases with hypothesis (heavy duplicates, one class, batches of one,
both dtypes, odd layouts), runs the step and centerkern's ``numpy`` reference, and on the first
disagreement raises a ``CenterLossMismatch`` (an ``AssertionError``) for the smallest failing case
it can find: which quantity differs and by how much, the outputs' form problems, what each
quantity does on that case and on larger cases chosen to tell the mistakes apart, in every dtype
the step is checked in (it "agrees" only if it agrees on all of them), the known mistakes
(``KNOWN_MISTAKES``) that reproduce it on every case, alone or two at once, and the diagnosis: one
mistake, several at once, or none known. It never names a mistake the step did not make, and never
calls a quantity right that differs somewhere. The cases are data (``Case``): ``save_cases`` and
``load_cases`` turn a report's evidence into a regression test.

``check_codebook_update`` does the same for a VQ-VAE layer's EMA codebook update,
``step(features, codes, cluster_size, embed_avg, embed) -> (cluster_size, embed_avg, embed)``,
against ``centerkern.codebooks.ema_update``: on built cases (heavy duplicate codes, dead codes,
one code, an empty batch, several steps), in each dtype, and with ``shards=`` on simulated
data-parallel ranks that sum through an ``all_reduce`` they are handed. It raises a
``CodebookMismatch`` (an ``AssertionError``) whose ``CodebookDiagnosis`` names the known mistake
of that family (``CODEBOOK_MISTAKES``) which reproduces the step on every call: duplicate codes
not accumulated, the smoothing left out, the EMA applied to the codes instead of the counts and
sums, the counts or sums not all-reduced across ranks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from .._core.codebooks import ema_settings
from .._core.rules import RULES
from .._core.validation import check_choice
from . import _mistakes
from . import _codebooks, _comparison, _frameworks
from ._cases import Case, as_case, load_cases, save_cases
from ._codebooks import CodebookDiagnosis
from ._comparison import checked_dtype, close_within, difference, smallest_normal, tolerance_of
from ._diagnosis import Diagnosis, comparable, diagnose, form_mistakes, third_name
from ._frameworks import to_framework as _to_framework, to_numpy as _to_numpy
from ._mistakes import Quantities, reference

__all__ = ["check_center_loss", "CenterLossMismatch", "Diagnosis", "Case", "save_cases", "load_cases", "close_within",
           "difference", "FRAMEWORKS", "BACKEND_TOLERANCE", "TOLERANCE", "KNOWN_MISTAKES",
           "check_codebook_update", "CodebookMismatch", "CodebookDiagnosis", "CODEBOOK_MISTAKES"]

#: The known mistakes of center-loss code that ``check_center_loss`` can name, as records whose
#: ``explanation`` is what the report says (unique, so that a test can look for it) and whose
#: ``predict`` gives what a step making the mistake returns. For example, a step that moves the
#: centers with ``centers[labels] += (1 - alpha) * diff`` is diagnosed as ``duplicate labels are
#: not accumulated (a fancy-index update such as centers[labels] += u keeps one update per
#: label; use index_add_ / scatter_add / np.add.at)``.
KNOWN_MISTAKES = _mistakes.KNOWN_MISTAKES

#: The known mistakes of EMA codebook updates that ``check_codebook_update`` can name, each a
#: record whose ``explanation`` is what the report says (unique) and whose ``variants`` are the
#: wrong steps that make it, in NumPy: duplicate codes not accumulated (``sums[codes] = x``), the
#: smoothing left out (``embed = embed_avg / cluster_size``), the EMA applied to the codes instead
#: of the counts and sums, and, with ``shards`` > 1, the counts, the sums or both not all-reduced
#: across ranks. A variant is called as a step, with ``decay``, ``eps`` and ``smoothing`` as
#: keywords.
CODEBOOK_MISTAKES = _codebooks.CODEBOOK_MISTAKES

#: The array frameworks ``check_center_loss`` and ``check_codebook_update`` can hand a step its
#: inputs in (their ``framework=``): ``numpy``, ``torch``, ``jax`` and ``tensorflow``.
FRAMEWORKS = _frameworks.FRAMEWORKS
#: The relative tolerance, per input dtype (``np.dtype(np.float32)``: 1e-5,
#: ``np.dtype(np.float64)``: 1e-12), to within which every centerkern backend equals the
#: ``numpy`` reference, whatever its summation order; for use with ``close_within``.
BACKEND_TOLERANCE = _comparison.BACKEND_TOLERANCE
#: The relative tolerance, per input dtype, to within which ``check_center_loss`` takes another
#: project's step to agree with the reference (its own summation order, float32 intermediates):
#: float16 2e-2, bfloat16 1e-1 (where ml_dtypes is installed), float32 1e-4, float64 1e-9.
TOLERANCE = _comparison.TOLERANCE


# --------------------------------------------------------------------------- the check


class CenterLossMismatch(AssertionError):
    """What ``check_center_loss`` raises: an ``AssertionError`` whose message is the report, and
    whose ``diagnosis`` (a ``Diagnosis``) holds the same findings as data: the cases run, the form
    problems, each quantity's differences per case, and the mistakes that explain them.

    Parameters
    ----------
    report : str
        The message: what differs on the smallest failing case, and the diagnosis.
    diagnosis : Diagnosis
        The same findings as data.

    Attributes
    ----------
    diagnosis : Diagnosis
        The findings, as data.

    See Also
    --------
    check_center_loss : What raises it.

    Examples
    --------
    A step whose fancy-index update drops duplicate labels:

    >>> import numpy as np
    >>> from centerkern.testing import CenterLossMismatch, check_center_loss
    >>> def step(features, labels, centers, alpha):
    ...     diff = features - centers[labels]
    ...     centers[labels] += (1 - alpha) * diff
    ...     return np.mean(diff ** 2), centers
    >>> try:
    ...     check_center_loss(step, max_examples=20, seed=0)
    ... except CenterLossMismatch as error:
    ...     mismatch = error
    >>> isinstance(mismatch, AssertionError)
    True
    >>> print(str(mismatch).splitlines()[0])
    center-loss step disagrees with centerkern's reference for rule 'facenet':
    >>> print(str(mismatch).splitlines()[-1])
    diagnosis (confirmed on the larger cases): duplicate labels are not accumulated ...
    >>> mismatch.diagnosis.rule
    'facenet'
    """

    def __init__(self, report: str, diagnosis: Diagnosis):
        super().__init__(report)
        self.diagnosis = diagnosis


class _Disagreement(AssertionError):
    """A case where the step disagrees with the reference. Raised bare while hypothesis shrinks;
    the report (with its diagnosis, which runs the step on further cases) is made once, for the
    smallest case."""

    def __init__(self, case, observed, problems, form=()):
        super().__init__("; ".join(problems))
        self.case, self.observed, self.problems, self.form = case, observed, problems, list(form)


def _run_step(step, rule, framework, case) -> Quantities:
    features, labels, centers, alpha = case
    outputs = step(_to_framework(framework, features), _to_framework(framework, labels),
                   _to_framework(framework, centers, variable=True), alpha)
    if not isinstance(outputs, (tuple, list)) or len(outputs) not in (2, 3):
        raise AssertionError(f"the step must return (loss, new_centers) or (loss, new_centers, "
                             f"{third_name(rule)}), got {type(outputs).__name__}")
    third = _to_numpy(outputs[2]) if len(outputs) == 3 else None
    return Quantities(_to_numpy(outputs[0]), _to_numpy(outputs[1]), third)


def _value_problems(observed: Quantities, rule: str, case) -> list[str]:
    """Which values differ from the reference, in words (empty when they agree). ``observed`` is
    as it can be compared (see ``_diagnosis.comparable``): a None is not compared. Values handed
    back in float32 are held to float32's tolerance; their dtype is a form problem, told apart."""
    features, labels, centers, alpha = case
    expected = reference(features, labels, centers, alpha, rule)

    def tolerance(value):
        return tolerance_of(features.dtype, value)

    problems = []
    if observed.loss is not None:
        loss = float(np.asarray(observed.loss).reshape(()))
        # A loss computed as |x|^2 + |c|^2 - 2 x.c (a distance matrix, as published code does) is
        # exact only to the scale of those terms: the rule's loss with every d_i at |x_i| + |c_i|.
        terms = reference(np.abs(features), labels, -np.abs(centers), alpha, rule).loss
        # (and no finer than the inputs' dtype's normal range: float16 steps 6e-8 apart below 6e-5)
        if not close_within(loss, expected.loss, tolerance(observed.loss), terms, smallest_normal(features.dtype)):
            problems.append(f"loss is {loss:.9g}, expected {expected.loss:.9g} (relative difference "
                            f"{abs(loss - expected.loss) / max(abs(expected.loss), 1e-300):.3g})")
    if observed.centers is not None and not close_within(observed.centers, expected.centers,
                                                         tolerance(observed.centers), features, centers):
        problems.append(f"centers differ: {difference(observed.centers, expected.centers)}")
    if observed.third is not None and not close_within(observed.third, expected.third, tolerance(observed.third),
                                                       features, centers):
        problems.append(f"{third_name(rule)} differs: {difference(observed.third, expected.third)}")
    return problems


def _check_case(step, rule, framework, case, on_form) -> None:
    """Raise ``_Disagreement`` where the step's values differ from the reference. A form problem
    whose values still agree goes to ``on_form`` instead, so that the search keeps looking (and
    shrinking) for a formula's mistake, which a form problem present at every size would hide."""
    features, _, centers, _ = case
    observed = _run_step(step, rule, framework, case)
    form = form_mistakes(observed, rule, features, centers)
    problems = _value_problems(comparable(observed, form), rule, case) + [problem.text for problem in form]
    if form:  # kept for the report, whichever case it ends up shrunk to (or raised, in the second search)
        on_form(_Disagreement(case, observed, problems, form))
    if len(problems) > len(form):
        raise _Disagreement(case, observed, problems, form)


def _report(disagreement: _Disagreement, step, rule, framework, dtypes, met=()) -> CenterLossMismatch:
    features, labels, centers, alpha = disagreement.case
    counts = np.bincount(labels, minlength=centers.shape[0])
    arrays = ""
    if features.size + centers.size <= 40:  # small enough to read: show the whole case
        arrays = (f"\nfeatures={np.array2string(features, separator=', ')}"
                  f"\ncenters={np.array2string(centers, separator=', ')}")
    diagnosis = diagnose(lambda case: _run_step(step, rule, framework, case), rule, disagreement.case,
                         disagreement.observed, dtypes)
    told = {problem.kind for _, problem in diagnosis.form}
    for other in met:  # form problems of cases the search met but did not shrink to (another dtype, say)
        (other_features, _, other_centers, _) = other.case
        where = f"B={other_features.shape[0]}, D={other_features.shape[1]}, dtype {other_features.dtype}"
        for problem in other.form:
            if problem.kind not in told:  # each kind once, with its first example
                told.add(problem.kind)
                diagnosis.form_elsewhere.append((where, problem.text))
    report = (
        f"center-loss step disagrees with centerkern's reference for rule {rule!r}:\n  - "
        + "\n  - ".join(disagreement.problems)
        + f"\ncase: B={features.shape[0]}, D={features.shape[1]}, K={centers.shape[0]}, dtype {features.dtype}, "
        f"alpha={alpha}, labels={labels.tolist()} (most repeated class: {int(counts.max(initial=0))} "
        f"sample{'' if int(counts.max(initial=0)) == 1 else 's'})"
        + arrays + "\n" + diagnosis.render()
    )
    return CenterLossMismatch(report, diagnosis)


def check_center_loss(step: Callable, rule: str = "facenet", *, framework: str = "numpy", max_examples: int = 200,
                      alpha: float | None = None, seed: int | None = None,
                      dtypes: tuple = (np.float32, np.float64), cases=()) -> None:
    """Check ``step`` against centerkern's reference on cases drawn by hypothesis.

    The cases (``centerkern.testing.strategies.center_loss_inputs``) have heavy duplicates, one
    class, batches of one, both dtypes and odd memory layouts. A step that agrees with the
    reference on every case passes: the function returns None. On the first disagreement it
    looks for the smallest failing case, runs the step on larger cases too, and raises a
    ``CenterLossMismatch`` that says what differs and which known mistake explains it.

    Parameters
    ----------
    step : callable ``(features, labels, centers, alpha) -> (loss, new_centers[, third])``
        Arrays of ``framework`` in and out. The optional third output is the grad with respect
        to the features for rules ``facenet`` and ``wen``, and ``grad_centers`` for ``pytorch``.
        The step may update ``centers`` in place (it receives a fresh copy every time; a
        TensorFlow step receives a ``tf.Variable``).
    rule : {"facenet", "wen", "pytorch"}
        The published formula the step claims to implement (see ``centerkern.center_loss``).
    framework : {"numpy", "torch", "jax", "tensorflow"}
        The arrays the step takes and returns (see ``FRAMEWORKS``): the inputs are handed to it
        as arrays of this framework, and its results are read back from them.
    max_examples : int
        How many cases hypothesis draws (0: none, only ``cases``).
    alpha : float, optional
        A fixed alpha; by default hypothesis varies it.
    seed : int, optional
        Hypothesis's random seed, for a reproducible search; by default a fresh one.
    dtypes : tuple of dtypes
        The input dtypes the step takes: float32 and float64 by default; ``(np.float32,)`` for
        code that computes in float32 whatever it is given (its float64 results would be held to
        float64's tolerance). ``np.float16`` and ``"bfloat16"`` (which needs ml_dtypes, as JAX
        and TensorFlow install it) check a step in half precision too, each at its own tolerance
        (``TOLERANCE``). Cases are drawn in each, and a failing case's diagnosis runs the larger
        cases in each, so that a quantity is said to agree only where it agrees in every one.
    cases : iterable of Case or of (features, labels, centers, alpha), optional
        Cases to run first, as they are (not shrunk), whatever their dtype: a report's evidence
        read back with ``load_cases``, in a regression test. With ``max_examples=0`` only they
        are run. Each must be one the reference takes: 2-D features and centers of one dtype
        with D columns each, one integer label per feature row, in [0, K).

    Raises
    ------
    CenterLossMismatch
        An ``AssertionError``, for the smallest failing case found (one where a value differs, if
        any case shows one; else one with a form problem): what differs and by how much; the
        outputs' form problems (a shape, dtype or kind the rule does not ask for); what each
        quantity does on that case and on larger ones chosen to tell the mistakes apart, in every
        dtype of ``dtypes`` (it "agrees" only if it agrees on every one; where it agrees in one
        dtype and not another, its line says so), with the known mistakes that reproduce it on
        every case; and the diagnosis: one mistake, several at once (each with the quantity it
        explains), two made at once on one quantity, or none known. Its ``diagnosis`` attribute
        holds the same findings as data (a ``Diagnosis``), the cases' inputs included.
    ValueError
        If ``rule`` or ``framework`` is not one of the names above, ``max_examples`` is not an
        integer >= 0 (or is 0 with no ``cases``: nothing would be checked), ``dtypes`` is
        empty or names another dtype than those above, or a case's shapes or labels do not fit.
    TypeError
        If a case is not four items, or its features or centers are not 2-D arrays of a dtype
        above.
    ImportError
        If ``framework`` is not installed, or ``dtypes`` names bfloat16 and ml_dtypes is not.

    See Also
    --------
    KNOWN_MISTAKES : The mistakes the diagnosis can name.
    centerkern.testing.strategies.center_loss_inputs : The cases it draws.
    load_cases : A report's cases, saved with ``Diagnosis.save_cases``, for ``cases=``.

    Examples
    --------
    A correct NumPy step of rule ``facenet`` (``np.add.at`` adds up the updates of duplicate
    labels) passes silently:

    >>> import numpy as np
    >>> from centerkern.testing import CenterLossMismatch, check_center_loss
    >>> def right_step(features, labels, centers, alpha):
    ...     diff = features - centers[labels]
    ...     np.add.at(centers, labels, (1 - alpha) * diff)
    ...     return np.mean(diff ** 2), centers
    >>> check_center_loss(right_step, rule="facenet", max_examples=20, seed=0)

    The classic mistake, a fancy-index update that keeps one update per repeated label, is
    found and named:

    >>> def wrong_step(features, labels, centers, alpha):
    ...     diff = features - centers[labels]
    ...     centers[labels] += (1 - alpha) * diff
    ...     return np.mean(diff ** 2), centers
    >>> try:
    ...     check_center_loss(wrong_step, rule="facenet", max_examples=20, seed=0)
    ... except CenterLossMismatch as error:
    ...     print("duplicate labels are not accumulated" in str(error))
    ...     print([finding.name for finding in error.diagnosis.findings if not finding.agrees])
    True
    ['centers']
    """
    check_choice(rule, "rule", RULES)
    check_choice(framework, "framework", FRAMEWORKS)
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 0:
        raise ValueError(f"max_examples must be an integer >= 0, got {max_examples!r}")
    cases = [as_case(case) for case in cases]
    if not max_examples and not cases:
        raise ValueError("max_examples=0 and no cases= would check nothing: give cases, or let hypothesis draw some")
    dtypes = tuple(dict.fromkeys(checked_dtype(dtype) for dtype in dtypes))
    if not dtypes:
        raise ValueError("dtypes must name at least one dtype to check the step in")
    if framework != "numpy":
        try:
            importlib.import_module(framework)
        except ImportError as error:
            raise ImportError(f"framework {framework!r} is not installed: {error}") from error
    import hypothesis
    from hypothesis import HealthCheck, given, settings

    from .strategies import center_loss_inputs

    def search(on_form):
        @settings(max_examples=max_examples, deadline=None, database=None, print_blob=False,
                  report_multiple_bugs=False, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(center_loss_inputs(alpha=alpha, dtypes=dtypes))
        def agrees_with_reference(case):
            _check_case(step, rule, framework, case, on_form)

        if seed is not None:
            agrees_with_reference = hypothesis.seed(seed)(agrees_with_reference)
        agrees_with_reference()

    form_found = []
    try:
        for case in cases:  # a regression test's cases first, as they are
            _check_case(step, rule, framework, case, form_found.append)
        if max_examples:
            search(form_found.append)  # values first: a formula's mistake, shrunk
        if form_found:
            if max_examples:
                def fail(disagreement):
                    raise disagreement
                search(fail)  # the values agree everywhere: the form problem alone, shrunk
            # that search drew other cases, none with the problem: report the smallest one met
            raise min(form_found, key=lambda found: found.case[0].size + found.case[2].size)
    except _Disagreement as disagreement:
        raise _report(disagreement, step, rule, framework, dtypes, form_found) from None


# --------------------------------------------------------------------------- codebooks


class CodebookMismatch(AssertionError):
    """What ``check_codebook_update`` raises: an ``AssertionError`` whose message is the report,
    and whose ``diagnosis`` (a ``CodebookDiagnosis``) holds the same findings as data.

    Parameters
    ----------
    report : str
        The message: the first call that disagrees, each quantity over every call, the diagnosis.
    diagnosis : CodebookDiagnosis
        The same findings as data.

    Attributes
    ----------
    diagnosis : CodebookDiagnosis
        The findings, as data.

    See Also
    --------
    check_codebook_update : What raises it.

    Examples
    --------
    A step that scatters each batch row into its code's sum, so that a repeated code keeps one:

    >>> import numpy as np
    >>> from centerkern.testing import CodebookMismatch, check_codebook_update
    >>> def step(features, codes, cluster_size, embed_avg, embed):
    ...     counts = np.bincount(codes, minlength=embed.shape[0])
    ...     sums = np.zeros(embed.shape)
    ...     sums[codes] = features
    ...     cluster_size[:] = 0.99 * cluster_size + 0.01 * counts
    ...     embed_avg[:] = 0.99 * embed_avg + 0.01 * sums
    ...     total = cluster_size.sum()
    ...     smoothed = (cluster_size + 1e-5) / (total + embed.shape[0] * 1e-5) * total
    ...     embed[:] = embed_avg / smoothed[:, None]
    ...     return cluster_size, embed_avg, embed
    >>> try:
    ...     check_codebook_update(step)
    ... except CodebookMismatch as error:
    ...     mismatch = error
    >>> print(str(mismatch).splitlines()[0])
    codebook update disagrees with centerkern's reference (smoothing 'laplace', decay 0.99, eps 1e-05, 1 rank):
    >>> print(str(mismatch).splitlines()[-1])
    diagnosis: duplicate codes are not accumulated: a code's batch sum is one of its rows ...
    """

    def __init__(self, report: str, diagnosis: CodebookDiagnosis):
        super().__init__(report)
        self.diagnosis = diagnosis


def check_codebook_update(step: Callable, *, decay: float = 0.99, eps: float = 1e-5, smoothing: str = "laplace",
                          shards: int = 1, framework: str = "numpy",
                          dtypes: tuple = (np.float32, np.float64)) -> None:
    """Check an EMA codebook update (a VQ-VAE layer's) against ``centerkern.codebooks.ema_update``.

    The step runs on built cases (``CodebookDiagnosis`` lists them): a fresh codebook as EnCodec
    and vector-quantize-pytorch start one (counts zero, ``embed_avg`` a copy of ``embed``) under
    heavy duplicate codes, then an empty batch; one code only; one row on the last code; dead codes
    (absent from a batch) in all but the case of one code; several steps per case. Each call is
    handed the state the reference reached before it, so every call is judged on its own. A step
    that agrees with the reference (``ema_update`` with ``backend="numpy"``) on every call, in
    every dtype, passes: the function returns None. Otherwise it raises a ``CodebookMismatch`` that
    says where each quantity differs and which known mistake (``CODEBOOK_MISTAKES``) reproduces
    it.

    Parameters
    ----------
    step : callable ``(features, codes, cluster_size, embed_avg, embed) -> (cluster_size, embed_avg, embed)``
        Arrays of ``framework`` in and out: ``features`` (N, D), ``codes`` (N,) int64 in [0, K)
        (N may be 0), and the state, ``cluster_size`` (K,) and ``embed_avg`` and ``embed`` (K, D),
        in the features' dtype. The step may update the state in place (it receives fresh copies
        every call; a TensorFlow step receives ``tf.Variable`` s) and returns the three arrays.
        With ``shards`` > 1 it is also given ``all_reduce=`` (below). Its own settings (decay,
        eps) are its own: pass the same ones to this check.
    decay : float
        γ, in [0, 1], the reference's decay.
    eps : float
        ε, the reference's smoothing constant (>= 0).
    smoothing : {"laplace", "current_code"}
        The reference's smoothing: Laplace's (EnCodec, Sonnet) or vector-quantize-pytorch's (see
        ``centerkern.codebooks``).
    shards : int
        The number of data-parallel ranks to simulate. With 1 (the default) the step is called on
        each whole batch. With more, each batch is split into that many contiguous shards (some
        may be empty) and the step is called once per rank, each in a thread of this process, with
        its shard, its own copy of the state and a keyword argument ``all_reduce``: a function
        that sums an array of ``framework`` over the ranks, writes the sum into it where it can
        (as ``torch.distributed.all_reduce`` does with ``SUM``) and returns it. Every rank must
        call it alike (it is a collective), and must end with the state the reference reaches on
        the whole batch. The ranks are threads, not processes: this checks what the step reduces
        and what it leaves out, not a communication backend.
    framework : {"numpy", "torch", "jax", "tensorflow"}
        The arrays the step takes and returns (see ``FRAMEWORKS``).
    dtypes : tuple of dtypes
        The dtypes the cases are built in: float32 and float64 by default, or either alone. A
        quantity agrees only if it agrees in each (float32 values at float32's tolerance,
        ``TOLERANCE``).

    Returns
    -------
    None
        The step agrees with the reference on every call.

    Raises
    ------
    CodebookMismatch
        An ``AssertionError``: the first call that disagrees and how; the outputs' form problems
        (a shape, or a dtype coarser than the inputs'); each quantity over every call, with the
        known mistakes that reproduce it on every one; and the diagnosis: one mistake, several
        (one per quantity), or none known. Its ``diagnosis`` holds the same as data.
    AssertionError
        If the step does not return three arrays, or its ranks do not call ``all_reduce`` alike.
    ValueError, TypeError
        If a setting is out of range or of the wrong type, ``framework`` is not one of the names
        above, or ``dtypes`` is empty or names another dtype than float32 and float64.
    ImportError
        If ``framework`` is not installed.

    See Also
    --------
    CODEBOOK_MISTAKES : The mistakes the diagnosis can name.
    centerkern.codebooks.ema_update : The reference.

    Examples
    --------
    The update as EnCodec writes it (one-hot counts and sums, Laplace's smoothing), in NumPy,
    passes silently:

    >>> import numpy as np
    >>> from centerkern.testing import CodebookMismatch, check_codebook_update
    >>> def step(features, codes, cluster_size, embed_avg, embed, decay=0.99, eps=1e-5):
    ...     onehot = np.eye(embed.shape[0], dtype=features.dtype)[codes]
    ...     cluster_size[:] = decay * cluster_size + (1 - decay) * onehot.sum(0)
    ...     embed_avg[:] = decay * embed_avg + (1 - decay) * (onehot.T @ features)
    ...     total = cluster_size.sum()
    ...     smoothed = (cluster_size + eps) / (total + embed.shape[0] * eps) * total
    ...     embed[:] = embed_avg / smoothed[:, None]
    ...     return cluster_size, embed_avg, embed
    >>> check_codebook_update(step)

    Under data parallelism the counts and sums must be summed over the ranks before the EMA; a
    step that leaves them to each rank is found out:

    >>> def sharded_step(features, codes, cluster_size, embed_avg, embed, all_reduce):
    ...     return step(features, codes, cluster_size, embed_avg, embed)   # all_reduce never called
    >>> try:
    ...     check_codebook_update(sharded_step, shards=2)
    ... except CodebookMismatch as error:
    ...     print(error.diagnosis.verdict)
    diagnosis: neither the batch's per-code counts nor its sums are all-reduced across ranks: ...
    """
    settings = {"decay": decay, "eps": eps, "smoothing": smoothing}
    ema_settings(**settings)  # the reference's own checks, before any call
    check_choice(framework, "framework", FRAMEWORKS)
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an integer >= 1, got {shards!r}")
    dtypes = tuple(dict.fromkeys(np.dtype(dtype) for dtype in dtypes))
    if not dtypes or any(dtype not in _codebooks.DTYPES for dtype in dtypes):
        raise ValueError(f"dtypes must name float32, float64 or both, got {dtypes!r}")
    if framework != "numpy":
        try:
            importlib.import_module(framework)
        except ImportError as error:
            raise ImportError(f"framework {framework!r} is not installed: {error}") from error
    cases = [case for dtype in dtypes for case in _codebooks.codebook_cases(dtype)]
    calls = _codebooks.observe(step, framework, cases, settings, shards)
    if not any(call.form() or call.differing() for call in calls):
        return None
    diagnosis = _codebooks.diagnose(calls, cases, {**settings, "shards": shards, "framework": framework})
    raise CodebookMismatch(_codebooks.report(calls, diagnosis), diagnosis)
