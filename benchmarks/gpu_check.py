"""Correctness and speed of the cuda backend on a real GPU, in one command.

    python benchmarks/gpu_check.py benchmarks/results/gpu-<date>.json [--small]

Correctness, on the device, first (any failure makes ``main`` return 1):

* property checks against the ``numpy`` backend, within SPEC's tolerance: random shapes (B=0
  included), hot labels, float32 and float64, int32 and int64 labels, every rule, default and
  deterministic mode, ``sync=True`` and ``sync=False``, Numba / CuPy / torch arrays in;
  ``out=`` written into the caller's own buffer (same pointer); the loss a 0-d float64 array of
  the caller's framework;
* a bad label: with ``sync=True`` the call raises ``IndexError`` and writes nothing; with
  ``sync=False`` it returns, its loss is NaN, ``centerkern.cuda.check_errors()`` raises (once),
  and nothing is written;
* deterministic mode bitwise identical over 3 runs on a hot-label batch (the default mode's
  result beside it, for information);
* the seconds of the process's first step (compiling, or loading the kernels from Numba's cache).

Before the timings, torch eager's step is checked to compute what centerkern's does
(``torch_eager_agrees``, for information: a faster wrong peer would prove nothing).

Speed, float32, at B=8192, D=512, K=1e5 and B=65536, D=512, K=1e6 (the latter also with 90% of
the batch in 3 classes), on torch CUDA tensors, rule facenet, alpha 0.95:

* copy bandwidth: CUDA events around 20 back-to-back device-to-device copies (torch ``copy_``)
  of 1 GiB; a copy reads and writes its bytes, so it moves twice its size;
* the floor of an operation: the bytes it must move, over that bandwidth. A step reads the
  features, writes the grad, reads and writes each touched center row; a scatter reads the
  updates, reads and writes each touched row (the labels, 1/256 of the features' bytes at
  D=512, are left out);
* time per call in a training loop: CUDA events around 100 back-to-back calls with no host
  synchronisation between them (``sync=False``), over 100; for centerkern's step (default and
  deterministic), its scatter, torch eager's step (``index_select`` + the rule's math +
  ``index_add_``) and scatter (``index_add_``), and centerkern's step captured in a CUDA graph
  (``torch.cuda.graph``) and replayed 100 times. Each loop is measured ``--repeats`` times,
  the contenders interleaved; the JSON keeps every run and their median;
* host overhead per call: the wall time (``time.perf_counter``) of those 100 calls' launches,
  before the final synchronise, over 100;
* host time per call with the real driver (``host_time``'s cases at B=64, D=8, K=100: thread
  CPU time, in units of 1000 trivial Python calls, the quietest of many rounds), against the
  same cases with the driver stubbed (``gpu_host_time.py``, in a process of its own on the same
  machine): the real driver's time is what the stub leaves out;
* memory: in a fresh process, the device memory in use outside torch's allocator
  (``cuMemGetInfo`` against ``torch.cuda.memory_reserved``) before and after 100 steps at
  B=65536, D=2048, K=1e5: its growth is what centerkern keeps outside the caller's allocator.

The JSON ends with ``goals``: for each performance goal (``GOALS``), its value, its target and
whether it is met. The JSON is written after every stage, so that a run cut short keeps what it
measured.

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) use ``--small``: tiny sizes on Numba
device arrays, so that the script itself is tested without a GPU. There the parts that need
torch CUDA (torch eager, graph capture, the bandwidth) are skipped, with the reason in the JSON,
and device times are ``null``: the simulator's events record no time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    # tiles of 4 rows and 4 columns (read when the kernels are imported) make tiny inputs span
    # many tiles and column blocks, as in the test suite
    os.environ.setdefault("CENTERKERN_CUDA_TILE", "4,4")

from numba import cuda  # noqa: E402

import centerkern  # noqa: E402
import centerkern.cuda  # noqa: E402
from centerkern._cli.reports import provenance  # noqa: E402
from centerkern.cuda import kernels  # noqa: E402
from centerkern.testing import TOLERANCE as PEER_TOLERANCE  # noqa: E402
from centerkern.testing import BACKEND_TOLERANCE  # noqa: E402
from centerkern.testing import close_within as close  # noqa: E402


def _optional(name):
    try:
        return __import__(name)
    except Exception:  # missing, or a framework that fails to load on this machine
        return None


torch = _optional("torch")
cupy = _optional("cupy")
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
TORCH_CUDA = torch is not None and torch.cuda.is_available()
CUPY_CUDA = False
if cupy is not None:
    try:
        CUPY_CUDA = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        CUPY_CUDA = False
# the arrays the timings use: what a training loop passes, torch tensors, where there are any
TIMED_KIND = "torch" if TORCH_CUDA else "numba"
NO_TORCH_CUDA = "needs torch with CUDA" + (" (the simulator has none)" if SIMULATED else "")

ALPHA = 0.95  # facenet's training value
BANDWIDTH_BYTES = 2**30  # the copy the bandwidth is measured with (at least 1 GB)
BANDWIDTH_COPIES = 20

# role -> (B, D, K, share of the batch in 3 classes); --small keeps the roles, at tiny sizes
FULL_SIZES = {"B8192": (8192, 512, 100_000, 0.0), "B65536": (65536, 512, 1_000_000, 0.0),
              "B65536_hot": (65536, 512, 1_000_000, 0.9)}
SMALL_SIZES = {"B8192": (8, 4, 10, 0.0), "B65536": (16, 4, 40, 0.0), "B65536_hot": (16, 4, 40, 0.9)}


# --------------------------------------------------------------------------- arrays


def labels_with_hot_classes(rng, batch, classes, hot_share):
    """int64 labels: each row in one of 3 hot classes with probability ``hot_share``, else uniform."""
    hot = rng.choice(classes, size=min(3, classes), replace=False)
    return np.where(rng.random(batch) < hot_share, rng.choice(hot, batch), rng.integers(0, classes, batch))


def random_case(rng, batch, width, classes, dtype, hot_share):
    """(features, labels, centers, updates) as NumPy arrays."""
    labels = labels_with_hot_classes(rng, batch, classes, hot_share)
    return (rng.standard_normal((batch, width)).astype(dtype), labels,
            rng.standard_normal((classes, width)).astype(dtype), rng.standard_normal((batch, width)).astype(dtype))


def to_device(array, kind):
    """The same values as a device array of ``kind`` ("numba", "cupy" or "torch")."""
    array = np.ascontiguousarray(array)
    if kind == "numba":
        return cuda.to_device(array)
    if kind == "cupy":
        return cupy.asarray(array)
    return torch.as_tensor(array, device="cuda")


def to_host(array):
    if hasattr(array, "copy_to_host"):  # a Numba device array, the simulator's included
        return array.copy_to_host()
    if torch is not None and isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    if cupy is not None and isinstance(array, cupy.ndarray):
        return cupy.asnumpy(array)
    return np.asarray(array)


def kind_of(array):
    if torch is not None and isinstance(array, torch.Tensor):
        return "torch" if array.is_cuda else "torch (host)"
    if cupy is not None and isinstance(array, cupy.ndarray):
        return "cupy"
    return "numba" if hasattr(array, "copy_to_host") else type(array).__name__


def pointer(array):
    # the simulator's device arrays are NumPy arrays underneath, with NumPy's interface
    interface = getattr(array, "__cuda_array_interface__", None) or array.__array_interface__
    return interface["data"][0]


def close_to_reference(got, expected, *inputs):
    """Equal to the numpy backend within SPEC's tolerance for the dtype."""
    got = to_host(got)
    return close(got, expected, BACKEND_TOLERANCE[np.dtype(got.dtype)], *inputs)


