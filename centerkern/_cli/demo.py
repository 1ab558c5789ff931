"""The ``demo`` command: the seed example (SPEC.md) on every backend that can run here, facenet's
divergence on a repeated class, and a short timing table against the implementations a user would
otherwise pick.

Each part prints its own table. The seed example also checks every backend against TensorFlow's
published numbers, so that ``demo`` exits non-zero when one disagrees, and says which backends it
did not run and why (``cuda`` without a GPU, or a backend left out by ``--backend``).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numba
import numpy as np

from .. import backends as available_backends
from .. import center_loss, gather_centers, scatter_sub_update
from .bench import SIZES, make_inputs
from .alternatives import ALPHA, TORCH, Absent, implementations, interleaved_medians
from .._backends import NAMES as BACKENDS
from .._core.errors import BackendUnavailableError

# SPEC.md, "The seed example": a small batch that facenet's TensorFlow code was run on.
SEED_FEATURES = np.array(
    [[1, 1, 1, 1, 1], [1, 1, 2, 1, 1], [1, 1, 3, 1, 1], [1, 1, 4, 1, 1], [2, 2, 2, 1, 2],
     [2, 2, 2, 2, 2], [2, 2, 2, 3, 2], [3, 3, 3, 3, 1], [3, 3, 3, 3, 2]],
    dtype=np.float32,
)
SEED_LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
SEED_CLASSES = 3
SEED_ALPHA = 0.5
# TensorFlow's loss and centers after each step (tf.compat.v1 graph mode).
TENSORFLOW_STEPS = (
    (4.1111111, [[2, 2, 5, 2, 2], [3, 3, 3, 3, 3], [3, 3, 3, 3, 1.5]]),
    (1.4111111, [[0, 0, 0, 0, 0], [1.5, 1.5, 1.5, 1.5, 1.5], [3, 3, 3, 3, 1.5]]),
    (1.1611111, [[2, 2, 5, 2, 2], [2.25, 2.25, 2.25, 2.25, 2.25], [3, 3, 3, 3, 1.5]]),
)
# The published figures carry 8 significant digits.
RELATIVE_TOLERANCE = 1e-6
MATCH = "match"
MISMATCH = "MISMATCH"

PARAGRAPH_WIDTH = 92

# SPEC.md's scatter primitive: tf.scatter_sub([1,2,3], [0,0,1,1], [9,10,11,12]) = [-18,-21,3]
SCATTER_CENTERS = [1.0, 2.0, 3.0]
SCATTER_LABELS = [0, 0, 1, 1]
SCATTER_UPDATES = [9.0, 10.0, 11.0, 12.0]
SCATTER_TENSORFLOW = [-18.0, -21.0, 3.0]

# The repeated class: one feature vector, REPEATS times in every batch.
REPEATED_FEATURE = np.array([1.0, 1.0, 1.0, 1.0])
REPEATS = 8
REPEATED_ALPHA = 0.5
REPEATED_STEPS = 6

# torch's first twenty or so calls are up to 10x slower (allocator, thread pool)
TIMING_REPEATS = 50
# A 1-minute load average (about one core's worth of other work) that can delay the timed threads.
BUSY_LOAD = 1.0


def _format_number(value: np.floating) -> str:
    # the shortest digits that identify the value in its own dtype: a float32 2.0002 stays 2.0002
    return np.format_float_positional(value, trim="-")


def _floats(values) -> np.ndarray:
    """``values`` as an array that keeps a float32 dtype, and holds integers as float64."""
    array = np.asarray(values)
    return array if array.dtype.kind == "f" else array.astype(np.float64)


def _format_rows(matrix) -> str:
    """A small matrix on one line: ``[2 2 5 2 2] [3 3 3 3 1.5]``."""
    return " ".join("[" + " ".join(map(_format_number, row)) + "]" for row in _floats(matrix))


def _format_vector(values) -> str:
    return "[" + ", ".join(map(_format_number, _floats(values))) + "]"


def _run_seed(backend: str) -> list[tuple[float, np.ndarray]]:
    """The loss and a copy of the centers after each of the seed's steps, on ``backend``."""
    centers = np.zeros((SEED_CLASSES, SEED_FEATURES.shape[1]), dtype=np.float32)
    steps = []
    for _ in TENSORFLOW_STEPS:
        result = center_loss(
            SEED_FEATURES, SEED_LABELS, centers, SEED_ALPHA, rule="facenet", out=centers, backend=backend
        )
        steps.append((result.loss, np.array(result.centers, copy=True)))
    return steps


def why_unavailable(backend: str) -> str:
    """Why ``backend`` cannot run here, in the words of the error a call on it raises."""
    try:
        gather_centers(np.zeros((1, 1)), [0], backend=backend)
    except BackendUnavailableError as error:
        return str(error).removeprefix(f"backend {backend!r} ")
    return "not listed by centerkern.backends()"


