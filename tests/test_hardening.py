"""Hardening: fuzzing every entry point in a child process, concurrent calls from Python threads,
float32 accuracy with large magnitudes and many duplicates, zero-stride and zero-size inputs."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import centerkern

from conftest import assert_matches

HERE = Path(__file__).resolve().parent


def test_fuzz_smoke_in_a_child_process():
    """A crash (a segfault, an abort) would kill the child, not the test run: its exit status tells."""
    run = subprocess.run([sys.executable, str(HERE / "fuzz_center_loss.py"), "400"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "no crash, hang or wrong answer" in run.stdout


def _concurrent_calls(backend, threads=4, calls=15):
    """Each thread runs its own steps on its own arrays; every result must equal the reference."""
    failures = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(calls):
            features = rng.standard_normal((300, 64)).astype(np.float32)  # parallel regime: B x D >= 2**14
            labels = rng.integers(0, 7, 300)
            centers = rng.standard_normal((7, 64)).astype(np.float32)
            expected = centerkern.center_loss(features, labels, centers, 0.5, rule="wen", backend="numpy")
            got = centerkern.center_loss(features, labels, centers, 0.5, rule="wen", backend=backend)
            if not np.allclose(got.centers, expected.centers, rtol=1e-5, atol=1e-5):
                failures.append(seed)

    pool = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=300)
    return failures


def test_concurrent_calls_from_python_threads():
    assert _concurrent_calls("numba") == []


def test_concurrent_calls_under_the_workqueue_layer_do_not_abort():
    """The workqueue layer aborts the process on concurrent launches unless they take turns."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import numba; "
            "from test_hardening import _concurrent_calls; "
            "failures = _concurrent_calls('numba'); "
            "print('layer', numba.threading_layer(), 'failures', failures)")
    environment = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "NUMBA_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                         timeout=600, cwd=HERE.parent)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "layer workqueue failures []" in run.stdout


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_float32_loss_stays_accurate_with_large_values_and_many_duplicates(backend):
    rng = np.random.default_rng(5)
    features = (1e4 + rng.standard_normal((20000, 16))).astype(np.float32)  # all in one class, far away
    labels = np.zeros(20000, dtype=np.int64)
    centers = np.zeros((3, 16), dtype=np.float32)
    exact = np.sum((features.astype(np.float64) - 0.0) ** 2) / features.size
    result = centerkern.center_loss(features, labels, centers, 0.9, backend=backend)
    assert abs(result.loss - exact) / exact < 1e-9  # float64 accumulation; float32 would be ~1e-4 off
    moved = centers[0].astype(np.float64) + 0.1 * np.sum(features.astype(np.float64), axis=0)
    np.testing.assert_allclose(result.centers[0], moved, rtol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_zero_stride_and_zero_size_inputs(backend):
    rng = np.random.default_rng(9)
    row = rng.standard_normal((1, 5))
    features = np.broadcast_to(row, (12, 5))  # every row the same memory
    labels = rng.integers(0, 3, 12)
    centers = rng.standard_normal((3, 5))
    expected = centerkern.center_loss(np.array(features), labels, centers, 0.5, backend="numpy")
    result = centerkern.center_loss(features, labels, centers, 0.5, backend=backend)
    assert_matches(result.centers, expected.centers, features, centers)
    with pytest.raises(ValueError, match="read-only"):
        centerkern.center_loss(features, labels, centers, 0.5, out=np.broadcast_to(centers[:1], (3, 5)),
                               backend=backend)
    empty = centerkern.center_loss(np.empty((4, 0)), [0, 1, 2, 0], np.empty((3, 0)), 0.5, backend=backend)
    assert empty.loss == 0.0 and empty.grad.shape == (4, 0) and empty.centers.shape == (3, 0)


@pytest.mark.parametrize("labels, value", [(np.array([0, 2**40]), 2**40), (np.array([0, 2**31], np.uint32), 2**31),
                                           (np.array([1, 2**64 - 1], np.uint64), 2**64 - 1)])
def test_labels_far_beyond_k_are_rejected_not_wrapped(labels, value):
    centers = np.zeros((10, 2))
    for backend in ("numpy", "numba"):
        with pytest.raises(IndexError, match=f"label {value} at position 1"):
            centerkern.gather_centers(centers, labels, backend=backend)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_more_than_2_31_center_elements_in_place(backend):
    """K x D beyond 2**31 elements: 64-bit index arithmetic. np.zeros maps its 8.6 GB lazily, and
    the in-place path touches only the rows the batch names, so this needs a few pages of memory."""
    classes, width = 2**28 + 8, 8  # 2**31 + 64 float32 elements
    centers = np.zeros((classes, width), dtype=np.float32)
    last = classes - 1
    centers[last] = np.arange(width, dtype=np.float32)
    rows = np.ones((3, width), dtype=np.float32)
    labels = np.array([last, 0, last])
    gathered = centerkern.gather_centers(centers, labels, backend=backend)
    np.testing.assert_array_equal(gathered[0], np.arange(width))
    centerkern.scatter_sub_update(centers, labels, rows, out=centers, backend=backend)
    np.testing.assert_array_equal(centers[last], np.arange(width) - 2)
    result = centerkern.center_loss(rows, labels, centers, 0.5, out=centers, backend=backend)
    assert result.centers is centers
    np.testing.assert_allclose(centers[last], (np.arange(width) - 2) + 0.5 * 2 * (1 - (np.arange(width) - 2)))


def test_calls_with_writable_inputs_never_compile_while_another_thread_compiles():
    """A thread compiling an entry for another dtype switches compiling on for the whole
    dispatcher. A call in another thread at that moment must still run the compiled entry: its
    inputs are passed as the signature's read-only arrays, not converted (which Numba does only
    while compiling is off; here it compiled a new specialisation, or raised 'compilation
    disabled' once the other thread had finished, on two JAX devices)."""
    from centerkern._backends.numba_cpu import memory
    from centerkern._backends.numba_cpu import step

    rng = np.random.default_rng(0)
    features, centers = rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    labels = np.array([0, 1, 1, 3, 0, 2])
    expected = centerkern.center_loss(features, labels, centers, 0.5, rule="wen", backend="numpy")
    centerkern.gather_centers(centers, labels, backend="numba")
    centerkern.center_loss(features, labels, centers, 0.5, rule="wen", backend="numba")
    entries = (step.step_serial.dispatcher, memory.gather_rows.dispatcher)
    compiled = [len(d.signatures) for d in entries]
    for dispatcher in entries:
        dispatcher.disable_compile(False)  # as Entry._compile does while it compiles
    try:
        assert features.flags.writeable and labels.flags.writeable
        result = centerkern.center_loss(features, labels, centers, 0.5, rule="wen", backend="numba")
        gathered = centerkern.gather_centers(centers, labels, backend="numba")
    finally:
        for dispatcher in entries:
            dispatcher.disable_compile(True)
    assert [len(d.signatures) for d in entries] == compiled
    np.testing.assert_allclose(result.centers, expected.centers, rtol=1e-6)
    np.testing.assert_array_equal(gathered, centers[labels])