# --------------------------------------------------------------------------- correctness


def device_kinds():
    return ["numba"] + (["cupy"] if CUPY_CUDA else []) + (["torch"] if TORCH_CUDA else [])


def check_properties(rng, cases, small):
    """Random cases on the device against the numpy backend. Returns (cases checked, failures)."""
    choices = list(itertools.product([np.float32, np.float64], [np.int64, np.int32], centerkern.RULES,
                                     [False, True], device_kinds(), [True, False]))
    rng.shuffle(choices)  # independent attributes, not one cycle shared by all
    failures = []
    for case in range(cases):
        dtype, label_dtype, rule, deterministic, kind, sync = choices[case % len(choices)]
        batch = 0 if case == 0 else int(rng.integers(1, 20 if small else 3000))  # an empty batch, always
        width = int(rng.integers(1, 6 if small else 300))
        classes = int(rng.integers(1, 12 if small else 5000))
        hot_share = [0.0, 0.9, 1.0][case % 3]
        features, labels, centers, updates = random_case(rng, batch, width, classes, dtype, hot_share)
        labels = labels.astype(label_dtype)
        description = {"case": case, "B": batch, "D": width, "K": classes, "dtype": np.dtype(dtype).name,
                       "labels": np.dtype(label_dtype).name, "hot_share": hot_share, "rule": rule,
                       "deterministic": deterministic, "arrays": kind, "sync": sync}
        try:
            problems = check_case(features, labels, centers, updates, rule, deterministic, kind, sync)
        except Exception as error:  # a crash is a finding too; keep checking the other cases
            problems = [f"raised {type(error).__name__}: {error}"]
        if problems:
            failures.append({**description, "problems": problems})
    return cases, failures


