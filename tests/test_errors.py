"""SPEC.md's error table: the right exception, a message naming the problem, nothing modified."""

import re

import numpy as np
import pytest

import centerkern

from conftest import BACKENDS


def _inputs(dtype=np.float32, batch=6, width=4, classes=3):
    rng = np.random.default_rng(0)
    return {
        "features": rng.standard_normal((batch, width)).astype(dtype),
        "labels": np.array([0, 2, 2, 1, 0, 2][:batch]),
        "centers": rng.standard_normal((classes, width)).astype(dtype),
        "updates": rng.standard_normal((batch, width)).astype(dtype),
    }


def _snapshot(*arrays):
    return [np.array(a, copy=True) for a in arrays if isinstance(a, np.ndarray)]


def _assert_unchanged(arrays, snapshot):
    for array, before in zip([a for a in arrays if isinstance(a, np.ndarray)], snapshot):
        np.testing.assert_array_equal(array, before)


def _call_all(function, data, out_centers=True, **overrides):
    """Call ``function`` ("loss", "scatter" or "gather") with ``data`` updated by ``overrides``,
    writing in place into the centers when ``out_centers``, and check nothing changed on error."""
    args = {**data, **overrides}
    arrays = list(args.values())
    snapshot = _snapshot(*arrays)
    try:
        if function == "loss":
            centerkern.center_loss(args["features"], args["labels"], args["centers"], args.get("alpha", 0.5),
                                   rule=args.get("rule", "facenet"), backend=args.get("backend", "auto"),
                                   out=args.get("out", args["centers"] if out_centers else None))
        elif function == "scatter":
            centerkern.scatter_sub_update(args["centers"], args["labels"], args["updates"],
                                          backend=args.get("backend", "auto"),
                                          out=args.get("out", args["centers"] if out_centers else None))
        else:
            centerkern.gather_centers(args["centers"], args["labels"], backend=args.get("backend", "auto"))
    finally:
        _assert_unchanged(arrays, snapshot)