def not_run(backends: Sequence[str]) -> dict[str, str]:
    """Each of centerkern's backends that ``backends`` leaves out, and why."""
    available = available_backends()
    return {backend: (f"left out by --backend {' '.join(backends)}" if backend in available else why_unavailable(backend))
            for backend in BACKENDS if backend not in backends}


def seed_example(backends: Sequence[str]) -> bool:
    """Print the seed table and the duplicate-label scatter; True when every backend gives
    TensorFlow's numbers."""
    runs = {backend: _run_seed(backend) for backend in backends}
    source_width = max(len("TensorFlow"), *map(len, backends))
    print(textwrap.fill(
        f"Seed example: rule 'facenet', {len(SEED_LABELS)} samples of {SEED_FEATURES.shape[1]} features in "
        f"K={SEED_CLASSES} classes, alpha={SEED_ALPHA:g}, centers starting at zero, float32; "
        f"{len(TENSORFLOW_STEPS)} steps of center_loss(..., out=centers) beside TensorFlow's own numbers "
        f"(rtol {RELATIVE_TOLERANCE:g}).", PARAGRAPH_WIDTH))
    skipped = not_run(backends)
    if skipped:
        print()
    for backend, reason in skipped.items():  # one line each, whatever its length
        print(f"{backend}: not run: {reason}")
    print()
    print(f"step  {'source':<{source_width}}  {'loss':<9}  {'check':<8}  centers after the step")
    all_agree = True
    for step, (tensorflow_loss, tensorflow_centers) in enumerate(TENSORFLOW_STEPS):
        print(f"{step:>4}  {'TensorFlow':<{source_width}}  {tensorflow_loss:.7f}  {'':<8}  "
              f"{_format_rows(tensorflow_centers)}")
        for backend, steps in runs.items():
            loss, centers = steps[step]
            agrees = bool(
                np.allclose(loss, tensorflow_loss, rtol=RELATIVE_TOLERANCE)
                and np.allclose(centers, tensorflow_centers, rtol=RELATIVE_TOLERANCE)
            )
            all_agree &= agrees
            print(f"{'':>4}  {backend:<{source_width}}  {loss:.7f}  {MATCH if agrees else MISMATCH:<8}  "
                  f"{_format_rows(centers)}")
    print()
    print(textwrap.fill(
        "facenet's script prints 1.4111111, the loss of step 1, because every sess.run of its graph "
        "updates the centers once more (hidden state); center_loss returns the loss of the centers it "
        "is given together with the updated centers, so no step can happen unseen.", PARAGRAPH_WIDTH))
    print()
    return _duplicate_labels(backends) and all_agree


def _duplicate_labels(backends: Sequence[str]) -> bool:
    """Print ``c[labels] -= u`` beside ``scatter_sub_update`` on SPEC.md's scatter example; True
    when every backend gives TensorFlow's result."""
    centers = np.array(SCATTER_CENTERS)[:, None]
    labels = np.array(SCATTER_LABELS)
    updates = np.array(SCATTER_UPDATES)[:, None]
    rows = [("tf.scatter_sub (published)", SCATTER_TENSORFLOW, "")]
    fancy_indexed = centers.copy()
    fancy_indexed[labels] -= updates  # NumPy assigns each duplicate in turn: the last one wins
    rows.append(("c[labels] -= u", fancy_indexed[:, 0], "wrong: one update per label survives"))
    all_agree = True
    for backend in backends:
        result = scatter_sub_update(centers, labels, updates, backend=backend)[:, 0]
        agrees = bool(np.allclose(result, SCATTER_TENSORFLOW, rtol=RELATIVE_TOLERANCE))
        all_agree &= agrees
        rows.append((f"scatter_sub_update, {backend}", result, "duplicates add up" if agrees else MISMATCH))
    width = max(len(name) for name, _, _ in rows)
    print(f"Duplicate labels: c = {_format_vector(SCATTER_CENTERS)}, labels = {SCATTER_LABELS}, "
          f"u = {_format_vector(SCATTER_UPDATES)}, float64")
    for name, values, comment in rows:
        print(f"  {name:<{width}}  {_format_vector(values):<16}  {comment}".rstrip())
    return all_agree


def _repeated_class_offsets(rule: str) -> list[np.ndarray]:
    """``center - feature`` before the first step and after each step of ``rule``."""
    features = np.tile(REPEATED_FEATURE, (REPEATS, 1))
    labels = np.zeros(REPEATS, dtype=np.int64)
    centers = np.zeros((1, REPEATED_FEATURE.size))
    offsets = [centers[0] - REPEATED_FEATURE]
    for _ in range(REPEATED_STEPS):
        center_loss(features, labels, centers, REPEATED_ALPHA, rule=rule, out=centers, backend="numba")
        offsets.append(centers[0] - REPEATED_FEATURE)
    return offsets


