"""A CNN on the digits trained through parameter servers: each worker pulls the weights into its
torch model, computes gradients with autograd, and pushes them; the servers run the optimizer.

    python -m tandem.launch --ps 2 --workers 2 python/examples/torch_digits_ps.py
"""

from __future__ import annotations

import time

import torch

from tandem import ps
from torch_digits_common import CNN, accuracy, arguments, tensors


def main() -> None:
    ap = arguments(epochs=10, lr=0.1)
    a = ap.parse_args()
    model = CNN()
    weights = dict(model.named_parameters())
    # The servers hold the initial weights (He-initialised, seeded; biases zero), in float32.
    params = [
        ps.param(n, tuple(p.shape), init="normal", std=(2.0 / (p[0].numel())) ** 0.5, seed=i) if p.dim() > 1
        else ps.param(n, tuple(p.shape))
        for i, (n, p) in enumerate(weights.items())
    ]
    x, y, xt, yt = tensors()
    with ps.Client(params, optimizer="sgd", lr=a.lr, momentum=0.9, mode="sync") as c:
        xs, ys = x[c.worker::c.workers], y[c.worker::c.workers]
        version = c.pull_into(weights)
        start, samples = time.perf_counter(), 0
        loss = torch.tensor(float("nan"))
        steps = a.epochs * (len(xs) // a.batch)
        for step in range(steps):
            lo = (step * a.batch) % (len(xs) - a.batch + 1)
            model.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs[lo:lo + a.batch]), ys[lo:lo + a.batch])
            loss.backward()
            version = c.push_pull_into(version, {n: p.grad for n, p in weights.items()}, weights)
            samples += a.batch
        elapsed = time.perf_counter() - start
        acc = accuracy(model, xt, yt)
        if c.worker == 0:
            print(f"mode=ps-torch workers={c.workers} loss={loss.item():.4f} accuracy={acc:.4f} "
                  f"samples_per_sec={samples * c.workers / elapsed:.0f}", flush=True)


if __name__ == "__main__":
    main()
