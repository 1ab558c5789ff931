"""What each rank of the sharded-centers tests runs (a module of its own: spawned processes import
it by name), and the global batches every rank and the single-process reference share.

A global batch is cut into the ranks' batches with ``np.array_split``, so that one batch can be
trained by 4, 2 or 3 ranks alike: the checkpoint tests save with one world size and go on with
another."""

from __future__ import annotations

import numpy as np

NUM_CLASSES, WIDTH = 11, 5  # 11 rows over 2, 3 or 4 ranks: never an even split
ALPHA = 0.6
STEPS_BEFORE_SAVE, STEPS_AFTER_SAVE = 2, 2


def global_batch(seed: int, size: int = 24, classes: int = NUM_CLASSES):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((size, WIDTH)).astype(np.float32)
    labels = rng.integers(0, classes, size)
    labels[: size // 3] = 2  # a hot class: many duplicates, from every rank
    return features, labels


def starting_centers(seed: int = 99):
    return np.random.default_rng(seed).standard_normal((NUM_CLASSES, WIDTH)).astype(np.float32)


def split(batch, world_size: int, rank: int, empty_rank: int | None = None):
    """This rank's part of a global batch; ``empty_rank`` gets nothing (its rows go to the others)."""
    features, labels = batch
    ranks = [r for r in range(world_size) if r != empty_rank]
    if rank not in ranks:
        return features[:0], labels[:0]
    part = ranks.index(rank)
    return np.array_split(features, len(ranks))[part], np.array_split(labels, len(ranks))[part]


def step_batches(world_size: int):
    """(seed, empty rank, classes) of each step of the step scenarios: an ordinary step, a step
    where the last rank has no batch, a step whose classes are all rank 0's (the other owners
    receive nothing)."""
    rows_of_rank_0 = -(-NUM_CLASSES // world_size)
    return [(1, None, NUM_CLASSES), (2, world_size - 1, NUM_CLASSES), (3, None, rows_of_rank_0)]


def run_rank(rank: int, world_size: int, checkpoint: str) -> dict:
    """What one rank returns (run by ``centerkern.testing.local_ranks.run_on_local_ranks``)."""
    import torch

    payload = _steps(rank, world_size, torch)
    payload.update(_errors(rank, world_size, torch))
    payload.update(_module_and_checkpoint(rank, world_size, torch, checkpoint))
    return payload


def _steps(rank, world_size, torch):
    """Each rule for three steps, sharded and data-parallel (sparse exchange) side by side."""
    import torch.distributed as dist

    import centerkern.distributed as center_distributed

    out = {}
    for rule in ("facenet", "wen", "pytorch"):
        replicated = torch.from_numpy(starting_centers())
        sharded = center_distributed.shard_centers(torch.from_numpy(starting_centers()))
        record = []
        for seed, empty_rank, classes in step_batches(world_size):
            features, labels = split(global_batch(seed, classes=classes), world_size, rank, empty_rank)
            features, labels = torch.from_numpy(features), torch.from_numpy(labels)
            data_parallel = center_distributed.center_loss(
                features, labels, replicated, ALPHA, rule=rule, out=replicated, exchange="sparse")
            result = center_distributed.center_loss(features, labels, sharded, ALPHA, rule=rule, out=sharded)
            entry = {
                "loss": result.loss, "grad": result.grad.numpy().copy(),
                "data_parallel_loss": data_parallel.loss, "data_parallel_grad": data_parallel.grad.numpy().copy(),
                "local_rows": sharded.to_local().shape[0],
                "placements": [repr(p) for p in sharded.placements],
            }
            if rule == "pytorch":
                # what DDP makes of the data-parallel step's local grad_centers: their average
                averaged = data_parallel.grad_centers.clone()
                dist.all_reduce(averaged)
                entry["grad_centers"] = result.grad_centers.full_tensor().numpy()
                entry["grad_centers_placements"] = [repr(p) for p in result.grad_centers.placements]
                entry["ddp_average"] = (averaged / world_size).numpy()
            entry["centers"] = sharded.full_tensor().numpy()
            entry["data_parallel_centers"] = replicated.numpy().copy()
            record.append(entry)
        out[rule] = record

    # Replicate() centers take the data-parallel step, over the mesh's group
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    replicated = distribute_tensor(torch.from_numpy(starting_centers()), mesh, [Replicate()])
    plain = torch.from_numpy(starting_centers())
    features, labels = split(global_batch(8), world_size, rank)
    features, labels = torch.from_numpy(features), torch.from_numpy(labels)
    as_dtensor = center_distributed.center_loss(features, labels, replicated, ALPHA, rule="wen", out=replicated)
    center_distributed.center_loss(features, labels, plain, ALPHA, rule="wen", out=plain)
    out["replicated"] = (as_dtensor.centers is replicated, [repr(p) for p in replicated.placements],
                         bool(torch.equal(replicated.to_local(), plain)))
    # the module takes a mesh where it takes a process group
    from centerkern.torch import CenterLoss

    by_mesh = CenterLoss(NUM_CLASSES, WIDTH, alpha=ALPHA, rule="wen", group=mesh)
    by_mesh(features, labels)
    zeros = torch.zeros(NUM_CLASSES, WIDTH)
    center_distributed.center_loss(features, labels, zeros, ALPHA, rule="wen", out=zeros)
    out["module over a mesh"] = bool(torch.equal(by_mesh.centers, zeros))

    # rule pytorch on Replicate() centers: each rank's grad_centers, placed Partial("avg")
    trainable = distribute_tensor(torch.from_numpy(starting_centers()), mesh, [Replicate()])
    result = center_distributed.center_loss(features, labels, trainable, ALPHA, rule="pytorch")
    local = center_distributed.center_loss(features, labels, torch.from_numpy(starting_centers()), ALPHA, rule="pytorch")
    averaged = local.grad_centers.clone()
    torch.distributed.all_reduce(averaged)
    out["replicated pytorch"] = ([repr(p) for p in result.grad_centers.placements],
                                 bool(torch.allclose(result.grad_centers.full_tensor(), averaged / world_size)))

    # 5 classes: with 4 ranks the last holds no row at all
    few = np.random.default_rng(5).standard_normal((5, WIDTH)).astype(np.float32)
    sharded_few = center_distributed.shard_centers(torch.from_numpy(few))
    plain_few = torch.from_numpy(few.copy())
    features_few = torch.from_numpy(np.random.default_rng(rank).standard_normal((6, WIDTH)).astype(np.float32))
    labels_few = torch.from_numpy(np.array([0, 4, 4, 2, 1, 4]))
    center_distributed.center_loss(features_few, labels_few, sharded_few, ALPHA, rule="wen", out=sharded_few)
    center_distributed.center_loss(features_few, labels_few, plain_few, ALPHA, rule="wen", out=plain_few, exchange="sparse")
    from torch.distributed.tensor import Shard

    out["few classes"] = (
        tuple(sharded_few.to_local().shape), tuple(distribute_tensor(torch.from_numpy(few), mesh, [Shard(0)]).to_local().shape),
        bool(torch.equal(sharded_few.full_tensor(), plain_few)),
    )

    # normal centers: the same values whatever the number of ranks, given rank 0's seed
    torch.manual_seed(5 + rank)  # only rank 0's generator counts
    normal = center_distributed.shard_centers((2500, 2), init="normal")  # rows of 3 draws, split across ranks
    out["normal"] = normal.full_tensor().numpy()

    # a mesh whose order is not its group's: refused on every rank
    from torch.distributed.device_mesh import DeviceMesh

    try:
        center_distributed.shard_centers((NUM_CLASSES, WIDTH), DeviceMesh("cpu", list(range(world_size))[::-1]))
        out["reordered mesh"] = "no error"
    except Exception as error:  # noqa: BLE001 - the parent checks which
        out["reordered mesh"] = type(error).__name__ + ": " + str(error)

    # out=None: the caller's shards stay, new sharded centers come back
    kept = center_distributed.shard_centers(torch.from_numpy(starting_centers()))
    features, labels = split(global_batch(7), world_size, rank)
    fresh = center_distributed.center_loss(torch.from_numpy(features), torch.from_numpy(labels), kept, ALPHA, rule="wen")
    out["out=None"] = (kept.full_tensor().numpy(), fresh.centers.full_tensor().numpy())
    # zero centers made shard by shard, and the sharded gather
    zeros = center_distributed.shard_centers((NUM_CLASSES, WIDTH), dtype=torch.float64)
    asked = np.arange(NUM_CLASSES)[::-1] if rank == 0 else np.array([1, 1, NUM_CLASSES - 1])
    out["zeros"] = (zeros.to_local().shape, zeros.dtype == torch.float64, float(zeros.full_tensor().abs().sum()))
    out["gather"] = (asked, center_distributed.gather_centers(kept, asked).numpy())  # NumPy labels, a negative stride
    return out


def _errors(rank, world_size, torch):
    import centerkern.distributed as center_distributed

    out = {}
    features, labels = split(global_batch(9), world_size, rank)
    if rank == 1:
        labels = labels.copy()
        labels[1] = NUM_CLASSES
    centers = center_distributed.shard_centers(torch.from_numpy(starting_centers()))
    try:
        center_distributed.center_loss(torch.from_numpy(features), torch.from_numpy(labels), centers, ALPHA, out=centers)
        out["bad label"] = ("no error", None)
    except Exception as error:  # noqa: BLE001 - the parent checks which
        out["bad label"] = (type(error).__name__ + ": " + str(error),
                            bool(np.array_equal(centers.full_tensor().numpy(), starting_centers())))
    # rank 1 asks for another alpha: every rank refuses, nothing moves
    features_ok, labels_ok = split(global_batch(9), world_size, rank)
    try:
        center_distributed.center_loss(torch.from_numpy(features_ok), torch.from_numpy(labels_ok), centers,
                                       0.7 if rank == 1 else ALPHA, out=centers)
        out["other alpha"] = ("no error", None)
    except Exception as error:  # noqa: BLE001 - the parent checks which
        out["other alpha"] = (type(error).__name__ + ": " + str(error),
                              bool(np.array_equal(centers.full_tensor().numpy(), starting_centers())))
    try:
        center_distributed.gather_centers(centers, torch.from_numpy(labels))
        out["bad label in a gather"] = "no error"
    except Exception as error:  # noqa: BLE001 - the parent checks which
        out["bad label in a gather"] = type(error).__name__ + ": " + str(error)
    return out


def _module_and_checkpoint(rank, world_size, torch, checkpoint):
    """The sharded module of rule wen: 4 ranks train, save, and go on; 2 or 3 ranks load what 4
    saved and go on with the same global batches. Rule pytorch: one backward, the centers'
    gradient as a Shard(0) DTensor."""
    import torch.distributed.checkpoint as dcp

    from centerkern.torch import CenterLoss

    out = {}
    module = CenterLoss(NUM_CLASSES, WIDTH, alpha=ALPHA, rule="wen", distributed=True, placement="sharded")
    steps = range(STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE)
    if world_size == 4:
        for step in steps:
            if step == STEPS_BEFORE_SAVE:
                dcp.save(module.state_dict(), checkpoint_id=checkpoint)
            features, labels = split(global_batch(100 + step), world_size, rank)
            module(torch.from_numpy(features).requires_grad_(), torch.from_numpy(labels)).backward()
        # the same world loads it back and goes on: the unbroken run's bits
        again = CenterLoss(NUM_CLASSES, WIDTH, alpha=ALPHA, rule="wen", distributed=True, placement="sharded")
        dcp.load(again.state_dict(), checkpoint_id=checkpoint)
        for step in steps[STEPS_BEFORE_SAVE:]:
            features, labels = split(global_batch(100 + step), world_size, rank)
            again(torch.from_numpy(features), torch.from_numpy(labels))
        out["reloaded"] = again.centers.full_tensor().numpy()
    else:
        state = module.state_dict()
        dcp.load(state, checkpoint_id=checkpoint)  # in place, into this world's shards
        out["loaded"] = module.centers.full_tensor().numpy()
        for step in steps[STEPS_BEFORE_SAVE:]:
            features, labels = split(global_batch(100 + step), world_size, rank)
            module(torch.from_numpy(features).requires_grad_(), torch.from_numpy(labels)).backward()
    out["module"] = module.centers.full_tensor().numpy()
    module.eval()
    features, labels = split(global_batch(150), world_size, rank)
    out["eval loss"] = float(module(torch.from_numpy(features), torch.from_numpy(labels)))

    trainable = CenterLoss(NUM_CLASSES, WIDTH, rule="pytorch", distributed=True, placement="sharded")
    features, labels = split(global_batch(160), world_size, rank)
    trainable(torch.from_numpy(features), torch.from_numpy(labels)).backward()
    out["pytorch module"] = (trainable.centers.full_tensor().detach().numpy(),
                             trainable.centers.grad.full_tensor().numpy(),
                             [repr(p) for p in trainable.centers.grad.placements])
    # a torch optimizer steps the shards: no K x D all-reduce, no replica
    torch.optim.SGD(trainable.parameters(), lr=0.5).step()
    out["pytorch module after SGD"] = trainable.centers.full_tensor().detach().numpy()
    return out