def check_case(features, labels, centers, updates, rule, deterministic, kind, sync):
    """One case: the step, the scatter and the gather on ``kind`` arrays; the problems found."""
    problems = []
    reference = centerkern.center_loss(features, labels, centers, 0.7, rule=rule, backend="numpy")
    device_centers = to_device(centers, kind)
    before = pointer(device_centers)
    result = centerkern.center_loss(to_device(features, kind), to_device(labels, kind), device_centers, 0.7,
                                    rule=rule, out=device_centers, deterministic=deterministic, sync=sync)
    if not sync:
        centerkern.cuda.check_errors()  # good labels: must raise nothing
    if result.centers is not device_centers or pointer(device_centers) != before:
        problems.append("out= did not write into the caller's buffer")
    loss_dtype = str(getattr(result.loss, "dtype", "")).removeprefix("torch.")
    if kind_of(result.loss) != kind or tuple(result.loss.shape) != () or loss_dtype != "float64":
        problems.append(f"loss is a {kind_of(result.loss)} array of shape {tuple(result.loss.shape)} and dtype "
                        f"{loss_dtype}, not a 0-d float64 {kind} array")
    if kind_of(result.grad) != kind:
        problems.append(f"grad is a {kind_of(result.grad)} array, not a {kind} one")
    loss = float(to_host(result.loss))
    if not np.isclose(loss, reference.loss, rtol=1e-9, atol=1e-300):  # both accumulate in float64
        problems.append(f"loss {loss} != {reference.loss}")
    if not close_to_reference(result.grad, reference.grad, features, centers):
        problems.append("grad")
    if not close_to_reference(device_centers, reference.centers, features, centers):
        problems.append("centers")
    if rule == "pytorch" and not close_to_reference(result.grad_centers, reference.grad_centers, features, centers):
        problems.append("grad_centers")

    expected = centerkern.scatter_sub_update(centers, labels, updates, backend="numpy")
    target = to_device(centers, kind)
    scattered = centerkern.scatter_sub_update(target, to_device(labels, kind), to_device(updates, kind), out=target,
                                              deterministic=deterministic, sync=sync)
    if scattered is not target:
        problems.append("scatter: out= is not the array returned")
    if not close_to_reference(target, expected, centers, updates):
        problems.append("scatter")
    gathered = centerkern.gather_centers(to_device(centers, kind), to_device(labels, kind), sync=sync)
    if not np.array_equal(to_host(gathered), centers[labels]):
        problems.append("gather")
    return problems


def check_bad_labels(rng, kind):
    """A label out of range, with ``sync=True`` and ``sync=False``. Returns the problems found."""
    features, labels, centers, updates = random_case(rng, 20, 5, 4, np.float32, 0.0)
    labels[13] = 4  # K = 4
    problems = []
    device_centers = to_device(centers, kind)

    def step(sync):
        return centerkern.center_loss(to_device(features, kind), to_device(labels, kind), device_centers, 0.5,
                                      out=device_centers, sync=sync)

    calls = {
        "center_loss": lambda: step(sync=True),
        "scatter_sub_update": lambda: centerkern.scatter_sub_update(
            device_centers, to_device(labels, kind), to_device(updates, kind), out=device_centers),
        "gather_centers": lambda: centerkern.gather_centers(device_centers, to_device(labels, kind)),
    }
    for name, call in calls.items():
        try:
            call()
            problems.append(f"{name}, sync=True: returned instead of raising IndexError")
        except IndexError:
            pass
    if not np.array_equal(to_host(device_centers), centers):
        problems.append("sync=True: the centers were written")

    result = step(sync=False)
    if not np.isnan(float(to_host(result.loss))):
        problems.append("sync=False: the loss is not NaN")
    try:
        centerkern.cuda.check_errors()
        problems.append("sync=False: check_errors() raised nothing")
    except IndexError:
        pass
    try:
        centerkern.cuda.check_errors()
    except IndexError:
        problems.append("sync=False: check_errors() raised the same error twice")
    if not np.array_equal(to_host(device_centers), centers):
        problems.append("sync=False: the centers were written")
    return problems


def check_deterministic(rng, batch, width, classes, kind):
    """Step and scatter 3 times on one hot-label batch: deterministic mode must give the same
    bits every time (and equal the numpy backend); the default mode's result is reported beside it."""
    features, labels, centers, updates = random_case(rng, batch, width, classes, np.float32, 0.9)
    # magnitudes spread over 4 decades, so that a change of summation order shows in the bits
    features *= np.float32(100.0) ** rng.uniform(-1, 1, features.shape).astype(np.float32)
    report = {"B": batch, "D": width, "K": classes, "hot_share": 0.9, "arrays": kind}
    for deterministic in (True, False):
        runs = []
        for _ in range(3):
            device_centers = to_device(centers, kind)
            result = centerkern.center_loss(to_device(features, kind), to_device(labels, kind), device_centers, 0.5,
                                            out=device_centers, deterministic=deterministic)
            scattered = to_device(centers, kind)
            centerkern.scatter_sub_update(scattered, to_device(labels, kind), to_device(updates, kind), out=scattered,
                                          deterministic=deterministic)
            runs.append([to_host(a) for a in (result.loss, result.grad, device_centers, scattered)])
        mode = {"bitwise_identical_over_3_runs": all(np.array_equal(a, b) for run in runs[1:]
                                                     for a, b in zip(run, runs[0]))}
        if deterministic:
            step = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
            scatter = centerkern.scatter_sub_update(centers, labels, updates, backend="numpy")
            mode["equals_reference"] = (close_to_reference(runs[0][2], step.centers, features, centers)
                                        and close_to_reference(runs[0][3], scatter, centers, updates))
        report["deterministic" if deterministic else "default"] = mode
    return report


