"""Sharded centers against replicated ones: step time and each rank's peak memory, at scale.

Runs R local processes (gloo over 127.0.0.1) for each R in --ranks. Every rank's batch is B
samples of K classes drawn uniformly (as in face recognition: about B distinct classes a batch)
and a step of ``centerkern.distributed.center_loss`` (rule wen) is timed three ways, interleaved
after a barrier, medians on rank 0:

* ``sharded``: Shard(0) centers, K/R rows a rank, two all-to-all rounds;
* ``sparse`` and ``dense``: the data-parallel step on a (K, D) replica per rank.

The sharded step is checked to give the sparse step's centers bit for bit. Then each placement's
peak memory is measured alone: each rank's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over making its centers and three steps, less its resident set just
before (the framework's baseline). The goal: at most K·D·itemsize/R + 3 x the batch's bytes.

Last, --huge-classes on --huge-ranks (default 10^7 classes on 4 ranks: 5.1 GB of float32 centers,
which four replicas could not hold on a 24 GB machine): the sharded step alone, timed and measured.

    python benchmarks/distributed_sharded.py               # K = 10^6, D = 128, B = 1024; R = 2, 4; then K = 10^7
    python benchmarks/distributed_sharded.py --ranks 2 --classes 1000 --width 8 --batch 16 --repeats 2 \\
        --huge-classes 4000 --huge-ranks 2 --out /tmp/sharded.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import time
from pathlib import Path

import numpy as np

from centerkern.testing.local_ranks import run_on_local_ranks
from centerkern._cli.reports import provenance, write_report

PLACEMENTS = ("sharded", "sparse", "dense")
SLOWER_AT_MOST = 1.5  # the sharded step against the faster data-parallel exchange
BATCH_COPIES = 3  # the memory goal's allowance: 3 x the batch's bytes


def _memory_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS


def _measure(rank, world_size, config):
    """One rank's timings and peak memory (run_on_local_ranks: one thread a rank, gloo over 127.0.0.1)."""
    import torch
    import torch.distributed as dist

    import centerkern.distributed as center_distributed

    classes, width, batch, placements = config["classes"], config["width"], config["batch"], config["placements"]
    rng = np.random.default_rng(1000 + rank)

    def batches(count):
        return [(torch.from_numpy(rng.standard_normal((batch, width)).astype(np.float32)),
                 torch.from_numpy(rng.integers(0, classes, batch))) for _ in range(count)]

    def make(placement):
        """The centers of a placement, every page touched (normal values, not lazily mapped zeros)."""
        if placement == "sharded":
            centers = center_distributed.shard_centers((classes, width))
            centers.to_local().normal_(generator=torch.Generator().manual_seed(rank))
            return centers
        return torch.randn(classes, width, generator=torch.Generator().manual_seed(7))

    def step(placement, centers, features, labels):
        exchange = {"sharded": "auto", "sparse": "sparse", "dense": "dense"}[placement]
        center_distributed.center_loss(features, labels, centers, 0.5, rule="wen", out=centers, exchange=exchange)

    # warm up: the kernels loaded, gloo's buffers made, at a toy size
    for placement in placements:
        small = center_distributed.shard_centers((64, width)) if placement == "sharded" else torch.zeros(64, width)
        features = torch.zeros(4, width)
        center_distributed.center_loss(features, torch.arange(4), small, 0.5, rule="wen", out=small,
                                       exchange="dense" if placement == "dense" else "auto")
    report = {"ranks": world_size, "classes": classes, "width": width, "batch_per_rank": batch}

    if config["timed"]:
        if placements == ("sharded",):  # no replica: nothing K x D on any rank
            centers = {"sharded": make("sharded")}
        else:  # the same start for all: the sharded rows are the replica's own rows
            start = make("sparse")
            centers = {"sharded": center_distributed.shard_centers(start)}
            for placement in placements:
                if placement != "sharded":
                    centers[placement] = start.clone()
            del start
        timed = batches(config["repeats"] + 1)
        times = {placement: [] for placement in placements}
        for repeat, (features, labels) in enumerate(timed):  # the first round warms up
            for placement in placements:
                dist.barrier()
                began = time.perf_counter()
                step(placement, centers[placement], features, labels)
                elapsed = time.perf_counter() - began
                if repeat:
                    times[placement].append(elapsed)
        for placement in placements:
            report[f"{placement}_ms"] = 1e3 * statistics.median(times[placement])
        if "sparse" in centers:
            report["sharded_equals_sparse_bitwise"] = bool(torch.equal(centers["sharded"].full_tensor(), centers["sparse"]))
        del centers, timed
        gc.collect()

    for placement in placements:  # each alone: its own peak
        measured = batches(3)
        gc.collect()
        before = _memory_mb("VmRSS")
        _reset_peak()
        centers = make(placement)
        for features, labels in measured:
            step(placement, centers, features, labels)
        peak = _memory_mb("VmHWM") - before
        dist.barrier()
        del centers
        gc.collect()
        peaks = [None] * world_size
        dist.all_gather_object(peaks, peak)
        report[f"{placement}_peak_mb_per_rank"] = max(peaks)
        report["baseline_mb"] = before
    return report


