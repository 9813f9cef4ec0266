"""PyTorch's Gloo allreduce over 127.0.0.1, timed like `tandem bench allreduce`.

  python3 allreduce_gloo.py NPROC SIZE [SIZE ...]
Prints one CSV line per size: peer,ranks,size,time_us,busbw_gbs
"""
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, n, port, sizes):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    for size in sizes:
        t = torch.full((size // 4,), float(rank + 1), dtype=torch.float32)
        dist.all_reduce(t)
        assert t[0].item() == n * (n + 1) / 2
        iters = 10 if size >= 16 << 20 else 30 if size >= 1 << 20 else 200
        for _ in range(3):
            dist.all_reduce(t)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        per = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
        dist.all_reduce(per, op=dist.ReduceOp.MAX)
        if rank == 0:
            busbw = size / per.item() / 1e9 * 2 * (n - 1) / n
            print(f"gloo,{n},{size},{per.item() * 1e6:.1f},{busbw:.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    n = int(sys.argv[1])
    sizes = [int(s) for s in sys.argv[2:]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(n, port, sizes), nprocs=n)