def first_call_seconds(kind):
    """The process's first step: compiling the kernels, or loading them from Numba's disk cache."""
    features, labels = to_device(np.ones((4, 3), np.float32), kind), to_device(np.arange(4) % 2, kind)
    centers = to_device(np.zeros((2, 3), np.float32), kind)
    start = time.perf_counter()
    centerkern.center_loss(features, labels, centers, 0.5, out=centers)  # sync=True: finished on return
    return time.perf_counter() - start


# --------------------------------------------------------------------------- clocks


def new_event():
    return torch.cuda.Event(enable_timing=True) if TIMED_KIND == "torch" else cuda.event()


def elapsed_ms(start, end):
    return None if SIMULATED else start.elapsed_time(end)  # the simulator's events record no time


def synchronize():
    if TIMED_KIND == "torch":
        torch.cuda.synchronize()
    else:
        cuda.synchronize()


def median(values):
    return None if None in values else statistics.median(values)


def measure_bandwidth():
    """Device-to-device copy bandwidth in TB/s: CUDA events around back-to-back torch copies."""
    if not TORCH_CUDA:
        return {"TBps": None, "why": NO_TORCH_CUDA}
    source = torch.empty(BANDWIDTH_BYTES // 4, dtype=torch.float32, device="cuda").normal_()
    destination = torch.empty_like(source)
    destination.copy_(source)  # the first copy pays for any lazy setup
    torch.cuda.synchronize()
    start, end = new_event(), new_event()
    start.record()
    for _ in range(BANDWIDTH_COPIES):
        destination.copy_(source)
    end.record()
    end.synchronize()
    milliseconds = start.elapsed_time(end) / BANDWIDTH_COPIES
    del source, destination
    torch.cuda.empty_cache()
    return {"TBps": 2 * BANDWIDTH_BYTES / (milliseconds * 1e-3) / 1e12, "copy_bytes": BANDWIDTH_BYTES,
            "copies": BANDWIDTH_COPIES, "ms_per_copy": milliseconds,
            "method": "torch copy_, device to device, CUDA events around the back-to-back copies; "
                      "a copy moves twice its size (read and written)"}


def memory_outside_torch(batch, width, classes, steps):
    """Device memory in use beyond torch's own accounting (``cuMemGetInfo``'s used bytes less
    ``torch.cuda.memory_reserved``), in a fresh process: once torch holds the inputs, and again
    after ``steps`` centerkern steps. The growth is what centerkern keeps outside the caller's
    allocator: its compiled modules and the error record (SPEC: Memory)."""
    code = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import gpu_check
print("MEMORY", json.dumps(gpu_check._memory_in_this_process({batch}, {width}, {classes}, {steps})))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEMORY ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the memory child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("MEMORY "):])


def _memory_in_this_process(batch, width, classes, steps):
    from cuda.bindings import driver as cuda_driver

    def outside_torch():
        torch.cuda.synchronize()
        error, free, total = cuda_driver.cuMemGetInfo()
        return (total - free) - torch.cuda.memory_reserved()

    rng = np.random.default_rng(11)
    features = torch.as_tensor(rng.standard_normal((batch, width), dtype=np.float32), device="cuda")
    labels = torch.as_tensor(rng.integers(0, classes, batch), device="cuda")
    centers = torch.zeros((classes, width), dtype=torch.float32, device="cuda")
    before = outside_torch()
    for _ in range(steps):
        centerkern.center_loss(features, labels, centers, ALPHA, out=centers, sync=False)
    after = outside_torch()
    centerkern.cuda.check_errors()
    mb = 2**20
    return {"B": batch, "D": width, "K": classes, "steps": steps, "outside_torch_before_MB": before / mb,
            "outside_torch_after_MB": after / mb, "outside_torch_growth_MB": (after - before) / mb,
            "torch_reserved_MB": torch.cuda.memory_reserved() / mb}


def time_loop(call, calls):
    """One loop of ``calls`` back-to-back calls: (device ms per call, host launch us per call)."""
    start, end = new_event(), new_event()
    start.record()
    began = time.perf_counter()
    for _ in range(calls):
        call()
    launched = time.perf_counter()
    end.record()
    end.synchronize()
    milliseconds = elapsed_ms(start, end)
    return None if milliseconds is None else milliseconds / calls, (launched - began) / calls * 1e6


# --------------------------------------------------------------------------- timings


