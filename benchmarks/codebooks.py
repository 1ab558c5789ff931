"""The EMA codebook and mini-batch k-means on the CPU, against vector-quantize-pytorch and scikit-learn.

    python benchmarks/codebooks.py [--quick] [--repeats 10] [--cases REGEX] [--no-memory]
                                   [--peer-memory-limit 4] [--out PATH]

In one process, on the same inputs, interleaved, medians of several calls after one warm-up
call each (the warm-up call is also the check that both sides compute the same thing):

* ``ema`` cases, N rows x K codes x D, float32, decay 0.8, eps 1e-5, vector-quantize-pytorch's
  smoothing (``current_code``):

  - forward + update: ``centerkern.torch.EMACodebook`` against vector-quantize-pytorch's
    ``Codebook`` (``ema_update=True``, no dead-code replacement), both in training mode, the
    peer loaded with the same state (``load_state_dict(strict=False)``): the nearest codes, the
    quantized rows and the EMA update;
  - the update alone, codes given: ``centerkern.codebooks.ema_update`` on NumPy arrays against
    the peer's ``Codebook.update_indices`` (its one-hot, the einsum of the rows by it, the EMA);
  - the peak memory of one forward + update call, each implementation and case in a fresh
    process (``--memory-case``): the peak resident set (``VmHWM``, reset by writing 5 to
    ``/proc/self/clear_refs`` once the setup is done) less the resident set before the call.
    The setup makes the inputs and the module and calls a second module once at a tiny size,
    so that loading the kernels is not counted; the call measured is the first at the case's
    size;

  the peer is not run where its N x K float32 one-hot would exceed ``--peer-memory-limit`` GiB
  (at N = K = 65536 it is 16 GiB); the output says so, the case is still run for ours.

* ``kmeans`` cases, D = 64, float32 and float64: ``centerkern.codebooks.MiniBatchKMeans``
  against scikit-learn's ``MiniBatchKMeans`` (``reassignment_ratio=0``), ``partial_fit`` of one
  batch (each assigns the batch, moves the centers, labels the batch again), and the update
  alone: ``centerkern.codebooks.kmeans_update`` against scikit-learn's own kernel
  ``_minibatch_update_dense``, called as its ``partial_fit`` calls it.

Threads: torch is pinned to ``os.cpu_count()`` threads (``torch.set_num_threads``); Numba,
NumPy's BLAS and scikit-learn's OpenMP keep their defaults (every core); all are recorded
(``threadpoolctl``). Calls under 0.2 s are timed by
``centerkern._cli.alternatives.interleaved_medians`` (blocks of calls, an untimed call at the
start of each block); longer ones one call per implementation per round, as many rounds as fit
in about 20 s, at least 3, and 2 where one round takes longer than 20 s (the largest cases: the
full run stays under 15 minutes on 2 cores).

The goals, printed and stored with met or missed: the update alone at least 10x faster than the
peer's one-hot einsum where K >= 8192 and never slower below; our peak memory O(N D + K D)
(below 4 (N D + K D) 8 bytes + 64 MiB; its ratio to the N x K one-hot's 4 N K bytes is
reported); mini-batch k-means' update no slower than scikit-learn's. Results go to
``benchmarks/results/codebooks-<date>.json`` (``--quick``: ``codebooks-quick-<date>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from centerkern._cli.alternatives import interleaved_medians  # noqa: E402
from centerkern._cli.reports import provenance, write_report  # noqa: E402

DECAY, EPS, SMOOTHING = 0.8, 1e-5, "current_code"
GRID = {"N": (8192, 65536), "K": (1024, 8192, 65536), "D": (64, 256)}
KMEANS_GRID = {"N": (8192, 65536), "K": (1024, 8192), "D": (64,), "dtype": ("float32", "float64")}
QUICK_GRID = {"N": (512,), "K": (64, 256), "D": (16,)}
QUICK_KMEANS_GRID = {"N": (512,), "K": (64,), "D": (16,), "dtype": ("float32", "float64")}
SHORT_CALL_S = 0.2  # below: interleaved_medians' blocks; above: one call per round
ROUND_BUDGET_S = 20.0  # the timed rounds of a case of long calls take about this much
MIN_REPEATS = 3
LONG_ROUND_S = 20.0  # a round longer than this: 2 timed calls
MIB = 1 << 20
GIB = 1 << 30
RATIO = "ratio to the one-hot's 4 N K bytes"
MEMORY_NOTE = ("peak memory: the peak resident set (VmHWM, reset after the setup through /proc/self/clear_refs) of a "
               "fresh process less its resident set before one forward + update call (the first at the case's size)")


def _pin_threads():
    import torch

    torch.set_num_threads(os.cpu_count())
    return torch.get_num_threads()


def _ema_inputs(rows, codes, width):
    """Rows around K random codes (each row 0.5 sigma from its code), the codes they were drawn
    from, and the codebook; made a block of rows at a time, so that the setup's temporaries stay
    far below the call's (the memory cases measure a high-water mark)."""
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((codes, width), dtype=np.float32)
    drawn = rng.integers(0, codes, rows)
    features = np.empty((rows, width), np.float32)
    for start in range(0, rows, 4096):
        block = features[start:start + 4096]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
        block *= 0.5
        block += embed[drawn[start:start + 4096]]
    return features, drawn, embed