FUNCTIONS = ["loss", "scatter", "gather"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("bad, position", [(3, 2), (-1, 2), (100, 2)])
def test_out_of_range_label_names_value_position_and_k(backend, function, bad, position):
    data = _inputs()
    labels = data["labels"].copy()
    labels[position] = bad
    with pytest.raises(IndexError, match=rf"label {bad} at position {position}.*\[0, 3\)"):
        _call_all(function, data, labels=labels, backend=backend)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_first_bad_label_is_reported(function):
    data = _inputs()
    labels = np.array([0, 1, 7, -4, 9, 0])
    with pytest.raises(IndexError, match=r"label 7 at position 2"):
        _call_all(function, data, labels=labels)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_huge_unsigned_label_is_rejected_not_wrapped(function):
    data = _inputs()
    labels = np.array([0, 1, 2, 2**63 + 1, 0, 0], dtype=np.uint64)  # wraps to a negative int64
    with pytest.raises(IndexError, match=rf"label {2**63 + 1} at position 3"):
        _call_all(function, data, labels=labels)


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("labels", [np.array([0, 1, 1, 0, 1, 0], dtype=bool), np.zeros(6), np.zeros(6, np.complex64),
                                    np.array(list("abcdef"))])
def test_non_integer_labels_name_the_dtype(function, labels):
    with pytest.raises(TypeError, match=re.escape(str(labels.dtype))):
        _call_all(function, _inputs(), labels=labels)


@pytest.mark.parametrize("function", ["loss", "scatter"])
def test_wrong_number_of_labels_names_the_shapes(function):
    with pytest.raises(ValueError, match=r"labels of shape \(5,\).*\(6, 4\)"):
        _call_all(function, _inputs(), labels=np.array([0, 1, 2, 0, 1]))


@pytest.mark.parametrize("function, name", [("loss", "features"), ("scatter", "updates")])
def test_mismatched_feature_size_names_the_shapes(function, name):
    data = _inputs()
    with pytest.raises(ValueError, match=rf"{name} of shape \(6, 5\) and centers of shape \(3, 4\)"):
        _call_all(function, data, **{name: np.zeros((6, 5), np.float32)})


@pytest.mark.parametrize("function, name", [("loss", "features"), ("loss", "centers"), ("scatter", "centers"),
                                            ("scatter", "updates"), ("gather", "centers")])
def test_wrong_ndim_names_the_shape(function, name):
    with pytest.raises(ValueError, match=rf"{name} must be 2-D, got shape \(24,\)"):
        _call_all(function, _inputs(), **{name: np.zeros(24, np.float32)})


@pytest.mark.parametrize("function, name", [("loss", "features"), ("scatter", "updates"), ("loss", "centers")])
def test_dtype_mismatch_names_both_dtypes(function, name):
    data = _inputs()
    with pytest.raises(TypeError, match=r"float64.*float32|float32.*float64"):
        _call_all(function, data, **{name: data[name].astype(np.float64)})


@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("dtype", [np.int32, np.float16, np.complex128, bool, object])
def test_non_float_centers_name_the_dtype(function, dtype):
    data = _inputs()
    with pytest.raises(TypeError, match=re.escape(str(np.dtype(dtype)))):
        _call_all(function, data, centers=np.zeros((3, 4), dtype=dtype), out_centers=False)


@pytest.mark.parametrize("alpha, error", [(float("nan"), ValueError), (float("inf"), ValueError), (-np.inf, ValueError),
                                          (1 + 2j, TypeError), ("0.5", TypeError), (None, TypeError), (True, TypeError),
                                          (10**400, ValueError)])
def test_bad_alpha_names_the_value(alpha, error):
    with pytest.raises(error, match=re.escape(repr(alpha))):
        _call_all("loss", _inputs(), alpha=alpha)


def test_unknown_rule_lists_the_choices():
    with pytest.raises(ValueError, match=r"'facet'.*'facenet', 'wen', 'pytorch'"):
        _call_all("loss", _inputs(), rule="facet")


@pytest.mark.parametrize("function", FUNCTIONS)
def test_unknown_backend_lists_the_choices(function):
    with pytest.raises(ValueError, match=r"'torch'.*'auto', 'numpy', 'numba', 'cuda'"):
        _call_all(function, _inputs(), backend="torch")


@pytest.mark.skipif("cuda" in BACKENDS, reason="a CUDA device (or the simulator) is available here")
@pytest.mark.parametrize("function", FUNCTIONS)
def test_gpu_backend_without_a_gpu_says_what_is_missing(function):
    with pytest.raises(centerkern.BackendUnavailableError, match=r"cuda.*(GPU|numba-cuda|driver|centerkern\[cuda\])") as caught:
        _call_all(function, _inputs(), backend="cuda")
    assert isinstance(caught.value, RuntimeError)


@pytest.mark.parametrize("function", ["loss", "scatter"])
def test_read_only_out(function):
    data = _inputs()
    out = data["centers"].copy()
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _call_all(function, data, out=out)


@pytest.mark.parametrize("function", ["loss", "scatter"])
def test_out_of_wrong_shape_or_dtype(function):
    data = _inputs()
    with pytest.raises(ValueError, match=r"out \(4, 4\), centers \(3, 4\)"):
        _call_all(function, data, out=np.zeros((4, 4), np.float32))
    with pytest.raises(TypeError, match=r"out float64, centers float32"):
        _call_all(function, data, out=np.zeros((3, 4), np.float64))
    with pytest.raises(TypeError, match="out must be an array"):
        _call_all(function, data, out=[[0.0] * 4] * 3)


def test_nan_and_inf_propagate_as_in_numpy():
    data = _inputs(np.float64)
    data["features"][1, 2] = np.nan
    data["centers"][0, 0] = np.inf
    results = [centerkern.center_loss(data["features"], data["labels"], data["centers"], 0.5, backend=b)
               for b in BACKENDS]
    for result in results:
        assert np.isnan(result.loss)
        np.testing.assert_array_equal(np.isnan(result.centers), np.isnan(results[0].centers))
        np.testing.assert_array_equal(np.isinf(result.centers), np.isinf(results[0].centers))
        assert np.isnan(result.centers[2, 2]) and not np.isnan(result.centers[1]).any()