def timing_inputs(rng, batch, width, classes, hot_share):
    """Host labels (for the floor's count of touched rows), and the device arrays
    (features, labels, centers, updates) the timed calls take."""
    labels = labels_with_hot_classes(rng, batch, classes, hot_share)
    if TIMED_KIND == "torch":  # drawn on the device: 2 GB of centers would take seconds on the host
        generator = torch.Generator(device="cuda").manual_seed(int(rng.integers(2**31)))

        def normal(*shape):
            return torch.randn(shape, device="cuda", generator=generator)
    else:
        def normal(*shape):
            return to_device(rng.standard_normal(shape, dtype=np.float32), "numba")
    return labels, (normal(batch, width), to_device(labels, TIMED_KIND), normal(classes, width), normal(batch, width))


def torch_eager_step(features, labels, centers, alpha):
    """The facenet step as torch eager code writes it: gather, the rule's math, scatter."""
    differences = features - centers.index_select(0, labels)
    loss = differences.square().mean()
    grad = differences * (2.0 / differences.numel())
    centers.index_add_(0, labels, differences, alpha=1.0 - alpha)
    return loss, grad


def torch_eager_agrees(features, labels, centers):
    """Whether torch eager's step computes what centerkern's does (loss, touched center rows), to
    the tolerance the oracle gives foreign float32 code: a faster wrong peer would prove nothing."""
    ours, theirs = centers.clone(), centers.clone()
    result = centerkern.center_loss(features, labels, ours, ALPHA, out=ours, sync=False)
    loss, _ = torch_eager_step(features, labels, theirs, ALPHA)
    rows = torch.unique(labels)
    tolerance = PEER_TOLERANCE[np.dtype(np.float32)]
    return bool(np.isclose(float(loss), float(result.loss), rtol=tolerance)
                and close(to_host(theirs[rows]), to_host(ours[rows]), tolerance, to_host(features)))


