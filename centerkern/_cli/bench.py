"""``python -m centerkern bench``: centerkern against the implementations a user would otherwise pick.

Every implementation runs in this one process, on the same inputs, timed in interleaved blocks
(``alternatives.interleaved_medians``), and the tables give medians with two ratios: against torch
eager (the usual choice) and against the memory-bandwidth floor: a parallel copy, on every
core, of the bytes the step must move at least (read the features, the labels and the touched
center rows; write the grad and those rows; ``alternatives.floor_bytes``). An alternative whose library is
missing, or that fails here, is listed as absent with the reason, never silently dropped.
``GOALS`` are the targets for the ``numba`` backend, each reported as met or missed.

Results (machine, versions, thread counts, date, every median) go to a JSON file under
``benchmarks/results/``, and PNG plots of the sweeps beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from .alternatives import ALPHA, FLOOR, TORCH, WITH_GRAD_OUT, Absent, implementations, interleaved_medians
from .reports import provenance, write_report
from .._core.rules import RULES


@dataclass(frozen=True)
class Size:
    name: str
    batch: int
    width: int
    classes: int
    hot_share: float = 0.0  # share of the batch in 3 hot classes
    # facenet moves a class n_j * (1 - alpha) of the way: with ~300 samples of a hot class, 0.95
    # diverges within a few calls (its issue #528), and timing infinities would be pointless
    alpha: float = ALPHA
    # the large sizes time centerkern against torch eager and the floor only (the NumPy alternatives
    # take seconds per call there), and the step of one rule
    large: bool = False

    def label(self) -> str:
        hot = f", {self.hot_share:.0%} in 3 classes, alpha {self.alpha}" if self.hot_share else ""
        return f"{self.name} (B={self.batch}, D={self.width}, K={self.classes}{hot})"


SIZES = {
    "S": Size("S", 256, 128, 1000),
    "M": Size("M", 1024, 512, 10_000),
    "L": Size("L", 8192, 512, 100_000),
    "hot": Size("hot", 1024, 512, 10_000, hot_share=0.9, alpha=0.999),
    "L hot": Size("L hot", 8192, 512, 100_000, hot_share=0.9, alpha=0.999, large=True),
    "B=16k": Size("B=16k", 16_384, 256, 50_000, large=True),
    "B=32k": Size("B=32k", 32_768, 256, 50_000, large=True),
    "B=65k": Size("B=65k", 65_536, 256, 50_000, large=True),
}
LARGE_PEERS = ("centerkern numba", WITH_GRAD_OUT, TORCH, FLOOR)
LARGE_OPERATIONS = ["step facenet"]

# The numba backend's targets through the public API (center_loss(x, y, c, alpha, out=c)):
# (what, size, operation, implementation, the most it may take, against what).
GOALS = [
    ("M: step / floor", "M", "step facenet", "centerkern numba", 1.3, FLOOR),
    ("L: step / floor", "L", "step facenet", "centerkern numba", 1.3, FLOOR),
    ("M, grad_out=: step / floor", "M", "step facenet", WITH_GRAD_OUT, 1.2, FLOOR),
    ("L, grad_out=: step / floor", "L", "step facenet", WITH_GRAD_OUT, 1.2, FLOOR),
    ("B=32k, grad_out=: step / floor", "B=32k", "step facenet", WITH_GRAD_OUT, 1.5, FLOOR),
    ("B=65k, grad_out=: step / floor", "B=65k", "step facenet", WITH_GRAD_OUT, 1.5, FLOOR),
    ("L, 90% in 3 classes: step / floor", "L hot", "step facenet", "centerkern numba", 1.5, FLOOR),
    ("M: scatter / its floor", "M", "scatter", "centerkern numba", 1.2, FLOOR),
    ("L: scatter / its floor", "L", "scatter", "centerkern numba", 1.2, FLOOR),
]
SWEEPS = {  # the variable, its values, and the other two fixed
    "B": ([64, 256, 1024, 4096, 16384], lambda b: Size(f"B={b}", b, 512, 10_000)),
    "K": ([1_000, 10_000, 100_000, 1_000_000], lambda k: Size(f"K={k}", 1024, 64, k)),
    "D": ([16, 64, 256, 1024], lambda d: Size(f"D={d}", 1024, d, 10_000)),
}
OPERATIONS = [f"step {rule}" for rule in RULES] + ["scatter"]


def make_inputs(size: Size, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, size.classes, size.batch)
    if size.hot_share:
        hot = rng.choice(size.classes, 3, replace=False)
        labels = np.where(rng.random(size.batch) < size.hot_share, rng.choice(hot, size.batch), labels)
    return (rng.standard_normal((size.batch, size.width), dtype=np.float32), labels.astype(np.int64),
            rng.standard_normal((size.classes, size.width), dtype=np.float32),
            rng.standard_normal((size.batch, size.width), dtype=np.float32))


# --------------------------------------------------------------------------- measuring


def measure_size(size: Size, operations, makers, repeats: int, progress) -> dict:
    """Medians (seconds) of every implementation of every operation at one size."""
    inputs = make_inputs(size)
    result = {"B": size.batch, "D": size.width, "K": size.classes, "hot_share": size.hot_share, "alpha": size.alpha,
              "median_seconds": {}, "absent": {}}
    for operation in operations:
        runnable = {}
        for name, make in makers.items():
            try:
                runnable[name] = make(*inputs, operation, size.alpha).run
            except Absent as reason:
                result["absent"].setdefault(operation, {})[name] = str(reason)
        result["median_seconds"][operation] = interleaved_medians(runnable, repeats)
        progress.update(1)
    return result


def goals(report: dict) -> list[dict]:
    """Each of ``GOALS`` whose size was measured, met or missed, with its figure; and whether
    torch eager was ever faster than centerkern at any size (step or scatter)."""
    results = []
    for what, size, operation, name, most, against in GOALS:
        medians = report["sizes"].get(size, {}).get("median_seconds", {}).get(operation, {})
        if name in medians and against in medians:
            ratio = medians[name] / medians[against]
            results.append({"goal": what, "at most": most, "ratio": round(ratio, 3), "met": ratio <= most})
    slower = []
    for size, measured in report["sizes"].items():
        for operation, medians in measured["median_seconds"].items():
            ours = medians.get("centerkern numba")  # as called by default: no grad_out
            if ours is not None and TORCH in medians:
                slower.append((medians[TORCH] / ours, f"{size} {operation}"))
    if slower:
        worst, where = min(slower)
        results.append({"goal": "torch eager never faster (torch eager / centerkern, worst case)",
                        "at most": 1.0, "ratio": round(1 / worst, 3), "met": worst >= 1.0, "where": where})
    return results


def print_goals(results: list[dict]) -> None:
    print("\ngoals of the numba backend (time / reference, medians)")
    for goal in results:
        verdict = "met" if goal["met"] else "MISSED"
        where = f" (worst: {goal['where']})" if "where" in goal else ""
        print(f"  {goal['goal']:60s} {goal['ratio']:6.2f}x  goal <= {goal['at most']}x  {verdict}{where}")


def compile_cost() -> dict:
    """First call of ``center_loss`` in a fresh process (serial regime): with an empty kernel
    cache, then warm (``python -m centerkern bench --first-call`` measures every case)."""
    from .first_call import _run_child

    with tempfile.TemporaryDirectory() as cache:
        cold, warm = _run_child("serial", cache), _run_child("warm", cache)
    return {"cold cache seconds": cold["seconds"], "warm cache seconds": warm["seconds"]}


def _threads() -> dict:
    threads = {"numba": numba.get_num_threads(), "cpus": os.cpu_count()}
    try:
        threads["numba threading layer"] = numba.threading_layer()
    except ValueError:
        threads["numba threading layer"] = None
    try:
        import torch
        threads["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    return threads


def print_table(title: str, medians: dict, absent: dict) -> None:
    floor = medians.get(FLOOR)
    torch_time = medians.get(TORCH)
    print(f"\n{title}")
    print(f"  {'implementation':32s} {'median':>11s} {'/ torch eager':>14s} {'/ floor':>9s}")
    for name, seconds in sorted(medians.items(), key=lambda item: item[1]):
        versus_torch = f"{seconds / torch_time:13.2f}x" if torch_time else f"{'-':>14s}"
        versus_floor = f"{seconds / floor:8.2f}x" if floor else f"{'-':>9s}"
        print(f"  {name:32s} {seconds * 1e6:9.1f} us {versus_torch} {versus_floor}")
    for name, reason in absent.items():
        print(f"  {name:32s} absent: {reason}")


# how the plot names each implementation, in the legend's order (others follow under their own name)
PLOT_NAMES = {
    "centerkern numba": "centerkern (numba backend)",
    TORCH: "torch eager",
    "torch.compile": "torch.compile",
    "jax jit": "JAX jit",
    "tensorflow tf.function": "TensorFlow tf.function",
    "numpy sort + reduceat": "NumPy sort + reduceat",
    FLOOR: "bandwidth floor (a copy of the same bytes)",
}
PLOT_OPERATION = "step facenet"


def _fixed_sizes(points: list[dict], variable: str) -> str:
    """The sizes a sweep holds fixed, as its points record them: ``D=512, K=10000``."""
    fixed = [f"{name}={points[0][name]}" for name in ("B", "D", "K") if name != variable and name in points[0]]
    return ", ".join(fixed)


def plot(report: dict, directory: Path) -> list[str]:
    """The sweeps, drawn to be read at the width of a page (about 900 pixels): time of one
    facenet step against B and against K per implementation, and its ratio to the bandwidth
    floor against B (log axes), one legend for the three panels below them."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.figure import Figure  # no pyplot: nothing global to close afterwards
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return []
    sweeps = {variable: points for variable, points in report["sweeps"].items() if variable in ("B", "K") and points}
    if not sweeps:
        return []

    def measured(points: list[dict], name: str, variable: str) -> tuple[list, list[dict]]:
        kept = [point for point in points if name in point["median_seconds"][PLOT_OPERATION]]
        return [point[variable] for point in kept], [point["median_seconds"][PLOT_OPERATION] for point in kept]

    present = {name for points in sweeps.values() for point in points for name in point["median_seconds"][PLOT_OPERATION]}
    names = [name for name in PLOT_NAMES if name in present] + sorted(present - set(PLOT_NAMES))
    palette = ["#1f4e9c", "#d95f02", "#7570b3", "#1b9e77", "#e7298a", "#66a61e", "#a6761d", "#666666"]
    others = iter(palette[1:])
    style = {}
    for name in names:  # the same in every panel: centerkern bold, the floor black and dashed
        if name == "centerkern numba":
            style[name] = {"color": palette[0], "linewidth": 2.8, "marker": "o", "markersize": 6, "zorder": 3}
        elif name == FLOOR:
            style[name] = {"color": "black", "linewidth": 1.6, "linestyle": "--", "marker": "s", "markersize": 4}
        else:
            style[name] = {"color": next(others, "gray"), "linewidth": 1.4, "marker": "o", "markersize": 4}
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}")

    figure = Figure(figsize=(9, 8.4))
    grid = figure.add_gridspec(2, 2, height_ratios=[1, 1])
    panels = []
    for column, variable in enumerate(("B", "K")):
        if variable not in sweeps:
            continue
        axis = figure.add_subplot(grid[0, column])
        for name in names:
            xs, medians = measured(sweeps[variable], name, variable)
            if xs:
                axis.plot(xs, [median[name] * 1e6 for median in medians], label=PLOT_NAMES.get(name, name), **style[name])
        axis.set_xlabel(variable)
        axis.set_ylabel("µs per step (median)")
        axis.set_title(f"time against {variable}\n({_fixed_sizes(sweeps[variable], variable)})")
        panels.append((axis, variable))
    if "B" in sweeps:
        axis = figure.add_subplot(grid[1, 0])
        for name in names:
            if name == FLOOR:
                continue
            xs, medians = measured(sweeps["B"], name, "B")
            pairs = [(x, median[name] / median[FLOOR]) for x, median in zip(xs, medians) if FLOOR in median]
            if pairs:
                axis.plot(*zip(*pairs), label=PLOT_NAMES.get(name, name), **style[name])
        axis.axhline(1.0, color="black", linewidth=1.6, linestyle="--")  # the floor's own style
        axis.set_xlabel("B")
        axis.set_ylabel("time / floor (1: at the floor)")
        axis.set_title(f"ratio to the bandwidth floor\n({_fixed_sizes(sweeps['B'], 'B')})")
        panels.append((axis, "B"))
    for axis, variable in panels:
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xticks(sorted({point[variable] for point in sweeps[variable]}))  # the values measured
        axis.xaxis.set_major_formatter(plain)
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.yaxis.set_major_formatter(plain)
        axis.grid(True, which="major", alpha=0.4)
        axis.grid(True, which="minor", alpha=0.15)
    if "B" in sweeps:  # ratios span one or two decades: ticks at 1, 2, 5, 10, ...
        ratio, _ = panels[-1]
        low, high = ratio.get_ylim()
        ratio.set_yticks([tick for tick in (1, 2, 5, 10, 20, 50, 100, 200, 500) if low <= tick <= high])
        ratio.yaxis.set_minor_formatter(NullFormatter())
    # the legend has the fourth cell to itself: nothing drawn over a curve, names at full size
    legend = figure.add_subplot(grid[1, 1])
    legend.axis("off")
    handles = {}
    for axis, _ in panels:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    legend.legend(handles.values(), handles.keys(), loc="center", frameon=False, fontsize=10.5,
                  title=f"one facenet step, float32\n{report['date'][:10]}, {report.get('machine', '')}, "
                        f"{report.get('threads', {}).get('numba', '?')} Numba threads",
                  title_fontsize=10.5)
    figure.tight_layout()
    path = directory / f"bench-{report['date'][:10]}.png"
    figure.savefig(path, dpi=100)
    return [str(path)]


