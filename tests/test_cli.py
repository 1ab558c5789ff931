"""The command line, run as a user runs it: ``python -m centerkern ...`` in a fresh process."""

from __future__ import annotations

import re
import subprocess
import sys

import centerkern
from centerkern._backends import NAMES as BACKENDS

from conftest import SIMULATED

# The first run in a fresh environment compiles the numba kernels (then cached on disk).
TIMEOUT_SECONDS = 300


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "centerkern", *arguments],
        capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
    )


def test_demo_reproduces_the_seed_example_on_every_backend():
    result = run_cli("demo", "--no-timing")
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    for published in ("4.1111111", "1.4111111", "1.1611111", "-18", "-21"):
        assert published in output
    assert "MISMATCH" not in output
    # one "match" per backend and step of the seed table
    assert len(re.findall(r"\bmatch\b", output)) == 3 * len(centerkern.backends())
    assert "Timing" not in output
    # a backend that cannot run here has a line saying so, and why (cuda without a GPU)
    assert not_run(output) == set(BACKENDS) - set(centerkern.backends())
    if "cuda" not in centerkern.backends():
        # no GPU, or no numba-cuda: BackendUnavailableError's own words
        assert re.search(r"^cuda: not run: (needs a CUDA GPU and its driver, and Numba found none"
                         r"|cannot load Numba's CUDA target)", output, re.M), output


def test_demo_backend_option_restricts_the_seed_table():
    result = run_cli("demo", "--no-timing", "--backend", "numpy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(re.findall(r"\bmatch\b", result.stdout)) == 3
    assert "numba: not run: left out by --backend numpy" in result.stdout
    assert not_run(result.stdout) == set(BACKENDS) - {"numpy"}


def not_run(output: str) -> set[str]:
    """The backends the demo says it did not run."""
    return set(re.findall(r"^(\w+): not run: \S", output, re.M))


def test_info_lists_the_backends():
    result = run_cli("info")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "numba" in result.stdout
    assert centerkern.__version__ in result.stdout
    # how the cuda backend launches: said plainly, whether or not this process has a GPU
    expected = "numba dispatcher" if SIMULATED else ("direct" if "cuda" in centerkern.backends() else "no cuda backend")
    assert re.search(rf"cuda launches\s+{expected}", result.stdout), result.stdout
    assert "centerkern.jax: XLA FFI custom call" in result.stdout  # the jax installed here has jax.ffi


def test_no_command_prints_help_and_exits_2():
    result = run_cli()
    assert result.returncode == 2
    assert "demo" in result.stderr and "info" in result.stderr
