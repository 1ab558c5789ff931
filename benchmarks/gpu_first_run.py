"""The first run of the cuda backend on a GPU, in the order that decides most per minute.

    python benchmarks/gpu_first_run.py OUT_DIR [--small]

Stages, each a verdict ("passed", "failed", or "not possible here" with the reason) written to
``OUT_DIR/first-run.json`` the moment it ends (a long stage writes what it has so far, as
"running"), so that a run cut short still says what it reached. After a failed preflight nothing else runs ("not run"):

1. ``preflight``: the versions of numba, numba-cuda, cuda-core, cuda-bindings, torch and CuPy;
   the driver's CUDA version; three device attributes the error record's memory model rests on
   (``HOST_NATIVE_ATOMIC_SUPPORTED``, ``CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM``,
   ``PAGEABLE_MEMORY_ACCESS``); the PTX ISA version the kernels are compiled to for this GPU and
   whether the driver JITs that PTX (for information: Numba may link it itself); a kernel
   launched and its result read back (this decides); the launch path.
2. ``direct_launch``: the direct launch against Numba's own launch path, bit for bit, with
   ``deterministic=True``: classes spanning tiles (B >= 200), D = 5 and D = 300, strided and
   negative-stride views, uint64 and int8 labels, B = 0, float64; and each equal to the numpy
   backend within SPEC's tolerance. (``--sanitized-case`` runs one small case alone, for
   ``compute-sanitizer``: gpu_device_run.sh runs it under memcheck and racecheck.)
3. ``no_host_wait``: about a second of ``torch.cuda._sleep`` queued first, then a
   ``sync=False`` call: it returns long before the sleep ends, and the stream is still busy.
4. ``streams_and_threads``: calls on two streams (one behind a sleep, the other with a larger
   batch) and from two host threads, each equal to its reference.
5. ``bad_labels``: ``sync=True`` raises and writes nothing; ``sync=False`` gives a NaN loss and
   ``check_errors`` raises exactly once; a uint64 label is reported as written; the error
   record over the bus: more bad ``sync=False`` calls than it has slots, each checked, each
   raised exactly once, then more than it holds unchecked, the drops told with the next error.
6. ``graph_capture``: a step captured in a CUDA graph at a batch size no eager call has used,
   without a warm-up of its own, replayed on another stream than the eager calls: the same bits
   as the eager steps; and a capture that is a fresh process's very first centerkern call (its
   kernels loaded and its device's error record made under capture).
7. ``memory``: at B=65536, D=2048, the device memory in use beyond torch's own accounting after
   100 steps, against before the first call: what is outside torch is the compiled modules and
   the error record only (goal: <= 64 MB).

Under Numba's simulator (``NUMBA_ENABLE_CUDASIM=1``) use ``--small``: the stages that need torch
with CUDA, a driver or a sanitizer say so, and the rest run at tiny sizes on Numba arrays, so
that this script's own bugs show before a GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check  # noqa: E402  (sets up the simulator's launch shape before Numba is imported)
from gpu_check import (  # noqa: E402
    NO_TORCH_CUDA, SIMULATED, TORCH_CUDA, check_bad_labels, close_to_reference, cuda, device_kinds, random_case,
    to_device, to_host, torch,
)

import centerkern  # noqa: E402
import centerkern.cuda  # noqa: E402
from centerkern.cuda import kernels, launcher  # noqa: E402
from centerkern.cuda.views import DeviceView  # noqa: E402

KIND = "torch" if TORCH_CUDA else "numba"
MEMORY_GOAL_MB = 64.0


class NotPossible(Exception):
    """The stage cannot run on this machine (the reason is its message)."""


# --------------------------------------------------------------------------- 1. preflight


def preflight(small, progress):
    import importlib.metadata

    found = {"versions": {}}
    for distribution in ("numpy", "numba", "numba-cuda", "cuda-core", "cuda-bindings", "torch", "cupy",
                         "cupy-cuda12x", "cupy-cuda13x"):
        try:
            found["versions"][distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found["versions"][distribution] = None
    found["frameworks_on_device"] = device_kinds()
    found["torch_cuda"] = TORCH_CUDA
    found["launch_path_before_the_first_launch"] = centerkern.cuda.launch_path()
    problems = []
    if SIMULATED:
        found["simulator"] = True
        return found, problems
    if not cuda.is_available():
        return found, ["Numba sees no CUDA device"]
    if not TORCH_CUDA:
        found["note"] = "torch sees no CUDA device: the torch stages cannot run"
    from cuda.bindings import driver as cuda_driver

    error, version = cuda_driver.cuDriverGetVersion()
    found["driver_cuda_version"] = f"{version // 1000}.{version % 1000 // 10}"
    device = cuda.get_current_device()
    capability = tuple(device.compute_capability)
    found["gpu"] = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
    found["compute_capability"] = list(capability)
    # what the error record's memory model rests on (see centerkern.cuda.record): for information
    attributes = cuda_driver.CUdevice_attribute
    for name in ("HOST_NATIVE_ATOMIC_SUPPORTED", "CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM",
                 "PAGEABLE_MEMORY_ACCESS"):
        error, value = cuda_driver.cuDeviceGetAttribute(getattr(attributes, f"CU_DEVICE_ATTRIBUTE_{name}"), device.id)
        found.setdefault("device_attributes", {})[name] = int(value) if error == 0 else error.name
    counters = DeviceView(None, 0, (1,), (4,), np.dtype(np.int32), False, None)
    ptx, _ = cuda.compile_ptx(centerkern.cuda.kernels.fill_vector.py_func,
                              (launcher._numba_type(counters), launcher._numba_type(0)), cc=capability)
    found["ptx_isa_version"] = next((line.split()[1] for line in ptx.splitlines() if line.startswith(".version")),
                                    None)
    with cuda.gpus[device.id]:
        # for information: Numba may link the kernels to machine code itself (nvJitLink), so a
        # driver that cannot JIT this PTX can still run them; the launch below decides
        error, module = cuda_driver.cuModuleLoadData(ptx.encode() + b"\0")
        found["driver_jits_the_ptx"] = error == cuda_driver.CUresult.CUDA_SUCCESS
        if found["driver_jits_the_ptx"]:
            cuda_driver.cuModuleUnload(module)
        else:
            found["driver_jit_error"] = error.name
        one = cuda.device_array(3, dtype=np.int32)
        centerkern.cuda.kernels.fill_vector[1, 32](one, 7)
        found["a_kernel_runs"] = bool((one.copy_to_host() == 7).all())
    if not found["a_kernel_runs"]:
        problems.append("a kernel launched on the GPU did not write what it should")
    return found, problems


# --------------------------------------------------------------------------- 2. the direct launch


def _direct_cases(small):
    """(name, features, labels, centers, updates, how to view them on the device)."""
    rng = np.random.default_rng(7)
    batch = 24 if small else 200
    cases = []
    for width in ((3, 5) if small else (5, 300)):
        cases.append((f"B={batch} D={width} spanning classes", *random_case(rng, batch, width, 7, np.float32, 0.9),
                      "plain"))
    base = random_case(rng, batch, 4 if small else 40, 9, np.float32, 0.5)
    cases.append(("strided features (every other column)", *base, "strided"))
    cases.append(("negative-stride features and updates (rows reversed)", *base, "reversed"))
    for label_dtype in (np.uint64, np.int8):
        features, labels, centers, updates = random_case(rng, batch, 6, 5, np.float32, 0.5)
        cases.append((f"{np.dtype(label_dtype).name} labels", features, labels.astype(label_dtype), centers, updates,
                      "plain"))
    cases.append(("B=0", *random_case(rng, 0, 6, 5, np.float32, 0.0), "plain"))
    cases.append(("float64", *random_case(rng, batch, 7, 11, np.float64, 0.5), "plain"))
    return cases


def _on_device(array, how):
    """The array as a Numba device array, viewed as the case asks (the values stay the same)."""
    if how == "strided":
        wide = np.repeat(array, 2, axis=1)
        return cuda.to_device(wide)[:, ::2]
    if how == "reversed":
        return cuda.to_device(np.ascontiguousarray(array[::-1]))[::-1]
    return cuda.to_device(array)


def _run_case(features, labels, centers, updates, how, rule):
    result = centerkern.center_loss(_on_device(features, how), cuda.to_device(labels), cuda.to_device(centers), 0.5,
                                    rule=rule, deterministic=True)
    scattered = centerkern.scatter_sub_update(cuda.to_device(centers), cuda.to_device(labels),
                                              _on_device(updates, how), deterministic=True)
    gathered = centerkern.gather_centers(cuda.to_device(centers), cuda.to_device(labels))
    outputs = [result.loss, result.grad, result.centers, scattered, gathered]
    if result.grad_centers is not None:
        outputs.append(result.grad_centers)
    return [to_host(output) for output in outputs]


def direct_launch(small, progress):
    found, problems = {"cases": []}, []
    direct_path = launcher.launch_path()
    for number, (name, features, labels, centers, updates, how) in enumerate(_direct_cases(small)):
        # --small (the simulator): one rule per case, in turn; on a GPU every rule on every case
        for rule in (centerkern.RULES[number % 3],) if small else centerkern.RULES:
            direct = _run_case(features, labels, centers, updates, how, rule)
            if SIMULATED:  # the simulator has Numba's path only: nothing to compare it with
                numba_path = direct
            else:
                with launcher.numba_launch_path("compared with the direct launch"):
                    numba_path = _run_case(features, labels, centers, updates, how, rule)
            same_bits = len(direct) == len(numba_path) and all(
                np.array_equal(a, b, equal_nan=True) for a, b in zip(direct, numba_path))
            reference = centerkern.center_loss(features, labels, centers, 0.5, rule=rule, backend="numpy")
            expected_scatter = centerkern.scatter_sub_update(centers, labels, updates, backend="numpy")
            agrees = (np.isclose(float(direct[0]), reference.loss, rtol=1e-9, atol=1e-300)
                      and close_to_reference(direct[1], reference.grad, features, centers)
                      and close_to_reference(direct[2], reference.centers, features, centers)
                      and close_to_reference(direct[3], expected_scatter, centers, updates)
                      and np.array_equal(direct[4], centers[labels.astype(np.int64)]))
            found["cases"].append({"case": name, "rule": rule, "same_bits_as_numbas_launch": same_bits,
                                   "equals_reference": bool(agrees)})
            progress(found)  # a run cut short keeps the cases it reached
            if not (same_bits and agrees):
                problems.append(f"{name}, rule {rule}: " + ", ".join(
                    what for what, ok in (("bits differ from Numba's launch", same_bits),
                                          ("differs from the reference", agrees)) if not ok))
    found["launch_path"] = direct_path
    if SIMULATED:
        found["note"] = "the simulator has Numba's launch path only: each case checked against the reference"
    if problems and not SIMULATED:
        # the rest of the run is still worth having: through Numba's own launch path
        launcher._fall_back("the direct launch disagreed with Numba's in this run's direct_launch stage")
    return found, problems


def sanitized_case():
    """One small case for compute-sanitizer (memcheck, racecheck), run by gpu_device_run.sh as a
    process of its own: classes spanning tiles, both modes, and the gather."""
    rng = np.random.default_rng(3)
    features = rng.standard_normal((200, 5)).astype(np.float32)
    labels = np.where(rng.random(200) < 0.9, 1, rng.integers(0, 7, 200))
    centers = rng.standard_normal((7, 5)).astype(np.float32)
    for deterministic in (False, True):
        device_centers = cuda.to_device(centers)
        centerkern.center_loss(cuda.to_device(features), cuda.to_device(labels), device_centers, 0.5,
                               out=device_centers, deterministic=deterministic)
        centerkern.gather_centers(device_centers, cuda.to_device(labels))
    print("the sanitized case ran")


# --------------------------------------------------------------------------- 3. no host wait


def _sleep_cycles(seconds):
    """GPU clock cycles in about ``seconds`` (torch.cuda._sleep spins for a number of cycles)."""
    return int(cuda.get_current_device().CLOCK_RATE * 1000 * seconds)  # CLOCK_RATE is in kHz


def _torch_case(seed, batch, width, classes, hot_share=0.5):
    rng = np.random.default_rng(seed)
    host = random_case(rng, batch, width, classes, np.float32, hot_share)
    return host, [torch.as_tensor(a, device="cuda") for a in host]


def no_host_wait(small, progress):
    if not TORCH_CUDA:
        raise NotPossible(NO_TORCH_CUDA)
    (features, labels, centers, _), (d_features, d_labels, d_centers, _) = _torch_case(1, 4096, 256, 1000)
    reference = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    centerkern.center_loss(d_features, d_labels, d_centers, 0.5, sync=False)  # compiled, before the clock
    torch.cuda.synchronize()
    torch.cuda._sleep(_sleep_cycles(1.0))
    start = time.perf_counter()
    result = centerkern.center_loss(d_features, d_labels, d_centers, 0.5, sync=False)
    call_seconds = time.perf_counter() - start
    still_busy = not torch.cuda.current_stream().query()
    start = time.perf_counter()
    torch.cuda.synchronize()
    waited_after = time.perf_counter() - start
    found = {"call_seconds": call_seconds, "stream_busy_after_the_call": still_busy,
             "seconds_the_sleep_still_ran": waited_after}
    problems = []
    if call_seconds > 0.1 or not still_busy or waited_after < 0.5:
        problems.append("the sync=False call waited for the GPU")
    if not np.isclose(float(result.loss), reference.loss, rtol=1e-6):
        problems.append("the loss differs from the reference")
    return found, problems


# --------------------------------------------------------------------------- 4. streams and threads


def _compare(result, reference, features, centers, what, problems):
    if not np.isclose(float(to_host(result.loss)), reference.loss, rtol=1e-6, atol=1e-300):
        problems.append(f"{what}: loss")
    if not close_to_reference(result.centers, reference.centers, features, centers):
        problems.append(f"{what}: centers")
    if not close_to_reference(result.grad, reference.grad, features, centers):
        problems.append(f"{what}: grad")


def streams_and_threads(small, progress):
    problems, found = [], {"arrays": KIND}
    rng = np.random.default_rng(2)
    sizes = ((12, 3, 4), (21, 4, 6)) if small else ((2048, 128, 500), (16384, 256, 5000))
    cases = [random_case(rng, batch, width, classes, np.float32, 0.5) for batch, width, classes in sizes]
    references = [centerkern.center_loss(f, y, c, 0.5, backend="numpy") for f, y, c, _ in cases]
    if KIND == "torch":
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        inputs = [[torch.as_tensor(a, device="cuda") for a in case[:3]] for case in cases]
        torch.cuda.synchronize()
        results = []
        for index, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                if index == 0:
                    torch.cuda._sleep(_sleep_cycles(0.3))  # the first stream's call waits behind a sleep
                results.append(centerkern.center_loss(*inputs[index], 0.5, sync=False))
        streams[1].synchronize()
        found["first_stream_still_asleep_when_the_second_was_done"] = not streams[0].query()
        if not found["first_stream_still_asleep_when_the_second_was_done"]:
            problems.append("the second stream's call waited for the first stream's")
        torch.cuda.synchronize()
    else:
        streams = [cuda.stream(), cuda.stream()]
        results = [centerkern.center_loss(*[cuda.to_device(a) for a in case[:3]], 0.5, sync=False, stream=stream)
                   for case, stream in zip(cases, streams)]
        cuda.synchronize()
    centerkern.cuda.check_errors()
    for index, result in enumerate(results):
        _compare(result, references[index], cases[index][0], cases[index][2], f"stream {index}", problems)

    failures = []

    def work(index):
        try:
            features, labels, centers, _ = cases[index]
            for _ in range(2 if small else 20):
                if KIND == "torch":
                    with torch.cuda.stream(torch.cuda.Stream()):
                        result = centerkern.center_loss(*[torch.as_tensor(a, device="cuda")
                                                          for a in (features, labels, centers)], 0.5)
                else:
                    result = centerkern.center_loss(*[cuda.to_device(a) for a in (features, labels, centers)], 0.5)
                _compare(result, references[index], features, centers, f"thread {index}", failures)
        except Exception as error:  # reported with the stage
            failures.append(f"thread {index} raised {type(error).__name__}: {error}")

    threads = [threading.Thread(target=work, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    problems += sorted(set(failures))
    found["threads"] = 2
    return found, problems


# --------------------------------------------------------------------------- 5. bad labels


def bad_labels(small, progress):
    rng = np.random.default_rng(5)
    found = {kind: check_bad_labels(rng, kind) for kind in device_kinds()}
    problems = [f"{kind}: {problem}" for kind, listed in found.items() for problem in listed]
    labels = np.zeros(10, np.uint64)
    labels[4] = 2**64 - 1
    try:
        centerkern.gather_centers(cuda.to_device(np.zeros((3, 2), np.float32)), cuda.to_device(labels))
        problems.append("a uint64 label of 2**64 - 1 was not refused")
    except IndexError as error:
        found["uint64_message"] = str(error)
        if f"label {2**64 - 1} at position 4 " not in str(error):
            problems.append(f"the uint64 label is not reported as written: {error}")
    found["record"] = _record_over_the_bus(problems, 4 if small else kernels.RECORD_SLOTS + 8)
    return found, problems


def _record_over_the_bus(problems, calls):
    """More sync=False bad calls than the error record has slots, each followed by
    check_errors(): every verdict crosses to the host (pinned memory, over PCIe or NVLink) and is
    raised exactly once, in order; then as many again with nobody looking, and the first error
    raised after them tells how many were dropped."""
    features, centers = cuda.to_device(np.ones((12, 3), np.float32)), cuda.to_device(np.zeros((4, 3), np.float32))
    raised = 0
    for call in range(calls):
        labels = np.zeros(12, np.int64)
        labels[call % 12] = 100 + call
        centerkern.center_loss(features, cuda.to_device(labels), centers, 0.5, sync=False)
        try:
            centerkern.cuda.check_errors()
            problems.append(f"bad call {call}: check_errors() raised nothing")
        except IndexError as error:
            raised += 1
            if f"label {100 + call} at position {call % 12} " not in str(error) or getattr(error, "__notes__", None):
                problems.append(f"bad call {call}: check_errors() raised {error} {getattr(error, '__notes__', '')}")
    try:
        centerkern.cuda.check_errors()
    except IndexError as error:
        problems.append(f"a verdict raised twice: {error}")
    if not TORCH_CUDA:  # (every call takes the verdicts already posted: the GPU must be busy while they queue)
        return {"checked_one_by_one": raised, "unchecked": "not possible here: needs torch with CUDA to keep the GPU "
                                                           "busy while the calls are queued"}
    import torch

    unchecked = kernels.RECORD_SLOTS + 3
    queued = [cuda.to_device(np.where(np.arange(12) == 0, 200 + call, 0)) for call in range(unchecked)]
    cuda.synchronize()
    torch.cuda._sleep(_sleep_cycles(1.0))  # on the legacy stream, which Numba's default stream is
    for labels in queued:  # queued behind the sleep: none is checked before all are posted
        centerkern.center_loss(features, labels, centers, 0.5, sync=False)
    told = []
    while True:
        try:
            centerkern.cuda.check_errors()
            break
        except IndexError as error:
            told.append((str(error), getattr(error, "__notes__", [])))
    if len(told) != kernels.RECORD_SLOTS or not told[0][1] or "3 more call(s)" not in told[0][1][0]:
        problems.append(f"{unchecked} unchecked bad calls: {len(told)} raised, the first with notes {told[:1]}")
    return {"checked_one_by_one": raised, "unchecked": unchecked, "raised_after_them": len(told)}


# --------------------------------------------------------------------------- 6. graph capture


def graph_capture(small, progress):
    if not TORCH_CUDA:
        raise NotPossible(NO_TORCH_CUDA)
    problems = []
    (features, labels, centers, _), (d_features, d_labels, d_centers, _) = _torch_case(6, 333, 48, 20, 0.9)
    eager_centers = d_centers.clone()
    for _ in range(2):  # two eager steps, on the default stream
        eager = centerkern.center_loss(d_features, d_labels, eager_centers, 0.5, out=eager_centers,
                                       deterministic=True)
    torch.cuda.synchronize()
    graphed_centers = d_centers.clone()
    graph = torch.cuda.CUDAGraph()
    capture_stream = torch.cuda.Stream()
    capture_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=capture_stream):
        # B=333: a size no call of this process has used, and no warm-up call for it
        captured = centerkern.center_loss(d_features, d_labels, graphed_centers, 0.5, out=graphed_centers,
                                          deterministic=True, sync=False)
    torch.cuda.synchronize()
    if not torch.equal(graphed_centers, d_centers):
        problems.append("capturing ran the step (the centers moved before any replay)")
    replay_stream = torch.cuda.Stream()  # neither the eager calls' stream nor the capture's
    replay_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(replay_stream):
        for _ in range(2):
            graph.replay()
    replay_stream.synchronize()
    found = {"B": 333, "replays": 2, "same_bits_as_eager": bool(torch.equal(graphed_centers, eager_centers)),
             "loss_same_bits": bool(torch.equal(captured.loss, eager.loss)),
             "grad_same_bits": bool(torch.equal(captured.grad, eager.grad))}
    for key in ("same_bits_as_eager", "loss_same_bits", "grad_same_bits"):
        if not found[key]:
            problems.append(f"graph replay: {key} is False")
    centerkern.cuda.check_errors()
    found["first_call_captured_in_a_fresh_process"] = _capture_first_call_in_a_fresh_process()
    if not found["first_call_captured_in_a_fresh_process"].get("equal"):
        problems.append("a capture as a fresh process's first call: " + str(found["first_call_captured_in_a_fresh_process"]))
    return found, problems


_CAPTURED_FIRST = """
import json, numpy as np, torch, centerkern, centerkern.cuda
rng = np.random.default_rng(9)
features = torch.as_tensor(rng.standard_normal((257, 12), dtype=np.float32), device="cuda")
labels = torch.as_tensor(rng.integers(0, 9, 257), device="cuda")
centers = torch.as_tensor(rng.standard_normal((9, 12), dtype=np.float32), device="cuda")
graphed = centers.clone()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):  # the process's first centerkern call: its record and kernels made here
    centerkern.center_loss(features, labels, graphed, 0.5, out=graphed, sync=False, deterministic=True)
