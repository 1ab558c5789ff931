"""A function run on R local ``torch.distributed`` ranks (gloo over 127.0.0.1), each a spawned
process: what the multi-process tests and the distributed benchmarks share.

``run_on_local_ranks(function, R, *args)`` calls ``function(rank, R, *args)`` in every rank, once
its process group is up, and returns what each rank's call returned, by rank. A rank that raises
makes it raise, with that rank's traceback; a group that does not finish within ``time_limit``
seconds is killed and reported, never waited for forever.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable


def run_on_local_ranks(function: Callable[..., Any], world_size: int, *args: Any, time_limit: float = 240,
                       collective_timeout: float = 60) -> dict[int, Any]:
    """``{rank: function(rank, world_size, *args)}`` over ``world_size`` spawned gloo ranks.
    ``function`` must be importable by name (a module-level function); ``collective_timeout`` is
    how long one collective may wait before gloo gives up."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as rendezvous:
        # a file rendezvous: no port to pick and lose to another process before rank 0 binds it
        store = os.path.join(rendezvous, "store")
        ranks = [
            context.Process(target=_rank_main, args=(function, rank, world_size, store, collective_timeout, args, results))
            for rank in range(world_size)
        ]
        for process in ranks:
            process.start()
        collected = {}
        try:
            for _ in range(world_size):
                rank, crashed, payload = results.get(timeout=time_limit)
                if crashed:
                    raise RuntimeError(f"rank {rank} of {world_size} crashed:\n{payload}")
                collected[rank] = payload
        finally:
            for process in ranks:
                process.join(timeout=10)
                if process.is_alive():
                    process.kill()
    return collected


def _rank_main(function, rank, world_size, store, collective_timeout, args, results) -> None:
    # several ranks share this machine's cores: one thread each, or parallel regions stall
    os.environ["NUMBA_NUM_THREADS"] = "1"
    try:
        import sys

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if "numba" in sys.modules:  # imported with the function's module: the variable came too late
            sys.modules["numba"].set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout))
        payload, crashed = function(rank, world_size, *args), False
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it
        payload, crashed = traceback.format_exc(), True
    results.put((rank, crashed, payload))
    results.close()
    results.join_thread()  # the queue flushed, then out without the interpreter's teardown, where
    # torch's gloo process group can hang joining a worker thread that waits for the GIL
    os._exit(1 if crashed else 0)
