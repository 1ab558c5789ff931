"""Softmax plus center loss on handwritten digits, with centerkern.torch.CenterLoss.

The digits are scikit-learn's 8x8 images (1797 of them, shipped inside the package: nothing is
downloaded). A small network maps each image to a 2-D embedding, as in Fig. 1 of Wen et al.
(ECCV 2016), and a linear layer classifies it. Softmax alone separates the classes; the center
loss also pulls each class together, which is what the printed spread shows:

    spread = mean squared distance of an embedding to its class mean
             / mean squared distance between class means   (scale-free)

Runs on the CPU in a few seconds:  python examples/train_torch_center_loss.py
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

from centerkern.torch import CenterLoss


def spread(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    means = torch.stack([embeddings[labels == c].mean(0) for c in range(num_classes)])
    within = (embeddings - means[labels]).pow(2).sum(1).mean()
    between = torch.pdist(means).pow(2).mean()
    return float(within / between)


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--weight", type=float, default=0.1, help="weight of the center loss")
    parser.add_argument("--alpha", type=float, default=0.5, help="the wen rule's center step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    num_classes = 10

    embed = nn.Sequential(nn.Linear(64, 128), nn.PReLU(), nn.Linear(128, 64), nn.PReLU(), nn.Linear(64, 2))
    classify = nn.Linear(2, num_classes)
    center_loss = CenterLoss(num_classes, feat_dim=2, alpha=args.alpha, rule="wen")
    optimizer = torch.optim.Adam([*embed.parameters(), *classify.parameters()], lr=3e-3)
    cross_entropy = nn.CrossEntropyLoss()

    spreads = []
    for epoch in range(args.epochs):
        embed.train()
        center_loss.train()
        for batch in torch.randperm(len(labels)).split(128):
            embeddings = embed(images[batch])
            loss = cross_entropy(classify(embeddings), labels[batch]) + args.weight * center_loss(embeddings, labels[batch])
            optimizer.zero_grad()
            loss.backward()  # the centers already moved, in place, inside center_loss
            optimizer.step()

        embed.eval()
        center_loss.eval()
        with torch.no_grad():
            embeddings = embed(images)
            accuracy = float((classify(embeddings).argmax(1) == labels).float().mean())
            spreads.append(spread(embeddings, labels, num_classes))
            held = float(center_loss(embeddings, labels))  # eval: the loss only, centers left alone
        print(f"epoch {epoch + 1:3d}  accuracy {accuracy:6.1%}  center loss {held:9.4f}  spread {spreads[-1]:.4f}")
    return spreads


if __name__ == "__main__":
    main()
