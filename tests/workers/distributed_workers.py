"""What each rank of the torch.distributed tests runs (a module of its own: spawned processes
import it by name), and the data every rank and the single-process reference share."""

from __future__ import annotations

import numpy as np

NUM_CLASSES, WIDTH = 40, 6


def global_batches(seed: int, world_size: int, hot: bool):
    """One batch per rank (uneven sizes, one of them possibly empty) and the starting centers."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 25, world_size)
    features = [rng.standard_normal((int(n), WIDTH)).astype(np.float32) for n in sizes]
    labels = [rng.integers(0, NUM_CLASSES, int(n)) for n in sizes]
    if hot:  # most of every rank's batch in class 3
        for part in labels:
            part[: len(part) * 3 // 4] = 3
    centers = rng.standard_normal((NUM_CLASSES, WIDTH)).astype(np.float32)
    return features, labels, centers


SCENARIOS = [
    # (rule, exchange, hot, steps)
    ("facenet", "sparse", False, 3),
    ("facenet", "dense", True, 3),
    ("wen", "sparse", True, 3),
    ("wen", "dense", False, 3),
    ("wen", "auto", True, 2),
]


def run_rank(rank: int, world_size: int) -> dict:
    """What one rank returns (run by ``centerkern.testing.local_ranks.run_on_local_ranks``)."""
    import torch

    return _scenarios(rank, world_size, torch)


def _scenarios(rank, world_size, torch):
    import centerkern.distributed as center_distributed
    from centerkern.torch import CenterLoss

    out = {}
    for number, (rule, exchange, hot, steps) in enumerate(SCENARIOS):
        centers = None
        losses = []
        for step in range(steps):
            features, labels, start = global_batches(100 * number + step, world_size, hot)
            if centers is None:
                centers = torch.from_numpy(start)
            result = center_distributed.center_loss(
                torch.from_numpy(features[rank]), torch.from_numpy(labels[rank]), centers, 0.6,
                rule=rule, out=centers, exchange=exchange,
            )
            assert result.centers is centers
            losses.append((result.loss, result.grad.numpy().copy()))
        out[number] = (centers.numpy().copy(), losses)

    # out=None leaves the caller's centers and returns new ones
    features, labels, start = global_batches(7, world_size, False)
    kept = torch.from_numpy(start.copy())
    fresh = center_distributed.center_loss(torch.from_numpy(features[rank]), torch.from_numpy(labels[rank]), kept, 0.6, rule="wen")
    out["out=None"] = (kept.numpy().copy(), fresh.centers.numpy().copy())

    # the torch module with a process group: a few training steps of the wen rule
    module = CenterLoss(NUM_CLASSES, WIDTH, alpha=0.6, rule="wen", distributed=True)
    for step in range(3):
        features, labels, _ = global_batches(200 + step, world_size, True)
        tracked = torch.from_numpy(features[rank]).requires_grad_()
        module(tracked, torch.from_numpy(labels[rank])).backward()
    out["module"] = (module.centers.numpy().copy(), tracked.grad.numpy().copy())

    # a bad label on rank 1 only: rank 1 raises IndexError, every other rank PeerInputError,
    # nobody hangs and nobody moves its centers
    features, labels, start = global_batches(9, world_size, False)
    features[1], labels[1] = np.ones((2, WIDTH), np.float32), np.array([0, NUM_CLASSES])
    centers = torch.from_numpy(start.copy())
    try:
        center_distributed.center_loss(torch.from_numpy(features[rank]), torch.from_numpy(labels[rank]), centers, 0.6, out=centers)
        out["bad label"] = ("no error", None)
    except Exception as error:  # noqa: BLE001 - the parent checks which
        out["bad label"] = (type(error).__name__ + ": " + str(error), bool(np.array_equal(centers.numpy(), start)))

    # rank 1 asks for another alpha (or an alpha beyond float range): the replicas would drift
    # apart, so every rank refuses
    features, labels, start = global_batches(10, world_size, False)
    for name, alpha in (("other alpha", 0.7), ("huge alpha", 10**400)):
        centers = torch.from_numpy(start.copy())
        try:
            center_distributed.center_loss(
                torch.from_numpy(features[rank]), torch.from_numpy(labels[rank]), centers,
                alpha if rank == 1 else 0.6, rule="wen", out=centers,
            )
            out[name] = ("no error", None)
        except Exception as error:  # noqa: BLE001 - the parent checks which
            out[name] = (type(error).__name__ + ": " + str(error), bool(np.array_equal(centers.numpy(), start)))
    return out
