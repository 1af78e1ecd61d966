"""TVLARS in a plain PyTorch loop: a small CNN on scikit-learn's bundled 8x8 digits (no download).

``tvlars-demo`` or ``python -m tvlars_scale.demo``: trains for a few seconds on the CPU and prints
the test accuracy. The full trainer (``tvlars-train``) does the same from a config file, at any scale.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

from tvlars_scale.optim import TVLARS, layerwise_param_groups


def digits_tensors(seed: int) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return images[train], labels[train], images[test], labels[test]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=4.0, help="TVLARS target learning rate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = digits_tensors(args.seed)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 10),
    )  # fmt: skip
    steps_per_epoch = len(y_train) // args.batch_size
    optimizer = TVLARS(
        layerwise_param_groups(model, weight_decay=5e-4),
        lr=args.lr,
        lmbda=1e-2,
        delay_steps=5 * steps_per_epoch,
    )
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train))
        for i in range(steps_per_epoch):
            batch = order[i * args.batch_size : (i + 1) * args.batch_size]
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(
        f"digits: test accuracy {accuracy:.3f} after {args.epochs} epochs, phi_t = {optimizer.last_phi:.3f}"
    )


if __name__ == "__main__":
    main()
