import numpy as np
import pytest

import centerkern

# Every backend this process can run. The CUDA backend appears here only in the separate
# simulator process (NUMBA_ENABLE_CUDASIM=1, see the Makefile) or on a machine with a GPU.
BACKENDS = centerkern.backends()
FAST_BACKENDS = tuple(b for b in BACKENDS if b != "numpy")

# SPEC: every backend equals numpy to a relative error below these, whatever the summation order
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def assert_matches(got, reference, *inputs):
    """Equal to within SPEC's tolerance. Relative to the larger of the value and the inputs'
    magnitude, since sums of terms that cancel are exact only to the terms' own scale."""
    got = np.asarray(got)
    reference = np.asarray(reference)
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