def _run(world_size, config):
    return run_on_local_ranks(_measure, world_size, config, time_limit=3600, collective_timeout=1800)[0]


def memory_goal_mb(row) -> float:
    """K·D·itemsize / R plus 3 x the batch's bytes (float32), in MB."""
    shard = row["classes"] * row["width"] * 4 / row["ranks"]
    return (shard + BATCH_COPIES * row["batch_per_rank"] * row["width"] * 4) / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--classes", type=int, default=10**6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--huge-classes", type=int, default=10**7)
    parser.add_argument("--huge-ranks", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    rows = []
    for world_size in args.ranks:
        config = {"classes": args.classes, "width": args.width, "batch": args.batch, "repeats": args.repeats,
                  "placements": PLACEMENTS, "timed": True}
        rows.append(_run(world_size, config))
        print(f"{world_size} ranks done", flush=True)
    if args.huge_classes:
        config = {"classes": args.huge_classes, "width": args.width, "batch": args.batch, "repeats": args.repeats,
                  "placements": ("sharded",), "timed": True}
        rows.append(_run(args.huge_ranks, config))

    goals = []
    for row in rows:
        row["memory_goal_mb"] = memory_goal_mb(row)
        row["sharded_memory_goal_met"] = row["sharded_peak_mb_per_rank"] <= row["memory_goal_mb"]
        line = (f"R={row['ranks']}  K={row['classes']:>9d}  sharded {row['sharded_ms']:9.2f} ms  "
                f"peak {row['sharded_peak_mb_per_rank']:8.1f} MB (goal {row['memory_goal_mb']:.1f})")
        if "sparse_ms" in row:
            faster = min(row["sparse_ms"], row["dense_ms"])
            row["sharded_over_faster_data_parallel"] = row["sharded_ms"] / faster
            row["speed_goal_met"] = row["sharded_ms"] <= SLOWER_AT_MOST * faster
            line += (f" | sparse {row['sparse_ms']:9.2f} ms, peak {row['sparse_peak_mb_per_rank']:8.1f} MB"
                     f" | dense {row['dense_ms']:9.2f} ms, peak {row['dense_peak_mb_per_rank']:8.1f} MB"
                     f" | sharded/faster {row['sharded_over_faster_data_parallel']:.2f}"
                     f" | bitwise {row['sharded_equals_sparse_bitwise']}")
            goals.append(row["speed_goal_met"])
        goals.append(row["sharded_memory_goal_met"])
        print(line, flush=True)
    report = {
        "what": "one step of centerkern.distributed.center_loss (rule wen), sharded Shard(0) centers against "
                "replicated ones (sparse and dense exchange), R local gloo processes on 127.0.0.1; medians of "
                f"{args.repeats} interleaved steps on rank 0; peak memory: the largest rank's VmHWM over making the "
                "centers and three steps, less its VmRSS just before",
        "goals": {
            "memory": f"sharded peak per rank <= K*D*4/R + {BATCH_COPIES} x the batch's bytes, above the baseline",
            "speed": f"sharded step <= {SLOWER_AT_MOST} x the faster data-parallel exchange",
            "all_met": all(goals),
        },
        "command": "python benchmarks/distributed_sharded.py",
        "rows": rows,
        **provenance(),
    }
    out = args.out or Path(__file__).parent / "results" / f"distributed-sharded-{datetime.date.today()}.json"
    write_report(report, out)
    print("goals all met:", all(goals), "->", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