def parse_size(text: str) -> Size:
    batch, width, classes = (int(part) for part in text.split(","))
    return Size(f"custom {text}", batch, width, classes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--first-call" in argv:  # the fresh-process first-call cases, with options of their own
        from . import first_call

        return first_call.main([argument for argument in argv if argument != "--first-call"])
    parser = argparse.ArgumentParser(prog="python -m centerkern bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--size", action="append", type=parse_size, default=[], metavar="B,D,K",
                        help="another size to measure (repeatable)")
    parser.add_argument("--sweeps", nargs="*", default=["B", "K", "D"], choices=sorted(SWEEPS))
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per implementation")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles for minutes)")
    parser.add_argument("--no-compile-cost", action="store_true", help="skip the fresh-process first-call timing")
    parser.add_argument("--first-call", action="store_true",
                        help="instead: every first-call case, each in a fresh process with an empty kernel cache "
                             "(its own options: --repeats, --output)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/bench-<date>.json)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    report = {**provenance(), "sizes": {}, "sweeps": {}}
    output = Path(args.output or Path("benchmarks") / "results" / f"bench-{report['date'][:10]}.json")
    output.parent.mkdir(parents=True, exist_ok=True)  # the plots go beside it

    makers = implementations(with_compile=not args.no_compile)
    sweep_makers = {name: makers[name] for name in makers
                    if name in {"centerkern numba", TORCH, "numpy sort + reduceat", "jax jit",
                                "tensorflow tf.function", FLOOR}}
    sizes = [SIZES[name] for name in args.sizes] + args.size
    sweep_points = [(variable, value, SWEEPS[variable][1](value)) for variable in args.sweeps
                    for value in SWEEPS[variable][0]]
    total = sum(len(LARGE_OPERATIONS if size.large else OPERATIONS) for size in sizes) + len(sweep_points)
    progress = tqdm(total=total, desc="bench", file=sys.stderr) if tqdm else _NoProgress()

    large_makers = {name: make for name, make in makers.items() if name in LARGE_PEERS}
    for size in sizes:
        report["sizes"][size.name] = (
            measure_size(size, LARGE_OPERATIONS, large_makers, args.repeats, progress) if size.large
            else measure_size(size, OPERATIONS, makers, args.repeats, progress)
        )
    for variable, value, size in sweep_points:
        point = measure_size(size, ["step facenet"], sweep_makers, max(5, args.repeats // 3), progress)
        report["sweeps"].setdefault(variable, []).append({variable: value, **point})
    progress.close()
    report["threads"] = _threads()
    if not args.no_compile_cost:
        report["compile_cost"] = compile_cost()

    report["goals"] = goals(report)
    for size in sizes:
        measured = report["sizes"][size.name]
        for operation in measured["median_seconds"]:
            print_table(f"{operation}, {size.label()}, float32", measured["median_seconds"][operation],
                        measured["absent"].get(operation, {}))
    if "compile_cost" in report:
        cost = report["compile_cost"]
        print(f"\nfirst center_loss in a fresh process (import included): cold Numba cache "
              f"{cost['cold cache seconds']:.2f} s, warm cache {cost['warm cache seconds']:.2f} s")
    print_goals(report["goals"])
    if not args.no_plots and report["sweeps"]:
        for path in plot(report, output.parent):
            print(f"plot: {path}")
    write_report(report, output)
    return 0


class _NoProgress:
    def update(self, count):
        pass

    def close(self):
        pass
