"""A fuzz harness for every entry point and CPU backend: random shapes, dtypes (integer, bool,
complex, object, float16), label values (negative, >= K, near 2**31, 2**63 and 2**64, unsigned),
layouts (strided, Fortran, zero-size, broadcast views with zero strides), NaN/Inf, and `out`
aliasing the inputs. Every case must end in a result equal to the `numpy` reference's or in the
same documented exception (TypeError, ValueError, IndexError); anything else fails, and a crash
of the interpreter is caught by running the harness in a child process.

    python tests/fuzz_center_loss.py 20000          # what `make fuzz` runs
"""

import sys

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import centerkern

DOCUMENTED = (TypeError, ValueError, IndexError)
FLOAT_DTYPES = [np.float32, np.float64]
ODD_DTYPES = [np.float16, np.int32, np.int64, np.bool_, np.complex64, object]
EXTREME_LABELS = [-1, -(2**31), 2**31 - 1, 2**31, 2**63 - 1]


def _layout(array, layout):
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "strided" and array.ndim == 2:
        padded = np.zeros((array.shape[0], 2 * array.shape[1]), dtype=array.dtype)
        padded[:, ::2] = array
        return padded[:, ::2]
    if layout == "broadcast" and array.ndim == 2 and array.shape[0]:
        return np.broadcast_to(array[:1], array.shape)  # zero stride along the rows, read-only
    return array


FAULTS = ["dtype", "mismatched dtype", "label value", "label dtype", "ndim", "extra row", "alpha", "rule",
          "read-only out"]


@st.composite
def cases(draw):
    """Half the cases valid (odd layouts, NaN/Inf, zero sizes, aliasing included), half with one
    fault injected, so that both the arithmetic and every error path are exercised."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fault = draw(st.sampled_from([None] * len(FAULTS) + FAULTS))
    batch = draw(st.sampled_from([0, 1, 2, 7, 40]))
    width = draw(st.sampled_from([0, 1, 3, 9]))
    classes = draw(st.sampled_from([1, 2, 5] + ([0] if batch == 0 else [])))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    if fault == "dtype":
        dtype = draw(st.sampled_from(ODD_DTYPES))
    other_dtype = dtype
    if fault == "mismatched dtype":
        other_dtype = np.float64 if dtype == np.float32 else np.float32

    def matrix(rows, kind, layout_allowed=True):
        values = rng.standard_normal((rows, width)) * draw(st.sampled_from([1.0, 1e30]))
        if draw(st.booleans()) and values.size:
            values.flat[rng.integers(0, values.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        with np.errstate(all="ignore"):
            array = values.astype(kind)
        layouts = ["c", "fortran", "strided", "broadcast"] if layout_allowed else ["c", "fortran", "strided"]
        return _layout(array, draw(st.sampled_from(layouts)))

    features = matrix(batch + (1 if fault == "extra row" else 0), dtype)
    centers = matrix(classes, other_dtype, layout_allowed=False)
    updates = matrix(batch + (1 if fault == "extra row" else 0), dtype)
    if fault == "ndim":
        features, updates = features.reshape(-1), updates.reshape(-1)
    labels = rng.integers(0, max(classes, 1), batch)
    if draw(st.booleans()) and batch:
        labels[: batch // 2] = labels[0]  # duplicates
    label_dtype = draw(st.sampled_from([np.int8, np.int32, np.int64, np.uint8, np.uint32, np.uint64]))
    if fault == "label value" and batch:
        labels = labels.astype(np.int64)
        labels[rng.integers(0, batch)] = draw(st.sampled_from(EXTREME_LABELS + [classes]))
        if draw(st.booleans()):
            label_dtype = np.int64
        else:  # the same bits as unsigned: negative values become huge, 2**63 - 1 stays
            labels, label_dtype = labels.view(np.uint64), np.uint64
    if fault == "label dtype":
        label_dtype = draw(st.sampled_from([np.bool_, np.float64, np.complex64]))
    with np.errstate(all="ignore"):
        labels = labels.astype(label_dtype)
    function = draw(st.sampled_from(["gather", "scatter", "loss"]))
    out = "read-only" if fault == "read-only out" else draw(st.sampled_from(["none", "centers", "separate"]))
    alpha = draw(st.sampled_from([float("nan"), 2, "0.5", None])) if fault == "alpha" else draw(
        st.sampled_from([0.5, 0.95, 1.5]))
    rule = "nope" if fault == "rule" else draw(st.sampled_from(["facenet", "wen", "pytorch"]))
    return function, features, labels, centers, updates, out, alpha, rule


def _call(backend, function, features, labels, centers, updates, out, alpha, rule):
    centers = np.array(centers, copy=True) if out == "centers" else centers  # each backend its own copy
    target = {"none": None, "centers": centers, "separate": np.zeros_like(centers) if hasattr(centers, "shape") else None,
              "read-only": np.zeros_like(centers) if hasattr(centers, "shape") else None}[out]
    if out == "read-only" and target is not None:
        target.flags.writeable = False
    if function == "gather":
        return centerkern.gather_centers(centers, labels, backend=backend)
    if function == "scatter":
        return centerkern.scatter_sub_update(centers, labels, updates, out=target, backend=backend)
    result = centerkern.center_loss(features, labels, centers, alpha, rule=rule, out=target, backend=backend)
    return [result.loss, result.grad, result.centers, result.grad_centers]


def _outcome(backend, case):
    try:
        return "result", _call(backend, *case)
    except DOCUMENTED as error:
        return "error", type(error)


def _equal(a, b, dtype):
    if isinstance(a, list):
        return all(_equal(x, y, dtype) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    with np.errstate(all="ignore"):
        scale = np.nanmax(np.abs(np.where(np.isfinite(b), b, 0)), initial=1.0)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=tolerance, atol=tolerance * scale, equal_nan=True))


def check(case):
    expected = _outcome("numpy", case)
    for backend in ("numba",):
        got = _outcome(backend, case)
        assert got[0] == expected[0], (backend, got, expected)
        if got[0] == "error":
            assert got[1] is expected[1], (backend, got[1], expected[1])
        else:
            dtype = np.asarray(case[3]).dtype
            assert _equal(got[1], expected[1], dtype), (backend, case[0])


def run(examples):
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def fuzz(case):
        with np.errstate(all="ignore"):
            check(case)

    fuzz()


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
    print("fuzz: no crash, hang or wrong answer")
