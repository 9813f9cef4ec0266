"""One rank of the all_reduce benchmark through torch.distributed (any backend) and, for the
"tandem" backend, through Tandem's own Python API in the same processes.

    torchrun --standalone --nproc_per_node 4 benches/torch_allreduce.py --backend tandem 4096 67108864

Rank 0 prints CSV lines ``PEER,WORLD,BYTES,time_us_median,busbw_gbs`` where PEER is
``torch-BACKEND`` or ``tandem-python``; busbw is NCCL's bus bandwidth (2 (n-1)/n x bytes / time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def timed(fn, iters: int, warmup: int, rounds: int = 5) -> float:
    """The median over ``rounds`` of the mean time of ``iters`` back-to-back calls (as
    nccl-tests times them: a barrier before each round, none inside)."""
    for _ in range(warmup):
        fn()
    means = []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        means.append((time.perf_counter() - t0) / iters)
    return statistics.median(means)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="tandem")
    ap.add_argument("sizes", nargs="+", type=int)
    a = ap.parse_args()
    if a.backend == "tandem":
        import tandem
        import tandem.torch  # noqa: F401
    dist.init_process_group(a.backend)
    n, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for size in a.sizes:
        t = torch.ones(size // 4)
        iters = 100 if size <= 1 << 16 else 3
        med = timed(lambda: dist.all_reduce(t), iters, 10 if iters > 10 else 2)
        rows.append((f"torch-{a.backend}", size, med))
        if a.backend == "tandem":
            g = tandem.init()
            arr = t.numpy()
            med = timed(lambda: g.allreduce(arr), iters, 10 if iters > 10 else 2)
            rows.append(("tandem-python", size, med))
    if rank == 0:
        for peer, size, med in rows:
            busbw = 2 * (n - 1) / n * size / med / 1e9
            print(f"{peer},{n},{size},{med * 1e6:.1f},{busbw:.3f}", flush=True)
    if a.backend == "tandem":
        tandem.shutdown()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
