"""Data-parallel training of a digits classifier: every rank trains on its shard and gradients are
averaged with fused allreduces.

    python -m tandem.launch --nproc 4 python/examples/digits_allreduce.py --epochs 30
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import tandem
from digits_common import accuracy, batches, init_params, load, loss_and_grads, shard


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1)
    a = ap.parse_args()
    with tandem.init() as g:
        x, y, xt, yt = load()
        xs, ys = shard(x, y, g.rank, g.world_size)
        params = init_params(seed=g.rank + 1)  # deliberately different: the broadcast makes them equal
        names = sorted(params)
        tandem.broadcast_parameters([params[n] for n in names])
        opt = tandem.DistributedOptimizer(tandem.optim.SGD(lr=a.lr, momentum=0.9))
        start, samples, loss = time.perf_counter(), 0, float("nan")
        for epoch in range(a.epochs):
            for bx, by in batches(xs, ys, a.batch, epoch, seed=g.rank):
                loss, grads = loss_and_grads(params, bx, by)
                opt.step([params[n] for n in names], [grads[n] for n in names])
                samples += len(bx)
        elapsed = time.perf_counter() - start
        total = np.array([samples], dtype=np.int64)
        g.allreduce(total)
        acc = accuracy(params, xt, yt)
        if g.rank == 0:
            print(f"mode=allreduce workers={g.world_size} loss={loss:.4f} accuracy={acc:.4f} "
                  f"samples_per_sec={total[0] / elapsed:.0f}", flush=True)


if __name__ == "__main__":
    main()
