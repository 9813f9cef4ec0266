"""Shared by the digits examples: scikit-learn's bundled digits (8x8 images, 10 classes, no
download), a fixed train/test split, and a small numpy MLP with its gradients."""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

HIDDEN = 64


def load(seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) as float32 / int64, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def shard(x: np.ndarray, y: np.ndarray, rank: int, world: int) -> Tuple[np.ndarray, np.ndarray]:
    """This worker's share of the training set."""
    return x[rank::world], y[rank::world]


def init_params(seed: int = 1) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((64, HIDDEN)) * np.sqrt(2.0 / 64)).astype(np.float32),
        "b1": np.zeros(HIDDEN, dtype=np.float32),
        "w2": (rng.standard_normal((HIDDEN, 10)) * np.sqrt(1.0 / HIDDEN)).astype(np.float32),
        "b2": np.zeros(10, dtype=np.float32),
    }


def forward(p: Dict[str, np.ndarray], x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    h = np.maximum(x @ p["w1"] + p["b1"], 0.0)
    logits = h @ p["w2"] + p["b2"]
    return h, logits


def loss_and_grads(p: Dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> Tuple[float, Dict[str, np.ndarray]]:
    """Mean cross-entropy over the batch and its gradients (float32)."""
    h, logits = forward(p, x)
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    prob = e / e.sum(axis=1, keepdims=True)
    n = len(x)
    loss = float(-np.log(prob[np.arange(n), y] + 1e-12).mean())
    d = prob
    d[np.arange(n), y] -= 1.0
    d /= n
    dh = (d @ p["w2"].T) * (h > 0)
    grads = {
        "w1": (x.T @ dh).astype(np.float32),
        "b1": dh.sum(axis=0).astype(np.float32),
        "w2": (h.T @ d).astype(np.float32),
        "b2": d.sum(axis=0).astype(np.float32),
    }
    return loss, grads


def accuracy(p: Dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float((forward(p, x)[1].argmax(axis=1) == y).mean())


def batches(x: np.ndarray, y: np.ndarray, batch: int, epoch: int, seed: int):
    order = np.random.default_rng(seed * 1000 + epoch).permutation(len(x))
    for i in range(0, len(x) - batch + 1, batch):
        j = order[i : i + batch]
        yield x[j], y[j]
