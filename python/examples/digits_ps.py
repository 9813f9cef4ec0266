"""Parameter-server training of a digits classifier (sync with all workers, or async with a
staleness bound); the optimizer runs on the servers.

    python -m tandem.launch --ps 2 --workers 4 python/examples/digits_ps.py --mode sync
    python -m tandem.launch --ps 2 --workers 4 python/examples/digits_ps.py --mode async --staleness 2

(the servers run ``python -m tandem.ps``, which ``tandem.launch`` starts by itself).
"""

from __future__ import annotations

import argparse
import time

from tandem import ps
from digits_common import HIDDEN, accuracy, batches, load, loss_and_grads, shard


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["sync", "async"], default="sync")
    ap.add_argument("--staleness", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="default: 0.1 sync, 0.025 async")
    a = ap.parse_args()
    # Async applies every worker's gradient on its own: a quarter of the sync step keeps it stable.
    lr = a.lr if a.lr is not None else (0.1 if a.mode == "sync" else 0.025)
    params = [
        ps.param("w1", (64, HIDDEN), init="normal", std=(2.0 / 64) ** 0.5, seed=1),
        ps.param("b1", (HIDDEN,)),
        ps.param("w2", (HIDDEN, 10), init="normal", std=(1.0 / HIDDEN) ** 0.5, seed=2),
        ps.param("b2", (10,)),
    ]
    client = ps.Client(params, optimizer="momentum", lr=lr, momentum=0.9, mode=a.mode,
                       staleness=a.staleness if a.mode == "async" else None, min_partition_bytes=4096)
    x, y, xt, yt = load()
    xs, ys = shard(x, y, client.worker, client.workers)
    # Sync steps are global: every worker takes the same number of steps per epoch.
    per_epoch = (len(x) // client.workers) // a.batch
    version, p = client.pull()
    start, samples, loss = time.perf_counter(), 0, float("nan")
    step = version
    for epoch in range(a.epochs):
        for _, (bx, by) in zip(range(per_epoch), batches(xs, ys, a.batch, epoch, seed=client.worker)):
            loss, grads = loss_and_grads(p, bx, by)
            version, p = client.push_pull(step, grads)
            step = version if client.sync else step + 1
            samples += len(bx)
    elapsed = time.perf_counter() - start
    acc = accuracy(p, xt, yt)
    if client.worker == 0:
        label = "sync_ps" if client.sync else f"async_ps(staleness={a.staleness})"
        print(f"mode={label} workers={client.workers} loss={loss:.4f} accuracy={acc:.4f} "
              f"samples_per_sec={samples * client.workers / elapsed:.0f}", flush=True)
    client.done()


if __name__ == "__main__":
    main()
