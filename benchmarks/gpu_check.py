"""Correctness and speed of the cuda backend on a real GPU, in one command.

    python benchmarks/gpu_check.py benchmarks/results/gpu-<date>.json

1. Property checks on the device against the numpy reference: random shapes, hot labels, both
   dtypes, int32 and int64 labels, every rule, default and deterministic mode; numba device
   arrays, CuPy arrays and torch CUDA tensors in, ``out=`` written into the caller's own buffer
   (same pointer); deterministic mode bitwise identical over 3 runs on a hot-label batch.
2. Timings with CUDA events (warm-up, then the median of repeated calls) of the fused facenet
   step and of the scatter, at B=8192, D=512, K=100000 and B=65536, D=512, K=1000000, float32
   (uniform labels, and a hot-label batch with 90% of the rows in 3 classes), against torch
   eager (``index_select`` + ``index_add_``) and against a device-to-device copy moving the
   bytes the step must move at least (read the features and the touched center rows, write the
   grad and those rows): the bandwidth floor.

Every figure goes to the JSON file named on the command line. Under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) use ``--small``: tiny sizes, so the script itself is tested
without a GPU (its timings then mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402
from numba import cuda  # noqa: E402

import centerkern  # noqa: E402
import centerkern.kernels_cuda  # noqa: E402

RULES = centerkern.RULES
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}
FULL_SIZES = [(8192, 512, 100_000), (65536, 512, 1_000_000)]
SMALL_SIZES = [(24, 6, 10)]


def optional(name):
    try:
        return __import__(name)
    except Exception:
        return None


torch = optional("torch")
cupy = optional("cupy")
TORCH_CUDA = torch is not None and torch.cuda.is_available()
CUPY_CUDA = False
if cupy is not None:
    try:
        CUPY_CUDA = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        CUPY_CUDA = False


def host(array):
    if hasattr(array, "copy_to_host"):
        return array.copy_to_host()
    if TORCH_CUDA and isinstance(array, torch.Tensor):
        return array.cpu().numpy()
    if CUPY_CUDA and isinstance(array, cupy.ndarray):
        return cupy.asnumpy(array)
    return np.asarray(array)


def close(got, reference, *inputs):
    got, reference = host(got), host(reference)
    tolerance = TOLERANCE[got.dtype.type]
    scale = max([1e-300] + [float(np.max(np.abs(a), initial=0.0)) for a in (reference, *inputs)])
    return got.shape == reference.shape and bool(np.allclose(got, reference, rtol=tolerance, atol=tolerance * scale))


def random_case(rng, batch, width, classes, dtype, hot_share):
    hot = rng.choice(classes, size=min(3, classes), replace=False)
    labels = np.where(rng.random(batch) < hot_share, rng.choice(hot, batch), rng.integers(0, classes, batch))
    return (rng.standard_normal((batch, width)).astype(dtype), labels,
            rng.standard_normal((classes, width)).astype(dtype), rng.standard_normal((batch, width)).astype(dtype))


def wrap(array, kind):
    """The same values as a device array of ``kind``."""
    if kind == "numba":
        return cuda.to_device(np.ascontiguousarray(array))
    if kind == "cupy":
        return cupy.asarray(array)
    return torch.as_tensor(np.ascontiguousarray(array), device="cuda")


def pointer(array):
    interface = getattr(array, "__cuda_array_interface__", None) or array.__array_interface__  # simulator
    return interface["data"][0]


def check_properties(rng, cases, small):
    """Random cases on the device against the numpy reference; returns a list of failures."""
    kinds = ["numba"] + (["cupy"] if CUPY_CUDA else []) + (["torch"] if TORCH_CUDA else [])
    failures, checked = [], 0
    for case in range(cases):
        batch = int(rng.integers(0, 40 if small else 3000))
        width = int(rng.integers(1, 9 if small else 300))
        classes = int(rng.integers(1, 12 if small else 5000))
        dtype = [np.float32, np.float64][case % 2]
        hot_share = [0.0, 0.9, 1.0][case % 3]
        rule = RULES[case % 3]
        deterministic = bool(case % 4 >= 2)
        kind = kinds[case % len(kinds)]
        label_dtype = [np.int64, np.int32][case % 2]
        features, labels, centers, updates = random_case(rng, batch, width, classes, dtype, hot_share)
        labels = labels.astype(label_dtype)
        checked += 1
        description = {"case": case, "B": batch, "D": width, "K": classes, "dtype": np.dtype(dtype).name,
                       "rule": rule, "deterministic": deterministic, "arrays": kind}
        try:
            problems = check_case(features, labels, centers, updates, rule, deterministic, kind)
        except Exception as error:  # a crash is a finding too; keep checking the other cases
            problems = [f"raised {type(error).__name__}: {error}"]
        if problems:
            failures.append({**description, "problems": problems})
    return checked, failures


def check_case(features, labels, centers, updates, rule, deterministic, kind):
    reference = centerkern.center_loss(features, labels, centers, 0.7, rule=rule, backend="numpy")
    device_centers = wrap(centers, kind)
    before = pointer(device_centers)
    result = centerkern.center_loss(wrap(features, kind), wrap(labels, kind), device_centers, 0.7, rule=rule,
                                    out=device_centers, deterministic=deterministic)
    problems = []
    if result.centers is not device_centers or pointer(device_centers) != before:
        problems.append("out= did not write into the caller's buffer")
    if not np.isclose(result.loss, reference.loss, rtol=1e-9, atol=1e-300):
        problems.append(f"loss {result.loss} != {reference.loss}")
    if not close(result.grad, reference.grad, features, centers):
        problems.append("grad")
    if not close(device_centers, reference.centers, features, centers):
        problems.append("centers")
    if rule == "pytorch" and not close(result.grad_centers, reference.grad_centers, features, centers):
        problems.append("grad_centers")
    expected = centerkern.scatter_sub_update(centers, labels, updates, backend="numpy")
    scatter_target = wrap(centers, kind)
    centerkern.scatter_sub_update(scatter_target, wrap(labels, kind), wrap(updates, kind), out=scatter_target,
                                  deterministic=deterministic)
    if not close(scatter_target, expected, centers, updates):
        problems.append("scatter")
    if not np.array_equal(host(centerkern.gather_centers(wrap(centers, kind), wrap(labels, kind))), centers[labels]):
        problems.append("gather")
    return problems


def check_deterministic(rng, batch, width, classes):
    """Deterministic mode: bitwise identical over 3 runs on a hot-label batch; the default mode's
    spread over the same runs is reported beside it."""
    features, labels, centers, updates = random_case(rng, batch, width, classes, np.float32, 0.9)
    features *= np.float32(100.0) ** rng.uniform(-1, 1, features.shape).astype(np.float32)
    report = {}
    for deterministic in (True, False):
        runs = []
        for _ in range(3):
            d_centers = cuda.to_device(centers)
            result = centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), d_centers, 0.5,
                                            out=d_centers, deterministic=deterministic)
            d_scatter = cuda.to_device(centers)
            centerkern.scatter_sub_update(d_scatter, cuda.to_device(labels), cuda.to_device(updates), out=d_scatter,
                                          deterministic=deterministic)
            runs.append((result.loss, host(result.grad), host(d_centers), host(d_scatter)))
        identical = all(run[0] == runs[0][0] and all(np.array_equal(a, b) for a, b in zip(run[1:], runs[0][1:]))
                        for run in runs[1:])
        report["deterministic" if deterministic else "default"] = {"bitwise_identical_over_3_runs": identical}
    reference = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    report["deterministic"]["equals_reference"] = close(runs[0][2], reference.centers, features, centers)
    return report


def event_median(run, repeats, warmup=3):
    """Median milliseconds of ``run()`` between two CUDA events."""
    for _ in range(warmup):
        run()
    cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = cuda.event(), cuda.event()
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_size(rng, batch, width, classes, hot_share, repeats):
    features, labels, centers, updates = random_case(rng, batch, width, classes, np.float32, hot_share)
    touched = int(np.unique(labels).size)
    floor_bytes = 4 * 2 * (batch * width + touched * width)  # features + grad, touched rows read + written
    d_features, d_labels, d_updates = cuda.to_device(features), cuda.to_device(labels), cuda.to_device(updates)
    d_centers = cuda.to_device(centers)
    figures = {"B": batch, "D": width, "K": classes, "hot_share": hot_share, "touched_classes": touched,
               "floor_bytes": floor_bytes, "median_ms": {}}
    times = figures["median_ms"]
    times["centerkern step"] = event_median(
        lambda: centerkern.center_loss(d_features, d_labels, d_centers, 0.95, out=d_centers), repeats)
    times["centerkern step deterministic"] = event_median(
        lambda: centerkern.center_loss(d_features, d_labels, d_centers, 0.95, out=d_centers, deterministic=True),
        repeats)
    times["centerkern scatter"] = event_median(
        lambda: centerkern.scatter_sub_update(d_centers, d_labels, d_updates, out=d_centers), repeats)
    times["centerkern scatter deterministic"] = event_median(
        lambda: centerkern.scatter_sub_update(d_centers, d_labels, d_updates, out=d_centers, deterministic=True),
        repeats)
    half = floor_bytes // 2 // 4  # a copy reads and writes: half the floor's bytes each way
    source, destination = cuda.device_array(half, np.float32), cuda.device_array(half, np.float32)
    times["device-to-device copy, floor bytes"] = event_median(lambda: destination.copy_to_device(source), repeats)
    if TORCH_CUDA:
        t_features = torch.as_tensor(features, device="cuda")
        t_labels = torch.as_tensor(labels, device="cuda")
        t_updates = torch.as_tensor(updates, device="cuda")
        t_centers = torch.as_tensor(centers, device="cuda")
        scale = 2.0 / features.size

        def torch_step():
            differences = t_features - t_centers.index_select(0, t_labels)
            loss = differences.square().mean()
            grad = differences * scale
            t_centers.index_add_(0, t_labels, differences, alpha=0.05)
            return loss, grad

        times["torch eager step (no .item())"] = event_median(torch_step, repeats)
        times["torch eager step + loss.item()"] = event_median(lambda: torch_step()[0].item(), repeats)
        times["torch index_add_ scatter"] = event_median(
            lambda: t_centers.index_add_(0, t_labels, t_updates, alpha=-1.0), repeats)
    step = times["centerkern step"]
    figures["ratios"] = {
        "step / copy floor": step / times["device-to-device copy, floor bytes"],
        "deterministic step / default step": times["centerkern step deterministic"] / step,
        "deterministic scatter / default scatter":
            times["centerkern scatter deterministic"] / times["centerkern scatter"],
    }
    if TORCH_CUDA:
        figures["ratios"]["torch eager step / centerkern step"] = times["torch eager step (no .item())"] / step
        figures["ratios"]["torch index_add_ / centerkern scatter"] = (
            times["torch index_add_ scatter"] / times["centerkern scatter"])
    figures["achieved_step_TBps"] = floor_bytes / (step * 1e-3) / 1e12
    return figures


def sweep_launch_shapes(rng, batch, width, classes, repeats, shapes):
    """The fused step's median time for a few (tile rows, columns per block) launch shapes, on a
    uniform and a hot-label batch: the data behind the defaults in kernels_cuda."""
    from centerkern import kernels_cuda

    defaults = (kernels_cuda.TILE_ROWS, kernels_cuda.COLUMNS_PER_BLOCK)
    results = []
    for hot_share in (0.0, 0.9):
        features, labels, centers, _ = random_case(rng, batch, width, classes, np.float32, hot_share)
        d_features, d_labels, d_centers = cuda.to_device(features), cuda.to_device(labels), cuda.to_device(centers)
        for tile_rows, columns in shapes:
            kernels_cuda.TILE_ROWS, kernels_cuda.COLUMNS_PER_BLOCK = tile_rows, columns
            for deterministic in (False, True):
                median = event_median(lambda: centerkern.center_loss(
                    d_features, d_labels, d_centers, 0.95, out=d_centers, deterministic=deterministic), repeats)
                results.append({"hot_share": hot_share, "tile_rows": tile_rows, "columns_per_block": columns,
                                "deterministic": deterministic, "median_ms": median})
                print(f"  hot_share={hot_share} tile_rows={tile_rows:3d} columns={columns:4d} "
                      f"deterministic={deterministic!s:5s} {median:9.4f} ms", flush=True)
    kernels_cuda.TILE_ROWS, kernels_cuda.COLUMNS_PER_BLOCK = defaults
    return results


def host_overhead(rng, batch, width, classes, calls=20):
    """Where the host time of a call goes: device allocation, a tiny launch, and the top of a
    profile of ``center_loss`` on device arrays (these decide the small-batch times)."""
    import cProfile
    import io
    import pstats

    figures = {}
    start = time.perf_counter()
    for _ in range(calls):
        cuda.device_array((batch, width), np.float32)
    cuda.synchronize()
    figures["device_array(B, D) seconds"] = (time.perf_counter() - start) / calls
    target = cuda.device_array(1, np.int64)
    centerkern.kernels_cuda._fill_vector[1, 1](target, 0)
    cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        centerkern.kernels_cuda._fill_vector[1, 1](target, 0)
    cuda.synchronize()
    figures["tiny kernel launch seconds"] = (time.perf_counter() - start) / calls
    features, labels, centers, _ = random_case(rng, batch, width, classes, np.float32, 0.0)
    d_features, d_labels, d_centers = cuda.to_device(features), cuda.to_device(labels), cuda.to_device(centers)
    centerkern.center_loss(d_features, d_labels, d_centers, 0.95, out=d_centers)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(calls):
        centerkern.center_loss(d_features, d_labels, d_centers, 0.95, out=d_centers)
    profiler.disable()
    figures["center_loss host seconds per call"] = (time.perf_counter() - start) / calls
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    figures["profile (tottime)"] = text.getvalue()
    return figures


def first_call_seconds():
    """Compile cost of this process's first fused step (cold or cached, as it happens)."""
    features = cuda.to_device(np.ones((4, 3), np.float32))
    labels = cuda.to_device(np.arange(4) % 2)
    centers = cuda.to_device(np.zeros((2, 3), np.float32))
    start = time.perf_counter()
    centerkern.center_loss(features, labels, centers, 0.5, out=centers)
    return time.perf_counter() - start


