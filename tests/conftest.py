import os

import numpy as np
import pytest

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if SIMULATED:
    # The simulator runs every GPU thread as a Python thread: tiny tiles and column blocks (a
    # compile-time fact of the kernels, read when they are imported) make small inputs span many.
    os.environ.setdefault("CENTERKERN_CUDA_TILE", "4,4")

import centerkern  # noqa: E402
from centerkern.testing import BACKEND_TOLERANCE, close_within, difference  # noqa: E402

# Every backend this process can run. The CUDA backend appears here only in the separate
# simulator process (NUMBA_ENABLE_CUDASIM=1, see the Makefile) or on a machine with a GPU.
BACKENDS = centerkern.backends()
FAST_BACKENDS = tuple(b for b in BACKENDS if b != "numpy")

# The simulator runs every GPU thread as a Python thread: keep its inputs small, and its blocks
# few so that small inputs still take the grid-stride loops.
MAX_BATCH = 40 if SIMULATED else 500
MAX_WIDTH = 9 if SIMULATED else 70

collect_ignore = [] if "cuda" in BACKENDS else ["test_cuda.py", "test_cuda_calls.py"]

if SIMULATED:
    from centerkern.cuda import arrays as cuda_arrays

    cuda_arrays.THREADS_1D = 8  # with 2 blocks at most, batches above 16 take the grid-stride loops
    cuda_arrays.GRID_STRIDE_BLOCKS = 2
    cuda_arrays.ROW_BLOCKS = 3


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

def assert_matches(got, reference, *inputs):
    """Equal to within SPEC's tolerance for the dtype, relative to the larger of the value and the
    inputs' magnitude."""
    got, reference = to_host(got), to_host(reference)
    assert close_within(got, reference, BACKEND_TOLERANCE[np.dtype(got.dtype)], *inputs), difference(got, reference)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request):
    return request.param
