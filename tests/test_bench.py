"""``python -m centerkern bench`` at tiny sizes: every implementation is timed or reported absent
with a reason, the JSON holds what the README's table needs, and the peers compute what
centerkern computes (a benchmark of a wrong peer would be worthless)."""

import importlib.util
import json

import numpy as np
import pytest

import centerkern
from centerkern._cli import bench as _bench
from centerkern._cli import alternatives as _peers

from conftest import assert_matches

TINY_SWEEPS = {"B": ([16, 48], lambda b: _bench.Size(f"B={b}", b, 8, 30)),
               "K": ([10, 300], lambda k: _bench.Size(f"K={k}", 32, 8, k))}


def test_bench_runs_and_records_every_implementation(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_bench, "SWEEPS", TINY_SWEEPS)
    output = tmp_path / "bench.json"
    assert _bench.main(["--sizes", "--size", "40,8,12", "--sweeps", "B", "K", "--repeats", "3", "--no-compile",
                        "--no-compile-cost", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["versions"]["numba"] and report["threads"]["numba"] >= 1 and report["date"]
    measured = report["sizes"]["custom 40,8,12"]
    names = set(_peers.implementations(with_compile=False))
    for operation in _bench.OPERATIONS:
        timed = measured["median_seconds"][operation]
        absent = measured["absent"].get(operation, {})
        assert set(timed) | set(absent) == names  # nothing silently dropped
        assert all(seconds > 0 for seconds in timed.values())
        assert all(reason for reason in absent.values())
        assert {"centerkern numba", _peers.FLOOR} <= set(timed)
    assert [point["B"] for point in report["sweeps"]["B"]] == [16, 48]
    assert "centerkern numba" in report["sweeps"]["K"][0]["median_seconds"]["step facenet"]
    printed = capsys.readouterr().out
    assert "scatter, custom 40,8,12" in printed and "/ torch eager" in printed
    if importlib.util.find_spec("matplotlib"):
        assert list(tmp_path.glob("bench-*.png"))


@pytest.mark.parametrize("operation", _bench.OPERATIONS)
def test_every_peer_computes_what_centerkern_computes(operation):
    """Run each available peer once: the centers it keeps (and for a step, its loss and grad)
    must equal the reference's, or the benchmark would compare against the wrong thing."""
    features, labels, centers, updates = _bench.make_inputs(_bench.Size("check", 64, 6, 9, hot_share=0.5))
    if operation == "scatter":
        expected_centers = centerkern.scatter_sub_update(centers, labels, updates, backend="numpy")
    else:
        expected = centerkern.center_loss(features, labels, centers, _peers.ALPHA, rule=operation.split()[1],
                                          backend="numpy")
        expected_centers = expected.centers
    checked = []
    for name, make in _peers.implementations(with_compile=False).items():
        try:
            prepared = make(features, labels, centers, updates, operation, _peers.ALPHA)
        except _peers.Absent:
            continue
        result = prepared.run()
        if prepared.centers is None:  # the floor computes nothing
            continue
        assert_matches(prepared.centers(), expected_centers, features, centers, updates)
        if operation != "scatter":
            if isinstance(result, centerkern.CenterLossResult):  # the peers return (loss, grad[, grad_centers])
                result = (result.loss, result.grad, result.grad_centers)
            assert float(np.asarray(result[0])) == pytest.approx(expected.loss, rel=1e-5), name
            assert_matches(np.asarray(result[1]), expected.grad, features, centers)
            if expected.grad_centers is not None:
                assert_matches(np.asarray(result[2]), expected.grad_centers, features, centers)
        checked.append(name)
    assert {"centerkern numba", "centerkern numpy (reference)", "numpy sort + reduceat"} <= set(checked)


def test_adapter_benchmark_runs_and_its_pairs_agree(tmp_path):
    """benchmarks/adapters.py at a toy size: every adapter and its framework-native twin compute
    the same step (the script checks loss, grad and centers before timing); timings not asserted."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "adapters.py"
    out = tmp_path / "adapters.json"
    completed = subprocess.run([sys.executable, str(script), "--size", "48,8,30", "--repeats", "2", "--out", str(out)],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    groups = json.loads(out.read_text())["groups"]
    assert set(groups) == {"torch wen step", "torch pytorch-rule step", "JAX wen step (jit)",
                           "TensorFlow facenet step (tf.function)"}
    assert all(len(timed) >= 2 for timed in groups.values())


def test_codebook_benchmark_runs_and_records_the_skipped_peer(tmp_path):
    """benchmarks/codebooks.py --quick: every case checks that both sides compute the same codes,
    quantized rows and codebook before timing; a case over --peer-memory-limit runs ours only and
    says why the peer was not run. Timings not asserted."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("vector_quantize_pytorch")
    pytest.importorskip("sklearn")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "codebooks.py"
    out = tmp_path / "codebooks.json"
    # 0.0003 GiB: the one-hot of N=512, K=256 (0.5 MiB) is over it, that of K=64 under
    completed = subprocess.run([sys.executable, str(script), "--quick", "--no-memory", "--peer-memory-limit", "0.0003",
                                "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    run, skipped = report["ema"]["ema N=512 K=64 D=16"], report["ema"]["ema N=512 K=256 D=16"]
    assert set(run["peer / centerkern"]) == {"update", "forward+update"}
    assert skipped["vector-quantize-pytorch"].startswith("not run: the one-hot would be")
    assert set(skipped["median_ms"]) == {"centerkern forward+update", "centerkern update"}
    assert {case.split()[-1] for case in report["kmeans"]} == {"float32", "float64"}
    assert all("update" in case["scikit-learn / centerkern"] for case in report["kmeans"].values())
    assert report["goals"] and all(set(goal) >= {"value", "target", "met"} for goal in report["goals"].values())
