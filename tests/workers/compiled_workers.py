"""A model holding ``CenterLoss``, trained eager and compiled (``torch.compile(fullgraph=True)``):
in one process (``tests/test_torch_operators.py``) and on each rank of a ``torch.distributed``
group with ``distributed=True`` (``run_compiled_rank``)."""

import torch

from centerkern.torch import CenterLoss

CLASSES, WIDTH = 6, 8


class Model(torch.nn.Module):
    """A linear embedding and the center loss of its output; the same starting weights for
    every instance (and centers, for rule pytorch)."""

    def __init__(self, rule, **options):
        super().__init__()
        self.embed = torch.nn.Linear(4, WIDTH)
        with torch.no_grad():
            self.embed.weight.copy_(torch.linspace(-1, 1, 4 * WIDTH).reshape(WIDTH, 4))
            self.embed.bias.zero_()
        self.center_loss = CenterLoss(CLASSES, WIDTH, alpha=0.6, rule=rule, **options)
        if rule == "pytorch":
            with torch.no_grad():
                start = torch.linspace(-2, 2, CLASSES * WIDTH).reshape(CLASSES, WIDTH)
                self.center_loss.centers.copy_(start if options.get("placement") != "sharded" else
                                               torch.distributed.tensor.distribute_tensor(
                                                   start, self.center_loss.centers.device_mesh,
                                                   self.center_loss.centers.placements))

    def forward(self, inputs, labels):
        return self.center_loss(self.embed(inputs), labels)


def train(rule, run, batch_sizes, seed=11, device="cpu", **options):
    """Steps of an SGD loop over ``run(model)`` (the model itself, or compiled) on ``device``: per
    step the loss, every parameter's gradient and the centers after it."""
    model = Model(rule, **options).to(device)
    step = run(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for batch in batch_sizes:
        inputs = torch.randn(batch, 4, generator=generator).to(device)
        labels = torch.randint(0, CLASSES, (batch,), generator=generator).to(device)
        optimizer.zero_grad()
        loss = step(inputs, labels)
        loss.backward()
        centers = model.center_loss.centers.detach()
        if hasattr(centers, "full_tensor"):  # sharded: the whole table
            centers = centers.full_tensor()
        history.append({"loss": loss.detach().clone(), "centers": centers.clone(),
                        **{name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None
                           and not hasattr(p.grad, "full_tensor")}})
        optimizer.step()
    return history


def compiled(**options):
    """``run`` for ``train``: the model compiled whole, Dynamo's caches emptied first."""

    def compile_model(model):
        torch._dynamo.reset()
        return torch.compile(model, fullgraph=True, **options)

    return compile_model


def run_compiled_rank(rank: int, world_size: int) -> dict:
    """Per rule, the eager and the compiled training of this rank (its own batches) with
    ``distributed=True``; and sharded centers under ``fullgraph=True`` (refused) and without."""
    def as_arrays(history):  # tensors would travel through shared memory that dies with the rank
        return [{name: value.numpy() for name, value in entry.items()} for entry in history]

    out = {}
    for rule in ("facenet", "wen", "pytorch"):
        out[rule] = tuple(as_arrays(train(rule, run, [12] * 3, seed=20 + rank, distributed=True))
                          for run in (lambda model: model, compiled()))
    sharded = {"distributed": True, "placement": "sharded"}
    try:
        train("wen", compiled(), [12], seed=30 + rank, **sharded)
    except Exception as refusal:  # noqa: BLE001 - its words are the result
        out["sharded refusal"] = str(refusal)
    else:
        out["sharded refusal"] = "not refused"

    def without_fullgraph(model):
        torch._dynamo.reset()
        return torch.compile(model)

    out["sharded eager"], out["sharded compiled without fullgraph"] = (
        [(entry["loss"].item(), entry["centers"].tolist()) for entry in train("wen", run, [12] * 2, seed=40 + rank,
                                                                              **sharded)]
        for run in (lambda model: model, without_fullgraph))
    return out
