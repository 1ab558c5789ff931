"""The cuda backend's host path without a GPU: ``tests/host_path_stubbed.py`` in a pytest process
of its own (the stubbed driver patches torch, Numba and the driver bindings for good), and
``benchmarks/gpu_host_time.py`` at its smallest, which must run and report every case (its
figures are not checked here: tests never time)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                                reason="the stubbed driver runs the real cuda path, not the simulator")


def _environment():
    return {key: value for key, value in os.environ.items() if key not in ("NUMBA_ENABLE_CUDASIM",
                                                                           "CENTERKERN_CUDA_TILE")}


def test_host_path_under_the_stubbed_driver():
    completed = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                str(ROOT / "tests" / "host_path_stubbed.py")],
                               cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    assert " passed" in completed.stdout and "failed" not in completed.stdout and "skipped" not in completed.stdout


def test_host_time_benchmark_runs_and_reports_every_case(tmp_path):
    output = tmp_path / "host.json"
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_host_time.py"), "--quick",
                                "--output", str(output)], cwd=ROOT, env=_environment(), capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["launch_path"].startswith("direct") and report["quick"]
    cases = {(row["framework"], row["case"]): row for row in report["cases"]}
    for framework in ("torch", "numba"):
        for rule in ("facenet", "wen", "pytorch"):
            for sync in (False, True):
                row = cases[framework, f"center_loss {rule} sync={sync}"]
                # rule pytorch clears its fresh grad_centers too
                assert row["launches"] == 3 and row["memsets"] == (2 if rule == "pytorch" else 1)
                assert row["host_us"] > 0
                assert row["host_waits"] == (1 if sync else 0)
        assert cases[framework, "gather_centers sync=False"]["launches"] == 2
        assert cases[framework, "scatter_sub_update sync=False"]["launches"] == 3
        assert cases[framework, "center_loss facenet sync=False deterministic"]["launches"] == 3
    assert cases["numba", "center_loss facenet sync=False"]["pool_allocations"] == 3  # grad, loss, temporary
    assert cases["torch", "center_loss facenet sync=False"]["torch_allocations"] == 3  # the same, torch's
    assert cases["numpy", "center_loss facenet sync=False"]["launches"] == 0  # the CPU path, for comparison
