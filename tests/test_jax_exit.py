"""A JAX training script that ends, or raises, while its first data-parallel step still runs
must exit, with its own exit status: nothing of centerkern's may keep the interpreter from
finalizing. XLA runs the step's custom calls on its own threads; a handler in Python there needs
the GIL, and one entered while the interpreter finalizes can wait forever for a lock that a
thread gone at finalization held (seen: an import lock, the process never exiting). Every
handler of the CPU step is machine code (``centerkern._adapters.xla_native``).

Each case runs ``tests/workers/jax_exit_worker.py`` in a child process, 10 times on 2 and on 4
host devices, cycling through the three kinds of step (each shard's own update, and the whole
batch's with either exchange), one child at a time: a child takes about 2.5 s here, and the
10 s allowed must not be spent waiting for a sibling's share of the cores."""

import itertools
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = 10
EXIT_WITHIN_SECONDS = 10
STEPS = ("none", "dense", "sparse")  # no axis_name, then axis_name= with each exchange


def _run(devices: int, ending: str, exchange: str):
    command = [sys.executable, os.path.join(HERE, "workers", "jax_exit_worker.py"), str(devices), ending, exchange]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=EXIT_WITHIN_SECONDS)
    except subprocess.TimeoutExpired:
        return exchange, None, ""
    return exchange, completed.returncode, completed.stderr


@pytest.fixture(scope="module", autouse=True)
def warm_kernel_cache():
    """One run of each kind first, without a time limit: the handlers compile once into the
    kernel cache (``make install`` has filled it already), so that the timed runs load them."""
    for exchange in STEPS:
        command = [sys.executable, os.path.join(HERE, "workers", "jax_exit_worker.py"), "2", "end", exchange]
        subprocess.run(command, capture_output=True, timeout=600)


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("ending, status", [("raise", 1), ("end", 0)])
def test_a_script_ending_during_its_first_step_exits_with_its_own_status(devices, ending, status):
    kinds = itertools.islice(itertools.cycle(STEPS), RUNS)
    outcomes = [_run(devices, ending, exchange) for exchange in kinds]
    hung = [exchange for exchange, code, _ in outcomes if code is None]
    assert not hung, f"{len(hung)} of {RUNS} runs did not exit within {EXIT_WITHIN_SECONDS} s: {hung}"
    for exchange, code, stderr in outcomes:
        assert code == status, (exchange, code, stderr[-2000:])
        if ending == "raise":  # the script's own error, as Python reports it
            assert "RuntimeError: the script fails after its first step was dispatched" in stderr, stderr[-2000:]
