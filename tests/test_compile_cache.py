"""How the numba kernels are compiled and cached: one signature per dtype whatever the layout,
a cache filled ahead of time and loaded by a new process without compiling, a cache directory
chosen where it can be written, a call that never fails because of the cache, and a cached
kernel that is valid for the exact sources it was compiled from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from numba import types

import centerkern
from centerkern._backends import numba_cpu as kernels_numba
from centerkern._backends.numba_cpu import jit

from conftest import assert_matches

TIMEOUT_SECONDS = 600


def _environment(cache_dir) -> dict:
    environment = {**os.environ, "CENTERKERN_CACHE_DIR": str(cache_dir)}
    environment.pop("NUMBA_CACHE_DIR", None)
    return environment


# Run in a new process that found the cache full: every call must load, none compile.
_LOADS_WITHOUT_COMPILING = r"""
import json
import numpy as np
import centerkern
from centerkern._backends import numba_cpu as kernels_numba

cached_before = {entry.name: entry.is_cached("float32") for entry in kernels_numba.ENTRIES}
rng = np.random.default_rng(1)
errors = {}
for name, (batch_size, width, classes) in {"serial": (64, 8, 100), "parallel": (1024, 64, 10000)}.items():
    features = rng.standard_normal((batch_size, width)).astype(np.float32)
    centers = rng.standard_normal((classes, width)).astype(np.float32)
    labels = rng.integers(0, classes // 50, batch_size)  # repeated labels: both passes run
    for rule in centerkern.RULES:
        got = centerkern.center_loss(features, labels, centers, 0.5, rule=rule)
        want = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, backend="numpy")
        pair = (got.centers, want.centers) if want.grad_centers is None else (got.grad_centers, want.grad_centers)
        errors[f"{name} {rule}"] = float(np.abs(pair[0] - pair[1]).max() / (1 + np.abs(pair[1]).max()))
    gathered = centerkern.gather_centers(centers, labels)
    errors[f"{name} gather"] = float(np.abs(gathered - centers[labels]).max())