def capture_graph(step):
    """``step`` captured in a CUDA graph; returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture: compilation, torch's allocator
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with cuda.defer_cleanup(), torch.cuda.graph(graph):  # no Numba cuMemFree inside the capture
        step()
    torch.cuda.synchronize()
    return graph.replay


def contenders(inputs):
    """name -> (operation, the call to time); and name -> why it is skipped here."""
    features, labels, centers, updates = inputs

    def step(deterministic=False):
        return centerkern.center_loss(features, labels, centers, ALPHA, out=centers, sync=False,
                                      deterministic=deterministic)

    def scatter(deterministic=False):
        return centerkern.scatter_sub_update(centers, labels, updates, out=centers, sync=False,
                                             deterministic=deterministic)

    # (facenet with alpha 0.95 drives a hot class's center to infinity within a few calls; the
    # kernels do the same work whatever the values, so the timings stand)
    timed = {
        "centerkern step": ("step", step),
        "centerkern step, deterministic": ("step", lambda: step(deterministic=True)),
        "centerkern scatter": ("scatter", scatter),
        "centerkern scatter, deterministic": ("scatter", lambda: scatter(deterministic=True)),
    }
    peers = ("torch eager step", "torch eager scatter (index_add_)", "centerkern step, CUDA graph")
    if not TORCH_CUDA:
        return timed, dict.fromkeys(peers, NO_TORCH_CUDA)
    eager_centers = centers.clone()  # torch's own, so that both start from the same centers
    timed["torch eager step"] = ("step", lambda: torch_eager_step(features, labels, eager_centers, ALPHA))
    timed["torch eager scatter (index_add_)"] = (
        "scatter", lambda: eager_centers.index_add_(0, labels, updates, alpha=-1.0))
    timed["centerkern step, CUDA graph"] = ("step", capture_graph(step))
    return timed, {}


def floor_bytes(batch, width, touched, itemsize=4):
    """Bytes an operation must move: see the module docstring."""
    rows = 2 * touched * width * itemsize  # each touched center row read and written
    return {"step": 2 * batch * width * itemsize + rows, "scatter": batch * width * itemsize + rows}


def time_size(rng, batch, width, classes, hot_share, bandwidth, calls, repeats, warmup):
    labels, inputs = timing_inputs(rng, batch, width, classes, hot_share)
    touched = int(np.unique(labels).size)
    moved = floor_bytes(batch, width, touched)
    tbps = bandwidth.get("TBps")
    floor_ms = {operation: None if tbps is None else size / (tbps * 1e12) * 1e3 for operation, size in moved.items()}
    figures = {"B": batch, "D": width, "K": classes, "hot_share": hot_share, "dtype": "float32", "rule": "facenet",
               "alpha": ALPHA, "arrays": TIMED_KIND, "touched_classes": touched, "floor_bytes": moved,
               "floor_ms": floor_ms, "calls_per_loop": calls, "repeats": repeats}
    if TORCH_CUDA:
        figures["torch_eager_agrees"] = torch_eager_agrees(*inputs[:3])
    timed, figures["skipped"] = contenders(inputs)
    for _, call in timed.values():
        for _ in range(warmup):
            call()
    synchronize()
    runs = {name: ([], []) for name in timed}
    for _ in range(repeats):  # the contenders interleaved, so that a slow spell hits them all
        for name, (_, call) in timed.items():
            milliseconds, microseconds = time_loop(call, calls)
            runs[name][0].append(milliseconds)
            runs[name][1].append(microseconds)
    figures["loops"] = {}
    for name, (operation, _) in timed.items():
        milliseconds, microseconds = runs[name]
        ms = median(milliseconds)
        floor = floor_ms[operation]
        figures["loops"][name] = {
            "operation": operation, "ms_per_call": ms, "host_us_per_call": statistics.median(microseconds),
            "over_floor": None if ms is None or floor is None else ms / floor,
            # the bytes the operation must move over its time: the bandwidth it achieves
            "effective_TBps": None if ms is None else moved[operation] / (ms * 1e-3) / 1e12,
            "runs_ms_per_call": milliseconds, "runs_host_us_per_call": microseconds,
            # launching took nearly as long as the GPU work: the loop measured the host, not the GPU
            "host_bound": None if ms is None else statistics.median(microseconds) * 1e-3 >= 0.8 * ms,
        }
    del timed, inputs  # a captured graph holds its memory until it is dropped
    synchronize()
    if TORCH_CUDA:
        torch.cuda.empty_cache()
    return figures


# --------------------------------------------------------------------------- goals


def _ratio(numerator, denominator):
    return None if numerator is None or denominator is None else numerator / denominator


def _worst(candidates):
    """The largest (value, where) of the candidates; (None, None) if any is unknown."""
    if not candidates or any(value is None for value, _ in candidates):
        return None, None
    return max(candidates, key=lambda candidate: candidate[0])


CENTERKERN_LOOPS = ("centerkern step", "centerkern step, deterministic", "centerkern scatter",
                    "centerkern scatter, deterministic")

# key -> (the goal, as the issue states it), comparison, target, and its (value, where) from the
# timings (``figure(size, loop, key)``); "where" names the figure that decided a worst case
GOALS = {
    "step_vs_torch_eager_B8192": (
        "step in a loop, torch tensors in, B=8192: >= 1.5x faster than torch eager's step in the same loop "
        "(value: torch eager's time over centerkern's)", ">=", 1.5,
        lambda figure, sizes: (_ratio(figure("B8192", "torch eager step"), figure("B8192", "centerkern step")),
                               None)),
    "graph_step_over_floor_B8192": (
        "step in a captured CUDA graph, B=8192: <= 3x the floor", "<=", 3.0,
        lambda figure, sizes: (figure("B8192", "centerkern step, CUDA graph", "over_floor"), None)),
    "step_over_floor_B65536": (
        "step in a loop, B=65536, K=1e6: <= 1.5x the floor", "<=", 1.5,
        lambda figure, sizes: (figure("B65536", "centerkern step", "over_floor"), None)),
    "hot_over_uniform_B65536": (
        "hot-label batch (B=65536, 90% in 3 classes): <= 1.3x the uniform batch of the same size", "<=", 1.3,
        lambda figure, sizes: (_ratio(figure("B65536_hot", "centerkern step"), figure("B65536", "centerkern step")),
                               None)),
    "deterministic_over_default": (
        "deterministic: <= 1.5x the default (the worst of step and scatter, at every size)", "<=", 1.5,
        lambda figure, sizes: _worst([
            (_ratio(figure(size, f"centerkern {operation}, deterministic"), figure(size, f"centerkern {operation}")),
             f"{size} {operation}") for size in sizes for operation in ("step", "scatter")])),
    "host_overhead_us_per_call": (
        "host overhead per call: <= 40 us (the worst centerkern call, at every size)", "<=", 40.0,
        lambda figure, sizes: _worst([(figure(size, name, "host_us_per_call"), f"{size} {name}")
                                      for size in sizes for name in CENTERKERN_LOOPS])),
}

HOST_TIME_GOAL = ("host time per call with the real driver: <= 1.5x the stubbed driver's (the worst step, "
                  "torch and Numba arrays, in trivial-call units)", "<=", 1.5)


def host_time_with_the_real_driver(small):
    """``host_time``'s cases on the GPU, and the same with the driver stubbed in a process of its
    own: per case both figures and their ratio (of trivial-call units, so that the two processes'
    calibrations cancel)."""
    import subprocess
    import tempfile

    if SIMULATED:
        return {"why": "the simulator has no driver to time"}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import host_time
    calls, rounds = (5, 2) if small else (200, 40)
    with tempfile.TemporaryDirectory() as directory:
        stubbed_path = os.path.join(directory, "stubbed.json")
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_host_time.py"),
                        "--output", stubbed_path] + (["--quick"] if small else []), check=True,
                       env={k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"})
        with open(stubbed_path) as handle:
            stubbed = {(row["framework"], row["case"]): row for row in json.load(handle)["cases"]}
    frameworks = (["torch"] if TORCH_CUDA else []) + ["numba"]
    rows = []
    for framework in frameworks:
        for name, _, call in host_time.cases_of(framework, "cuda"):
            host_time.warm(call)
            real = host_time.time_per_call(call, calls, rounds)
            other = stubbed.get((framework, name), {})
            rows.append({"framework": framework, "case": name, "real": real, "stubbed_units": other.get("units"),
                         "real_over_stubbed": _ratio(real["units"], other.get("units"))})
            print(f"  host {framework:6s} {name:45s} {real['host_us']:7.1f} us {real['units']:.2f} units "
                  f"(stubbed {other.get('units')})", flush=True)
    steps = [row for row in rows if row["case"].startswith("center_loss")]
    worst = _worst([(row["real_over_stubbed"], f"{row['framework']} {row['case']}") for row in steps])
    return {"cases": rows, "worst_step_real_over_stubbed": worst[0], "at": worst[1]}



def _figures(timings, missing):
    """``figure(size, loop, key)`` from the timings; for each one that is missing, the reason goes
    to ``missing``."""
    def figure(size, name, key="ms_per_call"):
        figures = timings.get(size, {})
        loop = figures.get("loops", {}).get(name, {})
        value = loop.get(key)
        if value is None:
            if name in figures.get("skipped", {}):
                missing.append(f"{name}: {figures['skipped'][name]}")
            elif not loop:
                missing.append(f"{size} {name}: not measured (see errors)")
            elif loop["ms_per_call"] is None:
                missing.append("no device time: the simulator's events record none")
            else:
                missing.append("no floor: the copy bandwidth was not measured")
        return value
    return figure


MEMORY_GOAL = ("device memory outside the caller's allocator after 100 steps at B=65536, D=2048: <= 64 MB "
               "(value: its growth over the steps, MB)", "<=", 64.0)


def goals(timings, memory=None, host=None):
    """Each goal: {"goal", "value", "target", "met"}, with "at" where the value is the worst of
    several figures, and "why" where there is no value."""
    result = {}
    for key, (goal, comparison, target, evaluate) in GOALS.items():
        missing = []
        value, where = evaluate(_figures(timings, missing), list(timings))
        met = value is not None and (value >= target if comparison == ">=" else value <= target)
        result[key] = {"goal": goal, "value": value, "target": target, "met": met}
        if where is not None:
            result[key]["at"] = where
        if value is None:
            result[key]["why"] = "; ".join(dict.fromkeys(missing))  # each reason once, in order
    goal, comparison, target = MEMORY_GOAL
    value = (memory or {}).get("outside_torch_growth_MB")
    result["memory_outside_allocator_MB"] = {"goal": goal, "value": value, "target": target,
                                             "met": value is not None and value <= target}
    if value is None:
        result["memory_outside_allocator_MB"]["why"] = (memory or {}).get("why", "not measured")
    goal, comparison, target = HOST_TIME_GOAL
    value = (host or {}).get("worst_step_real_over_stubbed")
    result["host_time_real_over_stubbed"] = {"goal": goal, "value": value, "target": target,
                                             "met": value is not None and value <= target}
    if value is None:
        result["host_time_real_over_stubbed"]["why"] = (host or {}).get("why", "not measured")
    else:
        result["host_time_real_over_stubbed"]["at"] = host.get("at")
    return result


def print_goals(table):
    print(f"\n{'goal':30s} {'value':>10s} {'target':>8s}  met")
    for key, goal in table.items():
        value = "-" if goal["value"] is None else f"{goal['value']:.3g}"
        print(f"{key:30s} {value:>10s} {goal['target']:>8g}  {'yes' if goal['met'] else 'NO'}")


# --------------------------------------------------------------------------- the run


def header(args):
    """Where, when and with what: the benchmarks' common provenance, and the GPU's side of it."""
    report = {**provenance(), "simulator": SIMULATED, "small": args.small, "gpu": None, "compute_capability": None,
              "launch_shape": {"tile_rows": kernels.TILE_ROWS, "columns_per_block": kernels.COLUMNS_PER_BLOCK},
              "launch_path": centerkern.cuda.launch_path(),
              "frameworks_on_device": device_kinds(), "timed_arrays": TIMED_KIND}
    for distribution in ("numba-cuda", "cuda-core", "cuda-bindings"):
        try:
            report["versions"][distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            report["versions"][distribution] = None
    report["versions"]["cupy"] = getattr(cupy, "__version__", None)
    if not SIMULATED:
        device = cuda.get_current_device()
        report["gpu"] = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
        report["compute_capability"] = list(device.compute_capability)
    return report


def save(report, path):
    """Written after every stage, whole (a file replaced, never half written), so that a run cut
    short still leaves what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial", "w") as handle:
        json.dump(report, handle, indent=2)
    os.replace(path + ".partial", path)


