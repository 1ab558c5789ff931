import os

import numpy as np
import pytest

import centerkern

# Every backend this process can run. The CUDA backend appears here only in the separate
# simulator process (NUMBA_ENABLE_CUDASIM=1, see the Makefile) or on a machine with a GPU.
BACKENDS = centerkern.backends()
FAST_BACKENDS = tuple(b for b in BACKENDS if b != "numpy")
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

# The simulator runs every GPU thread as a Python thread: keep its inputs small, and its tiles
# and blocks tiny so that small inputs still span many tiles and column blocks.
MAX_BATCH = 40 if SIMULATED else 500
MAX_WIDTH = 9 if SIMULATED else 70

collect_ignore = [] if "cuda" in BACKENDS else ["test_cuda.py"]

if SIMULATED:
    from centerkern import kernels_cuda

    kernels_cuda.TILE_ROWS = 4
    kernels_cuda.COLUMNS_PER_BLOCK = 4
    kernels_cuda.THREADS_1D = 8  # with 2 blocks at most, batches above 16 take the grid-stride loops
    kernels_cuda.GRID_STRIDE_BLOCKS = 2
    kernels_cuda.ROW_BLOCKS = 3


# `make test` installs every framework the tests use, and sets this: there a framework that does
# not import is a failure, not a skip that a passing run would hide. CuPy is the exception: it
# needs a GPU, which the test machine may not have.
REQUIRE_FRAMEWORKS = os.environ.get("CENTERKERN_REQUIRE_FRAMEWORKS") == "1"
NEEDS_A_GPU = ("cupy",)


def _missing_required_framework(report) -> bool:
    reason = str(report.longrepr)
    return (REQUIRE_FRAMEWORKS and report.skipped and "could not import" in reason
            and not any(f"'{name}'" in reason for name in NEEDS_A_GPU))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    if _missing_required_framework(report):
        report.outcome = "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if _missing_required_framework(report):
        report.outcome = "failed"


def to_host(array):
    """A result as a NumPy array, wherever it lives."""
    return array.copy_to_host() if hasattr(array, "copy_to_host") else np.asarray(array)

# SPEC: every backend equals numpy to a relative error below these, whatever the summation order
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def assert_matches(got, reference, *inputs):
    """Equal to within SPEC's tolerance. Relative to the larger of the value and the inputs'
    magnitude, since sums of terms that cancel are exact only to the terms' own scale."""
    got = to_host(got)
    reference = to_host(reference)
    assert got.shape == reference.shape, (got.shape, reference.shape)
    tolerance = TOLERANCE[np.dtype(got.dtype)]
    scale = max([1e-300] + [float(np.max(np.abs(a), initial=0.0)) for a in (reference, *inputs)])
    np.testing.assert_allclose(got, reference, rtol=tolerance, atol=tolerance * scale)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request):
    return request.param