graph.replay()
torch.cuda.synchronize()
eager = centers.clone()
centerkern.center_loss(features, labels, eager, 0.5, out=eager, deterministic=True)
print("CAPTURED", json.dumps({"equal": bool(torch.equal(graphed, eager))}))
"""


def _capture_first_call_in_a_fresh_process():
    done = subprocess.run([sys.executable, "-c", _CAPTURED_FIRST], capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("CAPTURED ")]
    if done.returncode != 0 or not lines:
        return {"equal": False, "exit_code": done.returncode, "error": done.stderr.strip()[-1500:]}
    return json.loads(lines[-1][len("CAPTURED "):])


# --------------------------------------------------------------------------- 7. memory


def memory(small, progress):
    if not TORCH_CUDA:
        raise NotPossible(NO_TORCH_CUDA)
    found = gpu_check.memory_outside_torch(*((1024, 64, 1000, 10) if small else (65536, 2048, 100_000, 100)))
    problems = []
    if found["outside_torch_growth_MB"] > MEMORY_GOAL_MB:
        problems.append(f"{found['outside_torch_growth_MB']:.1f} MB outside torch's allocator "
                        f"(goal <= {MEMORY_GOAL_MB:g} MB)")
    return found, problems


# --------------------------------------------------------------------------- the run


# Every stage needs the preflight's GPU. A failed direct_launch does not stop the others: they
# run on through Numba's own launch path (the report's launch_path says so), still worth having.
STAGES = [preflight, direct_launch, no_host_wait, streams_and_threads, bad_labels, graph_capture, memory]


def run_stage(function, small, progress):
    start = time.perf_counter()
    try:
        found, problems = function(small, progress)
        verdict = "failed" if problems else "passed"
        entry = {"verdict": verdict, "problems": problems, **found}
    except NotPossible as reason:
        entry = {"verdict": "not possible here", "why": str(reason)}
    except Exception as error:  # a crash is a finding: recorded, and the stage failed
        entry = {"verdict": "failed", "problems": [f"raised {type(error).__name__}: {error}"],
                 "traceback": traceback.format_exc()}
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="folder that receives first-run.json")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for the simulator")
    parser.add_argument("--sanitized-case", action="store_true",
                        help="run only the small case for compute-sanitizer, and no stage")
    args = parser.parse_args(argv)
    if args.sanitized_case:
        sanitized_case()
        return 0
    if args.out is None:
        parser.error("the output folder is required")
    if SIMULATED and args.small:
        gpu_check.shrink_simulated_launches()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "first-run.json")
    report = {"simulator": SIMULATED, "small": args.small, "stages": {}}
    for function in STAGES:
        name = function.__name__
        if name != "preflight" and report["stages"]["preflight"]["verdict"] == "failed":
            entry = {"verdict": "not run", "why": "preflight failed"}
        else:
            def progress(found, name=name):
                report["stages"][name] = {"verdict": "running", **found}
                gpu_check.save(report, path)
            entry = run_stage(function, args.small, progress)
        report["stages"][name] = entry
        report["launch_path"] = centerkern.cuda.launch_path()
        gpu_check.save(report, path)
        detail = "; ".join(entry.get("problems", [])) or entry.get("why", "")
        print(f"== {name}: {entry['verdict']} ({entry.get('seconds', 0)} s){': ' + detail if detail else ''}",
              flush=True)
    print(f"written: {path}")
    return 1 if any(entry["verdict"] == "failed" for entry in report["stages"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