def _state(embed):
    import torch

    codes, width = embed.shape
    return {"cluster_size": torch.zeros(1, codes), "embed_avg": torch.zeros(1, codes, width),
            "embed": torch.from_numpy(embed.copy()).reshape(1, codes, width)}


def _ours_module(embed):
    from centerkern.torch import EMACodebook

    module = EMACodebook(embed.shape[1], embed.shape[0], decay=DECAY, eps=EPS, smoothing=SMOOTHING)
    module.load_state_dict(_state(embed))
    return module.train()


def _peer_module(embed):
    from vector_quantize_pytorch.vector_quantize_pytorch import Codebook

    module = Codebook(embed.shape[1], embed.shape[0], decay=DECAY, eps=EPS, kmeans_init=False, ema_update=True,
                      dead_code_threshold_ratio=0.0)
    module.load_state_dict(_state(embed), strict=False)  # "initted" stays True (no k-means init)
    return module.train()


MODULES = {"centerkern": _ours_module, "vector-quantize-pytorch": _peer_module}


def _one_hot_bytes(rows, codes):
    return 4 * rows * codes


def _peer_skip_reason(rows, codes, limit_gib):
    one_hot = _one_hot_bytes(rows, codes)
    if one_hot > limit_gib * GIB:
        return f"not run: the one-hot would be {one_hot / GIB:g} GiB (limit {limit_gib:g} GiB, --peer-memory-limit)"
    return None


# --- the memory cases, each in a fresh process -----------------------------------------------

def _status_bytes(field):
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, from /proc (Linux)."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_peak_rss():
    """Start the peak resident set (``VmHWM``) again from the resident set now: the setup's own
    peak (imports, the inputs' temporaries) would otherwise hide every smaller call's."""
    Path("/proc/self/clear_refs").write_text("5")


def _memory_case(spec):
    """``IMPLEMENTATION,N,K,D``: one forward + update call, the peak resident set's increase."""
    import torch

    name, rows, codes, width = spec.split(",")
    rows, codes, width = int(rows), int(codes), int(width)
    threads = _pin_threads()
    features, _, embed = _ema_inputs(rows, codes, width)
    module = MODULES[name](embed)
    x = torch.from_numpy(features).reshape(1, rows, width)
    tiny_features, _, tiny_embed = _ema_inputs(8, 16, width)  # loads the kernels, at no size to speak of
    MODULES[name](tiny_embed)(torch.from_numpy(tiny_features).reshape(1, 8, width))
    _reset_peak_rss()
    baseline = _status_bytes("VmRSS")
    output = module(x)
    peak = _status_bytes("VmHWM")
    del output
    print(json.dumps({"baseline_mib": baseline / MIB, "peak_mib": peak / MIB,
                      "increase_mib": (peak - baseline) / MIB, "torch_threads": threads}))