def save(report, path):
    """Written after every stage, so that a run cut short still leaves what it measured."""
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="path of the JSON file with every figure")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for the simulator")
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(2026)

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(), "python": platform.python_version(),
        "numpy": np.__version__, "numba": numba.__version__, "centerkern": centerkern.__version__,
        "simulator": os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
        "torch": getattr(torch, "__version__", None), "cupy": getattr(cupy, "__version__", None),
    }
    if not report["simulator"]:
        device = cuda.get_current_device()
        report["gpu"] = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
        report["compute_capability"] = list(device.compute_capability)
    report["first_call_seconds"] = first_call_seconds()
    print(f"first fused step in this process: {report['first_call_seconds']:.2f} s", flush=True)

    overhead = host_overhead(rng, *((24, 6, 10) if args.small else FULL_SIZES[0]))
    report["host_overhead"] = overhead
    print({name: value for name, value in overhead.items() if "profile" not in name}, flush=True)
    print(overhead["profile (tottime)"], flush=True)
    save(report, args.output)

    checked, failures = check_properties(rng, 12 if args.small else args.cases, args.small)
    report["property_checks"] = {"cases": checked, "failures": failures}
    print(f"property checks: {checked} cases, {len(failures)} failures", flush=True)
    for failure in failures:
        print("  FAILED", failure, flush=True)
    report["deterministic_check"] = check_deterministic(rng, *((60, 5, 6) if args.small else (65536, 256, 1000)))
    print("deterministic check:", report["deterministic_check"], flush=True)
    save(report, args.output)

    sweep_size = (24, 6, 10) if args.small else FULL_SIZES[-1]
    print(f"\nlaunch shapes, fused step, B={sweep_size[0]} D={sweep_size[1]} K={sweep_size[2]}:", flush=True)
    shapes = [(4, 4), (2, 8)] if args.small else [(64, 128), (32, 128), (32, 64), (16, 64), (16, 32), (8, 64)]
    report["launch_shape_sweep"] = sweep_launch_shapes(rng, *sweep_size, 1 if args.small else 15, shapes)
    save(report, args.output)

    report["timings"] = []
    sizes = SMALL_SIZES if args.small else FULL_SIZES
    for batch, width, classes in sizes:
        for hot_share in (0.0, 0.9):
            figures = time_size(rng, batch, width, classes, hot_share, 3 if args.small else args.repeats)
            report["timings"].append(figures)
            save(report, args.output)
            print(f"\nB={batch} D={width} K={classes} hot_share={hot_share} (touched {figures['touched_classes']}), "
                  f"float32, median ms of {args.repeats}:", flush=True)
            for name, value in figures["median_ms"].items():
                print(f"  {name:40s} {value:9.4f} ms", flush=True)
            for name, value in figures["ratios"].items():
                print(f"  {name:40s} {value:9.2f}", flush=True)
    save(report, args.output)
    print(f"\nwritten: {args.output}")
    return 1 if failures or not report["deterministic_check"]["deterministic"]["bitwise_identical_over_3_runs"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
