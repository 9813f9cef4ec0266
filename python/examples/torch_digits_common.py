"""Shared by the torch examples: scikit-learn's bundled digits as tensors and a small CNN."""

from __future__ import annotations

import argparse
import time
from typing import Tuple

import torch

from digits_common import load


def tensors() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 1x8x8 images in [0, 1] and class indices."""
    x, y, xt, yt = load()
    as_images = lambda a: torch.from_numpy(a).reshape(-1, 1, 8, 8)  # noqa: E731
    return as_images(x), torch.from_numpy(y), as_images(xt), torch.from_numpy(yt)


class CNN(torch.nn.Module):
    """Two 3x3 convolutions, a pooling and a linear layer: about 10k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def arguments(epochs: int, lr: float) -> argparse.ArgumentParser:
    """The flags every torch example takes (--epochs, --batch, --lr), with its defaults."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=lr)
    return ap


def train(model, opt, loader, sampler, epochs: int) -> Tuple[int, torch.Tensor, float]:
    """Cross-entropy steps over `loader` for `epochs` (reshuffled by `sampler` each epoch):
    returns the samples seen, the last batch's loss and the seconds taken."""
    start, samples, loss = time.perf_counter(), 0, torch.tensor(float("nan"))
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for bx, by in loader:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(bx), by)
            loss.backward()
            opt.step()
            samples += len(bx)
    return samples, loss, time.perf_counter() - start