def _measure_memory(name, rows, codes, width):
    completed = subprocess.run([sys.executable, __file__, "--memory-case", f"{name},{rows},{codes},{width}"],
                               capture_output=True, text=True)
    if completed.returncode != 0:
        return {"error": f"exit status {completed.returncode}: {completed.stderr.strip()[-500:]}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- timing -----------------------------------------------------------------------------------

def _warm(runs):
    """One call of each, timed: the warm-up, and what the repeats are chosen from."""
    seconds = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        seconds[name] = time.perf_counter() - start
    return seconds


def _medians(runs, warm_seconds, repeats):
    """Median seconds per call, interleaved, and how many calls each median is of."""
    if max(warm_seconds.values()) < SHORT_CALL_S:
        return interleaved_medians(runs, repeats, rounds=min(5, repeats)), repeats
    round_seconds = sum(warm_seconds.values())
    repeats = min(repeats, max(MIN_REPEATS, int(ROUND_BUDGET_S / round_seconds)))
    if round_seconds > LONG_ROUND_S:
        repeats = min(repeats, 2)
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}, repeats


# --- the EMA codebook ---------------------------------------------------------------------------

def _check_forward(ours_output, peer_output, ours_module, peer_module, case):
    """The warm-up calls from the same state: the same codes (but for near ties), the same
    quantized rows, the same codebook after the update (away from codes that a differing row touched)."""
    ours_codes = ours_output.codes.reshape(-1).numpy()
    peer_codes = peer_output[1].reshape(-1).numpy()
    same = ours_codes == peer_codes
    if same.mean() < 0.999:
        raise AssertionError(f"{case}: only {same.mean():.4%} of the codes agree with vector-quantize-pytorch's")
    np.testing.assert_array_equal(ours_output.quantize.reshape(-1, ours_output.quantize.shape[-1]).numpy()[same],
                                  peer_output[0].reshape(-1, peer_output[0].shape[-1]).numpy()[same], err_msg=case)
    clean = np.ones(ours_module.codebook_size, bool)
    clean[ours_codes[~same]] = clean[peer_codes[~same]] = False
    for buffer in ("cluster_size", "embed_avg", "embed"):
        np.testing.assert_allclose(getattr(ours_module, buffer)[0].numpy()[clean],
                                   getattr(peer_module, buffer)[0].numpy()[clean], rtol=1e-3, atol=1e-4,
                                   err_msg=f"{case}: {buffer}")


def _check_update(ours_state, peer_module, case):
    for buffer, ours in zip(("cluster_size", "embed_avg", "embed"), ours_state):
        np.testing.assert_allclose(ours, getattr(peer_module, buffer)[0].numpy(), rtol=1e-3, atol=1e-4,
                                   err_msg=f"{case}: update alone, {buffer}")


