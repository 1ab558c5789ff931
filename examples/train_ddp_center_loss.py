"""Data-parallel softmax plus center loss: DistributedDataParallel and a distributed CenterLoss.

The digits example (train_torch_center_loss.py) on R local processes (gloo): each
rank trains on its shard of every batch, DDP averages the network's gradients, and
``CenterLoss(..., distributed=True)`` moves the centers as if one process had seen the whole
batch. At the end every rank's centers are compared with rank 0's, bit for bit.

With ``--placement sharded`` each rank holds only its block of the centers' rows (a ``Shard(0)``
DTensor, for more classes than one rank can hold): the same training, the centers saved with
``torch.distributed.checkpoint`` at the end and loaded back into fresh sharded centers.

    python examples/train_ddp_center_loss.py --ranks 2
    python examples/train_ddp_center_loss.py --ranks 2 --placement sharded
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile

import numba
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from centerkern.torch import CenterLoss
from train_torch_center_loss import spread


class EmbedAndClassify(nn.Module):
    """A 2-D embedding and a linear classifier on it; one forward, so that DDP sees both."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(64, 128), nn.PReLU(), nn.Linear(128, 64), nn.PReLU(), nn.Linear(64, 2))
        self.classify = nn.Linear(2, num_classes)

    def forward(self, images):
        embeddings = self.embed(images)
        return embeddings, self.classify(embeddings)


def _rank(rank: int, world_size: int, store: str, args) -> None:
    # the ranks share this machine's cores: one thread each, for torch and for the kernels. More
    # threads than cores makes every parallel region wait for a descheduled thread, while the
    # other rank waits for this one in the next collective.
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    # a rendezvous file: on one machine, simpler than agreeing on a free port
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    num_classes = 10

    model = DistributedDataParallel(EmbedAndClassify(num_classes))
    # kept out of the DDP-wrapped model: its centers are synchronised by the module itself
    center_loss = CenterLoss(num_classes, feat_dim=2, alpha=args.alpha, rule="wen", distributed=True,
                             placement=args.placement)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    cross_entropy = nn.CrossEntropyLoss()

    for epoch in range(args.epochs):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        for batch in order.split(128):  # the global batch, as in the single-process example
            shard = batch[rank::world_size]  # this rank's part of the global batch
            embeddings, logits = model(images[shard])
            loss = cross_entropy(logits, labels[shard]) + args.weight * center_loss(embeddings, labels[shard])
            optimizer.zero_grad()
            loss.backward()  # DDP averages the network's gradients; the centers moved already
            optimizer.step()
        if rank == 0:
            with torch.no_grad():
                embeddings, logits = model.module(images)
                accuracy = float((logits.argmax(1) == labels).float().mean())
            print(f"epoch {epoch + 1:3d}  accuracy {accuracy:6.1%}  spread {spread(embeddings, labels, num_classes):.4f}",
                  flush=True)

    if args.placement == "sharded":
        _save_and_load_back(center_loss, rank, world_size, num_classes, args)
    else:
        gathered = [torch.empty_like(center_loss.centers) for _ in range(world_size)]
        dist.all_gather(gathered, center_loss.centers)
        if rank == 0:
            identical = all(torch.equal(gathered[0], other) for other in gathered[1:])
            print(f"centers identical on {world_size} ranks: {identical}", flush=True)
    _leave(dist)


def _save_and_load_back(center_loss, rank: int, world_size: int, num_classes: int, args) -> None:
    """The sharded centers through torch.distributed.checkpoint: each rank writes its rows, and
    fresh sharded centers (of any number of ranks) read them back."""
    import torch.distributed.checkpoint as dcp

    rows = [None] * world_size
    dist.all_gather_object(rows, center_loss.centers.to_local().shape[0])
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder)  # rank 0's folder, for every rank
    dcp.save(center_loss.state_dict(), checkpoint_id=folder[0])
    fresh = CenterLoss(num_classes, feat_dim=2, alpha=args.alpha, rule="wen", distributed=True, placement="sharded")
    dcp.load(fresh.state_dict(), checkpoint_id=folder[0])
    dist.barrier()  # every rank has read it before it goes
    if rank == 0:
        shutil.rmtree(folder[0])
    same = bool(torch.equal(fresh.centers.full_tensor(), center_loss.centers.full_tensor()))
    if rank == 0:
        print(f"centers sharded over {world_size} ranks, rows per rank {rows}; saved and loaded back: {same}", flush=True)


def _leave(dist) -> None:
    """End this rank's process without the interpreter's teardown. torch's gloo process group,
    destroyed at exit, joins its worker threads while holding the GIL, and a worker still
    releasing a finished collective's tensors needs the GIL: the process then hangs for ever
    (seen here with DDP's reducer, intermittently). Everything is finished and flushed first."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--weight", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--placement", choices=["replicated", "sharded"], default="replicated")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as rendezvous:
        mp.spawn(_rank, args=(args.ranks, os.path.join(rendezvous, "store"), args), nprocs=args.ranks)


if __name__ == "__main__":
    main()
