"""What each rank of the codebook data-parallel tests runs (spawned processes import it by
name), and the data every rank and the single-process reference share."""

from __future__ import annotations

import numpy as np

CODEBOOK_SIZE, DIM, STEPS = 48, 5, 3
EXCHANGES = ("sparse", "dense", "auto")
# (exchange, smoothing, which ranks pass a mask): every rank, none, or rank 0 alone
SCENARIOS = [(exchange, smoothing, "every") for exchange in EXCHANGES for smoothing in ("current_code", "laplace")]
SCENARIOS += [("sparse", "current_code", "none"), ("dense", "laplace", "none"),
              ("sparse", "laplace", "rank 0"), ("dense", "current_code", "rank 0")]


def masks_of(masks, world_size: int, who: str):
    """Each rank's mask under ``who`` (None where a rank passes none)."""
    return [mask if who == "every" or (who == "rank 0" and rank == 0) else None
            for rank, mask in enumerate(masks)]


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

    from centerkern import PeerInputError

    results = {}
    for exchange, smoothing, who in SCENARIOS:
        codebook = EMACodebook(DIM, CODEBOOK_SIZE, smoothing=smoothing, distributed=True, exchange=exchange)
        codebook.load_state_dict(start_state())
        codebook.train()
        counts = []
        for step in range(STEPS):
            rows, masks = batches(step, world_size)
            mask = masks_of(masks, world_size, who)[rank]
            output = codebook(torch.from_numpy(rows[rank]), mask=None if mask is None else torch.from_numpy(mask))
            counts.append(output.counts.numpy())
        results[exchange, smoothing, who] = ({name: value.numpy() for name, value in codebook.state_dict().items()},
                                             counts)
    # a mask that is not bool on the last rank: it raises its own error, every other rank PeerInputError
    for exchange in ("sparse", "dense"):
        codebook = EMACodebook(DIM, CODEBOOK_SIZE, distributed=True, exchange=exchange)
        codebook.load_state_dict(start_state())
        rows, masks = batches(0, world_size)
        mask = torch.from_numpy(masks[rank])
        try:
            codebook(torch.from_numpy(rows[rank]), mask=mask.float() if rank == world_size - 1 else mask)
            outcome = "no error"
        except (TypeError, PeerInputError) as error:
            outcome = f"{type(error).__name__}: {error}"
        results["bad mask", exchange] = (outcome, codebook.embed.numpy())
    return results