def _ema_case(rows, codes, width, args):
    import torch

    from centerkern.codebooks import ema_update

    case = f"ema N={rows} K={codes} D={width}"
    print(f"{case}: running", flush=True)
    skipped = _peer_skip_reason(rows, codes, args.peer_memory_limit)
    features, drawn, embed = _ema_inputs(rows, codes, width)
    x = torch.from_numpy(features).reshape(1, rows, width)
    ours = _ours_module(embed)
    state = (np.zeros(codes, np.float32), np.zeros((codes, width), np.float32), embed.copy())
    update = dict(decay=DECAY, eps=EPS, smoothing=SMOOTHING)
    runs = {"centerkern forward+update": lambda: ours(x),
            "centerkern update": lambda: ema_update(features, drawn, *state, **update)}
    if skipped is None:
        peer, peer_alone = _peer_module(embed), _peer_module(embed)
        indices = torch.from_numpy(drawn).reshape(1, rows)
        runs["vector-quantize-pytorch forward+update"] = lambda: peer(x)
        runs["vector-quantize-pytorch update"] = lambda: peer_alone.update_indices(x, indices)
        outputs = {}
        warm = {}
        for name, run in runs.items():  # the warm-up calls, kept for the check
            start = time.perf_counter()
            outputs[name] = run()
            warm[name] = time.perf_counter() - start
        _check_forward(outputs["centerkern forward+update"], outputs["vector-quantize-pytorch forward+update"],
                       ours, peer, case)
        _check_update(state, peer_alone, case)
        del outputs
    else:
        warm = _warm(runs)
    medians, repeats = _medians(runs, warm, args.repeats)
    result = {"N": rows, "K": codes, "D": width, "one-hot bytes": _one_hot_bytes(rows, codes), "repeats": repeats,
              "median_ms": {name: 1e3 * seconds for name, seconds in medians.items()}}
    if skipped is None:
        result["peer / centerkern"] = {
            what: medians[f"vector-quantize-pytorch {what}"] / medians[f"centerkern {what}"]
            for what in ("update", "forward+update")}
    else:
        result["vector-quantize-pytorch"] = skipped
    if not args.no_memory:
        result["peak memory"] = {"what": "the peak resident-set increase of one forward+update call, MiB"}
        for name in MODULES:
            if name != "centerkern" and skipped is not None:
                result["peak memory"][name] = skipped
                continue
            memory = _measure_memory(name, rows, codes, width)
            if "increase_mib" in memory:
                memory[RATIO] = memory["increase_mib"] * MIB / _one_hot_bytes(rows, codes)
            result["peak memory"][name] = memory
    return case, result


def _print_ema(case, result):
    print(f"{case}  (one-hot N x K float32: {result['one-hot bytes'] / MIB:,.0f} MiB; "
          f"{result['repeats']} timed calls each)", flush=True)
    for name, ms in result["median_ms"].items():
        print(f"  {name:42s} {ms:10.2f} ms")
    if "peer / centerkern" in result:
        ratios = result["peer / centerkern"]
        print(f"  peer / centerkern: update {ratios['update']:.2f}x, forward+update {ratios['forward+update']:.2f}x")
    else:
        print(f"  vector-quantize-pytorch: {result['vector-quantize-pytorch']}")
    for name, memory in result.get("peak memory", {}).items():
        if name == "what":
            continue
        if isinstance(memory, str):
            print(f"  peak memory, {name}: {memory}")
        elif "error" in memory:
            print(f"  peak memory, {name}: failed, {memory['error']}")
        else:
            print(f"  peak memory of one forward+update call, {name}: +{memory['increase_mib']:,.1f} MiB over the "
                  f"setup's {memory['baseline_mib']:,.1f} MiB ({memory[RATIO]:.3f} x the "
                  f"one-hot's bytes)")
    sys.stdout.flush()


def _ema_goals(case, result, goals):
    rows, codes, width = result["N"], result["K"], result["D"]
    if "peer / centerkern" in result:
        target = 10.0 if codes >= 8192 else 1.0
        value = result["peer / centerkern"]["update"]
        goals[f"{case}: update alone, peer's one-hot einsum / centerkern"] = {
            "value": value, "target": f">= {target:g}", "met": value >= target}
    ours = result.get("peak memory", {}).get("centerkern")
    if ours and "increase_mib" in ours:
        bound = (4 * (rows * width + codes * width) * 8 + 64 * MIB) / MIB
        goals[f"{case}: centerkern's peak memory increase, MiB"] = {
            "value": ours["increase_mib"], "target": f"<= {bound:,.1f} (4 (N D + K D) 8 bytes + 64 MiB)",
            "met": ours["increase_mib"] <= bound,
            RATIO: ours["increase_mib"] * MIB / result["one-hot bytes"]}


# --- mini-batch k-means -----------------------------------------------------------------------