def stage(report, path, name, work):
    """Run one stage; an exception is recorded under ``errors`` (and fails the run), and the
    stages after it still run."""
    try:
        return work()
    except Exception as error:
        report.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
        print(f"{name}: FAILED with {type(error).__name__}: {error}", flush=True)
        return None
    finally:
        save(report, path)


def shrink_simulated_launches():
    """The simulator runs every GPU thread as a Python thread: few, small blocks (as in the test
    suite) keep --small quick, while batches still take the grid-stride loops."""
    from centerkern.cuda import arrays

    arrays.THREADS_1D, arrays.GRID_STRIDE_BLOCKS, arrays.ROW_BLOCKS = 8, 2, 3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="path of the JSON file with every figure")
    parser.add_argument("--small", action="store_true", help="tiny sizes and short loops, for the simulator")
    parser.add_argument("--cases", type=int, default=60, help="random property cases (--small: 12)")
    parser.add_argument("--repeats", type=int, default=5, help="loops of 100 calls per contender (--small: 1)")
    args = parser.parse_args(argv)
    if SIMULATED and args.small:
        shrink_simulated_launches()
    rng = np.random.default_rng(2026)
    path = args.output
    report = header(args)
    save(report, path)

    report["first_call_seconds"] = stage(report, path, "first_call", lambda: first_call_seconds(TIMED_KIND))
    report["launch_path"] = centerkern.cuda.launch_path()  # as chosen by the first launch
    print(f"launch path: {report['launch_path']}", flush=True)
    if report["first_call_seconds"] is not None:
        print(f"first step in this process: {report['first_call_seconds']:.2f} s", flush=True)

    def properties():
        cases, failures = check_properties(rng, 12 if args.small else args.cases, args.small)
        report["property_checks"] = {"cases": cases, "failures": failures}
        print(f"property checks: {cases} cases, {len(failures)} failures", flush=True)
        for failure in failures:
            print("  FAILED", failure, flush=True)
    stage(report, path, "property_checks", properties)

    def bad_labels():
        report["bad_label_check"] = {kind: check_bad_labels(rng, kind) for kind in device_kinds()}
        print("bad-label check:", report["bad_label_check"], flush=True)
    stage(report, path, "bad_label_check", bad_labels)

    def deterministic():
        size = (20, 4, 6) if args.small else (65536, 256, 1000)
        report["deterministic_check"] = check_deterministic(rng, *size, TIMED_KIND)
        print("deterministic check:", report["deterministic_check"], flush=True)
    stage(report, path, "deterministic_check", deterministic)

    report["bandwidth"] = stage(report, path, "bandwidth", measure_bandwidth) or {"TBps": None, "why": "failed"}
    print("copy bandwidth:", report["bandwidth"], flush=True)

    calls, repeats, warmup = (2, 1, 1) if args.small else (100, args.repeats, 3)
    report["timings"] = {}
    for role, (batch, width, classes, hot_share) in (SMALL_SIZES if args.small else FULL_SIZES).items():
        figures = stage(report, path, f"timings {role}", lambda: time_size(
            rng, batch, width, classes, hot_share, report["bandwidth"], calls, repeats, warmup))
        report["timings"][role] = figures or {"B": batch, "D": width, "K": classes, "hot_share": hot_share}
        print_size(role, report["timings"][role])
        save(report, path)

    def memory():
        if not TORCH_CUDA:
            return {"why": NO_TORCH_CUDA}
        return memory_outside_torch(*((1024, 64, 1000, 10) if args.small else (65536, 2048, 100_000, 100)))
    report["memory"] = stage(report, path, "memory", memory) or {"why": "failed (see errors)"}
    print("memory outside torch's allocator:", report["memory"], flush=True)

    report["host_time"] = stage(report, path, "host_time", lambda: host_time_with_the_real_driver(args.small)) or {
        "why": "failed (see errors)"}

    report["launch_path"] = centerkern.cuda.launch_path()
    report["goals"] = goals(report["timings"], report["memory"], report["host_time"])
    save(report, path)
    print(f"\nwritten: {path}")
    print_goals(report["goals"])
    return 1 if failed(report) else 0


def print_size(role, figures):
    print(f"\n{role}: B={figures['B']} D={figures['D']} K={figures['K']} hot_share={figures['hot_share']}",
          flush=True)
    for name, loop in figures.get("loops", {}).items():
        ms = "-" if loop["ms_per_call"] is None else f"{loop['ms_per_call']:.4f} ms"
        over = "" if loop["over_floor"] is None else f", {loop['over_floor']:.2f}x the floor"
        print(f"  {name:36s} {ms:>12s}{over}, host {loop['host_us_per_call']:.1f} us/call", flush=True)
    for name, why in figures.get("skipped", {}).items():
        print(f"  {name:36s} skipped: {why}", flush=True)


def failed(report):
    """A correctness check failed, or a stage raised."""
    determinism = report.get("deterministic_check", {}).get("deterministic", {})
    return bool(report.get("errors")
                or report.get("property_checks", {}).get("failures")
                or any(report.get("bad_label_check", {}).values())
                or not determinism.get("bitwise_identical_over_3_runs")
                or not determinism.get("equals_reference"))


if __name__ == "__main__":
    raise SystemExit(main())