def _describe(offset: np.ndarray, start: np.ndarray) -> str:
    """The distance of the center from the features, and on which side of them the center is."""
    alignment = np.dot(offset, start)
    side = "short" if alignment > 0 else "past" if alignment < 0 else "at"
    return f"{np.linalg.norm(offset):16.4f}  {side:<5}"


def repeated_class() -> None:
    """Print facenet's overshoot and divergence beside wen's convergence on one repeated class."""
    facenet = _repeated_class_offsets("facenet")
    wen = _repeated_class_offsets("wen")
    facenet_step = REPEATS * (1 - REPEATED_ALPHA)
    wen_step = REPEATED_ALPHA * REPEATS / (1 + REPEATS)
    print(textwrap.fill(
        f"One class, {REPEATS} identical features {_format_vector(REPEATED_FEATURE)} in every batch, "
        f"center starting at zero (float64, numba backend). facenet (alpha={REPEATED_ALPHA:g}) moves the "
        f"center n*(1 - alpha) = {facenet_step:g} times the way to the features: beyond 1 it overshoots, "
        f"beyond 2 it diverges (facenet issue #528). wen (alpha={REPEATED_ALPHA:g}) moves it "
        f"alpha*n/(1 + n) = {wen_step:.3f} of the way and converges.", PARAGRAPH_WIDTH))
    print()
    print(f"step  {'facenet distance':>16}  {'side':<5}  {'wen distance':>16}  side")
    for step, (facenet_offset, wen_offset) in enumerate(zip(facenet, wen)):
        print(f"{step:>4}  {_describe(facenet_offset, facenet[0])}  {_describe(wen_offset, wen[0])}".rstrip())


def timing() -> None:
    """Print median times of the fused step and of the scatter, with ratios to centerkern's."""
    size = SIZES["M"]
    inputs = make_inputs(size)
    # each implementation updates its own copy of the centers, in place, call after call
    makers = implementations(with_compile=False)
    steps = {"centerkern center_loss(out=centers)": makers["centerkern numba"](*inputs, "step facenet", ALPHA).run}
    scatters = {"centerkern scatter_sub_update(out=centers)": makers["centerkern numba"](*inputs, "scatter", ALPHA).run,
                "np.subtract.at": makers["np.subtract.at"](*inputs, "scatter", ALPHA).run}
    torch_note = ""
    try:
        steps["torch eager index_select + index_add_"] = makers[TORCH](*inputs, "step facenet", ALPHA).run
        scatters["torch index_add_"] = makers[TORCH](*inputs, "scatter", ALPHA).run
    except Absent as reason:
        torch_note = f"torch: {reason}"

    print(f"Timing: B={size.batch}, D={size.width}, K={size.classes}, float32, random normal data, "
          f"uniform labels;")
    print(f"median of {TIMING_REPEATS} calls, in interleaved blocks after a warm-up call, numba "
          f"backend on {numba.get_num_threads()} threads")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load >= BUSY_LOAD:
        # a parallel kernel waits for its slowest thread, and a thread that shares its core with
        # another process can wait a whole scheduler time slice: tens of milliseconds
        print(textwrap.fill(
            f"Note: the load average is {load:.2f}; other processes are using the CPUs, so the parallel "
            f"kernels (centerkern's and torch's) may be measured many times slower than they are.",
            PARAGRAPH_WIDTH))
    print(textwrap.fill(
        "Indicative only: torch's eager times swing several-fold with the state of the process's "
        "memory allocator (its temporaries can be mapped and unmapped on every call); "
        "python -m centerkern bench measures every alternative in one clean process.", PARAGRAPH_WIDTH))
    width = max(map(len, [*steps, *scatters]))
    groups = (
        ("fused step, rule 'facenet' (loss, grad, center update)", steps,
         torch_note),
        ("scatter, duplicate labels accumulating (centers[labels[i]] -= updates[i] for every i)",
         scatters, ""),
    )
    for title, calls, note in groups:
        print()
        print(f"  {title}")
        print(f"    {'':<{width}}  {'median':>10}  {'time / centerkern':>17}")
        medians = interleaved_medians(calls, TIMING_REPEATS)
        reference = next(iter(medians.values()))  # centerkern's row comes first
        for name, seconds in medians.items():
            print(f"    {name:<{width}}  {seconds * 1e3:7.3f} ms  {seconds / reference:16.2f}x")
        if note:
            print(f"    {note}")


def demo(backends: Sequence[str], with_timing: bool) -> int:
    """Run the demo's parts; 0 when every backend reproduces TensorFlow's seed numbers, else 1."""
    seed_agrees = seed_example(backends)
    print()
    repeated_class()
    if with_timing:
        print()
        timing()
    return 0 if seed_agrees else 1
