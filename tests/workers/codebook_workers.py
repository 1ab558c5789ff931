"""What each rank of the codebook data-parallel tests runs (spawned processes import it by
name), and the data every rank and the single-process reference share."""

from __future__ import annotations

import numpy as np

CODEBOOK_SIZE, DIM, STEPS = 48, 5, 3
EXCHANGES = ("sparse", "dense", "auto")


def batches(step: int, world_size: int):
    """One batch per rank and step (uneven sizes, one of them possibly empty), with a mask."""
    rng = np.random.default_rng(100 + step)
    sizes = rng.integers(0, 30, world_size)
    rows = [rng.standard_normal((int(n), DIM)).astype(np.float32) for n in sizes]
    masks = [rng.random(int(n)) > 0.2 for n in sizes]
    return rows, masks


def start_state():
    import torch

    from centerkern.torch import EMACodebook

    torch.manual_seed(7)
    return EMACodebook(DIM, CODEBOOK_SIZE).state_dict()


def run_rank(rank: int, world_size: int) -> dict:
    """Every exchange and smoothing for STEPS steps: the state and counts this rank ends with."""
    import torch

    from centerkern.torch import EMACodebook

    results = {}
    for exchange in EXCHANGES:
        for smoothing in ("current_code", "laplace"):
            codebook = EMACodebook(DIM, CODEBOOK_SIZE, smoothing=smoothing, distributed=True, exchange=exchange)
            codebook.load_state_dict(start_state())
            codebook.train()
            counts = []
            for step in range(STEPS):
                rows, masks = batches(step, world_size)
                output = codebook(torch.from_numpy(rows[rank]), mask=torch.from_numpy(masks[rank]))
                counts.append(output.counts.numpy())
            results[exchange, smoothing] = ({name: value.numpy() for name, value in codebook.state_dict().items()},
                                            counts)
    return results
