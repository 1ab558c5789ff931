"""The cost of a distributed center-loss step by exchange, against ranks and touched classes.

Runs R local processes (gloo over 127.0.0.1) for each R in --ranks. Every rank's batch touches
U classes of K (each twice), and a step of ``centerkern.distributed.center_loss`` is timed with
``exchange="sparse"`` (all-gather of the touched rows) and ``exchange="dense"`` (all-reduce of
K x (D + 1)), interleaved, after a barrier; medians on rank 0. Both exchanges are checked to give
the same centers. The crossover, in R·U/K, is where dense becomes the faster; it sets
``centerkern.distributed.SPARSE_BELOW_FRACTION``.

    python benchmarks/distributed_exchange.py                 # R = 2, 3, 4; K = 20000, D = 128
    python benchmarks/distributed_exchange.py --ranks 2 --classes 1000 --width 16 --repeats 3 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from centerkern.testing.local_ranks import run_on_local_ranks
from centerkern._cli.reports import provenance, write_report


def _measure(rank, world_size, args):
    """One rank's timings (run_on_local_ranks: one thread a rank, gloo over 127.0.0.1)."""
    import torch
    import torch.distributed as dist

    import centerkern.distributed as center_distributed

    rng = np.random.default_rng(1000 + rank)
    start = np.random.default_rng(0).standard_normal((args.classes, args.width)).astype(np.float32)
    rows = []
    for touched in args.touched:
        if touched > args.classes:
            continue
        classes = rng.choice(args.classes, touched, replace=False)
        labels = torch.from_numpy(np.repeat(classes, 2))
        features = torch.from_numpy(rng.standard_normal((labels.numel(), args.width)).astype(np.float32))
        times = {"sparse": [], "dense": []}
        finals = {}
        for repeat in range(args.repeats + 1):  # the first round warms up (compiles, buffers)
            for exchange in times:
                centers = torch.from_numpy(start.copy())
                dist.barrier()
                began = time.perf_counter()
                center_distributed.center_loss(features, labels, centers, 0.5, rule="wen", out=centers, exchange=exchange)
                elapsed = time.perf_counter() - began
                if repeat:
                    times[exchange].append(elapsed)
                finals[exchange] = centers.numpy()
        agree = bool(np.allclose(finals["sparse"], finals["dense"], rtol=1e-5, atol=1e-6))
        rows.append({
            "ranks": world_size, "touched_per_rank": int(touched), "classes": args.classes, "width": args.width,
            "sparse_ms": 1e3 * statistics.median(times["sparse"]), "dense_ms": 1e3 * statistics.median(times["dense"]),
            "load": world_size * touched / args.classes, "agree": agree,
        })
    return rows


def _run(world_size, args):
    return run_on_local_ranks(_measure, world_size, args, time_limit=1800, collective_timeout=300)[0]


def crossover(rows):
    """Per rank count: the smallest R·U/K at which dense was faster (None if never)."""
    found = {}
    for world_size in sorted({row["ranks"] for row in rows}):
        loads = [row["load"] for row in rows if row["ranks"] == world_size and row["dense_ms"] < row["sparse_ms"]]
        found[world_size] = min(loads) if loads else None
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--classes", type=int, default=20000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--touched", type=int, nargs="+", default=[16, 128, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    rows = []
    for world_size in args.ranks:
        rows += _run(world_size, args)
        for row in rows[-len([u for u in args.touched if u <= args.classes]):]:
            print(f"R={row['ranks']}  U={row['touched_per_rank']:6d}  R*U/K={row['load']:6.3f}  "
                  f"sparse {row['sparse_ms']:8.3f} ms  dense {row['dense_ms']:8.3f} ms  agree={row['agree']}", flush=True)
    found = crossover(rows)
    print("crossover R*U/K (dense faster from):", found)
    report = {"what": "centerkern.distributed step (rule wen), gloo on 127.0.0.1, median ms on rank 0",
              **provenance(), "rows": rows, "crossover_load": found}
    write_report(report, args.out or Path(__file__).parent / "results" / f"distributed-{report['date'][:10]}.json")


if __name__ == "__main__":
    main()