def _kmeans_case(rows, codes, width, dtype, args):
    from sklearn.cluster import MiniBatchKMeans as SklearnKMeans

    from centerkern.codebooks import MiniBatchKMeans, kmeans_update

    case = f"kmeans N={rows} K={codes} D={width} {dtype}"
    print(f"{case}: running", flush=True)
    features, drawn, init = _ema_inputs(rows, codes, width)
    features, init = features.astype(dtype), init.astype(dtype)
    ours = MiniBatchKMeans(init)
    theirs = SklearnKMeans(n_clusters=codes, init=init, n_init=1, reassignment_ratio=0.0, batch_size=rows)
    ours_centers, ours_sums = init.copy(), np.zeros(codes, dtype)
    runs = {"centerkern partial_fit": lambda: ours.partial_fit(features),
            "scikit-learn partial_fit": lambda: theirs.partial_fit(features),
            "centerkern update": lambda: kmeans_update(features, drawn, ours_centers, ours_sums)}
    kernel_note = "scikit-learn's _minibatch_update_dense, called as its partial_fit calls it"
    try:
        from sklearn.cluster._k_means_minibatch import _minibatch_update_dense
        from sklearn.utils._openmp_helpers import _openmp_effective_n_threads
    except ImportError as error:
        kernel_note = f"scikit-learn's update kernel is not importable ({error}): partial_fit only"
    else:
        threads = _openmp_effective_n_threads()
        weights, labels = np.ones(rows, dtype), drawn.astype(np.int32)
        their_centers, their_sums = init.copy(), np.zeros(codes, dtype)
        # partial_fit passes the same array as the old and the new centers
        runs["scikit-learn update"] = lambda: _minibatch_update_dense(
            features, weights, their_centers, their_centers, their_sums, labels, threads)
    warm = _warm(runs)
    tolerance = dict(rtol=1e-4 if dtype == "float32" else 1e-10, atol=1e-5 if dtype == "float32" else 1e-12)
    np.testing.assert_allclose(ours.cluster_centers_, theirs.cluster_centers_, err_msg=f"{case}: partial_fit",
                               **tolerance)
    if "scikit-learn update" in runs:
        np.testing.assert_allclose(ours_centers, their_centers, err_msg=f"{case}: update", **tolerance)
        np.testing.assert_allclose(ours_sums, their_sums, err_msg=f"{case}: update", **tolerance)
    medians, repeats = _medians(runs, warm, args.repeats)
    result = {"N": rows, "K": codes, "D": width, "dtype": dtype, "repeats": repeats, "update kernel": kernel_note,
              "median_ms": {name: 1e3 * seconds for name, seconds in medians.items()},
              "scikit-learn / centerkern": {"partial_fit": medians["scikit-learn partial_fit"]
                                            / medians["centerkern partial_fit"]}}
    if "scikit-learn update" in medians:
        result["scikit-learn / centerkern"]["update"] = medians["scikit-learn update"] / medians["centerkern update"]
    return case, result


def _print_kmeans(case, result):
    print(f"{case}  ({result['repeats']} timed calls each)")
    for name, ms in result["median_ms"].items():
        print(f"  {name:42s} {ms:10.3f} ms")
    ratios = ", ".join(f"{what} {ratio:.2f}x" for what, ratio in result["scikit-learn / centerkern"].items())
    print(f"  scikit-learn / centerkern: {ratios}  [update kernel: {result['update kernel']}]", flush=True)


def _kmeans_goals(case, result, goals):
    value = result["scikit-learn / centerkern"].get("update")
    if value is not None:
        goals[f"{case}: update alone, scikit-learn / centerkern"] = {
            "value": value, "target": ">= 1", "met": value >= 1.0}


# --- the whole run ------------------------------------------------------------------------------