misses = {entry.name: sum(entry.dispatcher.stats.cache_misses.values()) for entry in kernels_numba.ENTRIES}
print(json.dumps({"cached_before": cached_before, "errors": errors, "misses": misses}))
"""


def test_the_compile_command_fills_the_cache_that_a_new_process_loads_without_compiling(tmp_path):
    compiled = subprocess.run([sys.executable, "-m", "centerkern", "compile", "--dtypes", "float32", "--jobs", "2"],
                              env=_environment(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert str(tmp_path) in compiled.stdout and "CENTERKERN_CACHE_DIR" in compiled.stdout
    for entry in kernels_numba.ENTRIES:
        assert entry.name in compiled.stderr  # its line of progress
    loaded = subprocess.run([sys.executable, "-c", _LOADS_WITHOUT_COMPILING], env=_environment(tmp_path),
                            capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert all(report["cached_before"].values()), report
    assert not any(report["misses"].values()), report  # nothing compiled in the new process
    assert max(report["errors"].values()) < 1e-5, report
    info = subprocess.run([sys.executable, "-m", "centerkern", "info"], env=_environment(tmp_path),
                          capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    assert info.returncode == 0, info.stderr
    assert f"{tmp_path}" in info.stdout and "compiled for     float32  (" in info.stdout


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_new_layouts_and_label_dtypes_compile_nothing(dtype):
    """After one C-ordered call, Fortran-ordered and read-only features, int32 and uint8 labels,
    a Fortran-ordered out and a strided grad_out run on the same compiled signature."""
    rng = np.random.default_rng(2)
    for batch_size, width, classes in ((60, 6, 40), (700, 40, 200)):  # serial and parallel regimes
        features = rng.standard_normal((batch_size, width)).astype(dtype)
        labels = rng.integers(0, classes // 4, batch_size)
        centers = rng.standard_normal((classes, width)).astype(dtype)
        centerkern.center_loss(features, labels, centers, 0.5)
        compiled = {entry.name: len(entry.dispatcher.signatures) for entry in kernels_numba.ENTRIES}
        read_only = features.copy()
        read_only.flags.writeable = False
        expected = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
        variants = [dict(features=np.asfortranarray(features)), dict(features=read_only),
                    dict(labels=labels.astype(np.int32)), dict(labels=labels.astype(np.uint8)),
                    dict(out=np.asfortranarray(centers)),
                    dict(grad_out=np.zeros((batch_size, 2 * width), dtype)[:, ::2])]
        for variant in variants:
            arguments = dict(features=features, labels=labels, centers=centers) | variant
            result = centerkern.center_loss(alpha=0.5, **arguments)
            assert_matches(result.centers, expected.centers, features, centers)
            assert_matches(result.grad, expected.grad, features, centers)
            if "out" in variant:
                assert result.centers is variant["out"]
            if "grad_out" in variant:
                assert result.grad is variant["grad_out"]
        assert {entry.name: len(entry.dispatcher.signatures) for entry in kernels_numba.ENTRIES} == compiled


def _double(values, out):
    for i in range(values.size):
        out[i] = 2 * values[i]


def _fresh_entry():
    return jit.Entry("double", _double, lambda dtype: types.void(types.Array(types.float64, 1, "C", readonly=True),
                                                       types.Array(types.float64, 1, "C")))


@pytest.fixture
def no_configured_cache(monkeypatch):
    """Neither CENTERKERN_CACHE_DIR nor NUMBA_CACHE_DIR, and a package directory that cannot be
    written (as in a read-only site-packages: here a path under /proc, which even root cannot
    create)."""
    monkeypatch.delenv("CENTERKERN_CACHE_DIR", raising=False)
    monkeypatch.setattr(jit.numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(jit._InTreeLocator, "get_cache_path", lambda self: "/proc/centerkern-cache/__pycache__")


def test_a_read_only_package_caches_in_the_platform_user_cache(no_configured_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(jit.sys, "platform", "linux")
    where, how = jit.cache_location(_double)
    assert how == "user cache"
    assert where.startswith(str(tmp_path / "centerkern"))


def test_with_no_writable_cache_a_call_compiles_in_memory_and_says_so_once(no_configured_cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/centerkern-user-cache")
    monkeypatch.setenv("HOME", "/proc/centerkern-home")
    monkeypatch.setattr(jit, "_cache_problems", [])
    where, how = jit.cache_location(_double)
    assert where is None and "none writable" in how
    entry = _fresh_entry()
    with pytest.warns(RuntimeWarning, match="no kernel cache directory can be written"):
        kernel = entry.compiled(np.float64)
    out = np.empty(3)
    kernel(np.arange(3.0), out)
    np.testing.assert_array_equal(out, [0.0, 2.0, 4.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every compile
        _fresh_entry().compiled(np.float64)


def test_a_cache_that_cannot_be_written_does_not_fail_the_call(monkeypatch, tmp_path):
    monkeypatch.setenv("CENTERKERN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(jit, "_cache_problems", [])

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(jit.caching.FunctionCache, "save_overload", refuse)
    entry = _fresh_entry()
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        kernel = entry.compiled(np.float64)
    out = np.empty(2)
    kernel(np.ones(2), out)
    np.testing.assert_array_equal(out, [2.0, 2.0])


def test_a_cached_kernel_is_valid_for_the_sources_of_the_whole_package(tmp_path, monkeypatch):
    """The stamp covers every module a kernel is compiled from, so a change to a function an
    entry calls, in another file, invalidates the cached entry (Numba's own stamp covers the
    entry's file only). Those modules include the XLA handler's and the rules'."""
    monkeypatch.setattr(jit, "_PACKAGE", tmp_path)
    sources = tuple(tmp_path / name for name in ("step.py", "passes.py"))
    for path in sources:
        path.write_text(f"# {path.name}\n")
    before = jit.sources_stamp.__wrapped__(sources)
    (tmp_path / "passes.py").write_text("# passes.py, changed\n")
    assert jit.sources_stamp.__wrapped__(sources) != before
    assert jit._InTreeLocator.get_source_stamp(None) == jit.sources_stamp()
    names = {path.name for path in jit.KERNEL_SOURCES}
    assert {"step.py", "passes.py", "rules.py", "xla_native.py", "xla_ffi.py"} <= names


def test_the_first_call_bench_measures_each_case_in_a_fresh_process(monkeypatch):
    """``bench --first-call`` at its cheapest: the serial case (with the import and the warm case
    it carries) and the new layouts, one run each; the report holds every figure and goal."""
    from centerkern._cli import first_call as _first_call

    kept = ("import", "serial", "new layouts", "warm")
    monkeypatch.setattr(_first_call, "CASES", tuple(case for case in _first_call.CASES if case[0] in kept))
    report = _first_call.measure(repeats=1)
    assert set(report["cases"]) == set(kept)
    for case in kept:
        measured = report["cases"][case]
        assert len(measured["runs_seconds"]) == 1 and measured["median_seconds"] > 0
        assert measured["version"].endswith(os.path.join("centerkern", "__init__.py"))
    assert set(report["cases"]["new layouts"]["each"]) == {"Fortran-ordered features", "int32 labels",
                                                           "read-only features", "Fortran-ordered out"}
    assert len(report["goals"]) == len(kept)
    assert all(set(goal) == {"value", "target", "met"} for goal in report["goals"].values())


def test_an_earlier_revision_is_exported_beside_this_one(tmp_path):
    """What ``--against`` and benchmarks/compare_revisions.py run: the package of a git revision,
    importable under another name next to this one."""
    from centerkern._cli import reports as _reports

    revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.dirname(__file__))).stdout.strip()
    parent = _reports.export_revision(revision, tmp_path, "centerkern_exported")
    program = ("import sys; sys.path.insert(0, sys.argv[1]); import centerkern_exported._backends.numba_cpu as k; "
               "print(k.__file__)")
    exported = subprocess.run([sys.executable, "-c", program, str(parent)], capture_output=True, text=True,
                              timeout=TIMEOUT_SECONDS, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.strip().startswith(str(tmp_path / "centerkern_exported"))