def _grid(grid):
    keys = list(grid)
    points = [[]]
    for key in keys:
        points = [point + [value] for point in points for value in grid[key]]
    return points


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats: a smoke test")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per implementation and case (default 10, --quick 2); cases of long "
                             "calls take fewer, never fewer than 3")
    parser.add_argument("--cases", default=None,
                        help="a regular expression: only the cases whose names it matches (re.search), "
                             "e.g. 'ema N=8192', 'K=1024 ', '^kmeans', 'float64'")
    parser.add_argument("--peer-memory-limit", type=float, default=4.0,
                        help="GiB: vector-quantize-pytorch is not run where its N x K float32 one-hot exceeds this")
    parser.add_argument("--no-memory", action="store_true", help="no peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        _memory_case(args.memory_case)
        return
    if args.repeats is None:
        args.repeats = 2 if args.quick else 10
    selected = re.compile(args.cases) if args.cases else None
    started = time.perf_counter()
    torch_threads = _pin_threads()

    import numba
    import sklearn.cluster  # noqa: F401  (its OpenMP runtime, for threadpool_info)
    import threadpoolctl
    from sklearn.utils._openmp_helpers import _openmp_effective_n_threads

    threads = {"torch (torch.set_num_threads(os.cpu_count()))": torch_threads, "numba": numba.get_num_threads(),
               "numba threading layer": None, "scikit-learn OpenMP": _openmp_effective_n_threads(),
               "thread pools": [{key: pool.get(key) for key in ("user_api", "internal_api", "num_threads", "version")}
                                for pool in threadpoolctl.threadpool_info()]}
    print(f"threads: torch pinned to os.cpu_count() = {torch_threads}; numba {threads['numba']}; "
          f"scikit-learn's OpenMP {threads['scikit-learn OpenMP']}; "
          + ", ".join(f"{pool['internal_api']} {pool['num_threads']}" for pool in threads["thread pools"]), flush=True)
    report = {"what": "EMA codebook forward + update and mini-batch k-means on the CPU, median ms", **provenance(),
              "quick": args.quick, "threads": threads,
              "settings": {"decay": DECAY, "eps": EPS, "smoothing": SMOOTHING, "dtype (ema)": "float32",
                           "peer memory limit, GiB": args.peer_memory_limit, "repeats": args.repeats},
              "peak memory": ("not measured (--no-memory)" if args.no_memory else MEMORY_NOTE),
              "ema": {}, "kmeans": {}, "goals": {}}
    if not args.no_memory:
        print(MEMORY_NOTE, flush=True)
    if args.quick:
        print("--quick: sizes far below the goals' (met or missed means nothing here)", flush=True)
    for rows, codes, width in _grid(QUICK_GRID if args.quick else GRID):
        name = f"ema N={rows} K={codes} D={width}"
        if selected and not selected.search(name):
            continue
        case, result = _ema_case(rows, codes, width, args)
        _print_ema(case, result)
        report["ema"][case] = result
        _ema_goals(case, result, report["goals"])
    for rows, codes, width, dtype in _grid(QUICK_KMEANS_GRID if args.quick else KMEANS_GRID):
        name = f"kmeans N={rows} K={codes} D={width} {dtype}"
        if selected and not selected.search(name):
            continue
        case, result = _kmeans_case(rows, codes, width, dtype, args)
        _print_kmeans(case, result)
        report["kmeans"][case] = result
        _kmeans_goals(case, result, report["goals"])
    print("goals:")
    for name, goal in report["goals"].items():
        print(f"  {name:70s} {goal['value']:9.2f} (target {goal['target']}): {'met' if goal['met'] else 'MISSED'}")
    try:
        threads["numba threading layer"] = numba.threading_layer()
    except ValueError:  # no parallel kernel ran
        pass
    report["wall seconds"] = time.perf_counter() - started
    print(f"wall time: {report['wall seconds']:.0f} s")
    stem = "codebooks-quick" if args.quick else "codebooks"
    write_report(report, args.out or Path(__file__).parent / "results" / f"{stem}-{report['date'][:10]}.json")


if __name__ == "__main__":
    main()
