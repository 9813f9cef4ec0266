"""PyTorch's NCCL allreduce on GPU buffers, one rank per GPU, timed like `tandem bench allreduce`
(host clock around a batch of calls, then a device synchronise).

  python3 allreduce_torch_nccl.py NPROC SIZE [SIZE ...]
Prints one CSV line per size: peer,ranks,size,time_us,busbw_gbs
"""
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, n, port, sizes):
    store = dist.TCPStore("127.0.0.1", port, n, rank == 0)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=n)
    for size in sizes:
        t = torch.full((size // 4,), float(rank + 1), dtype=torch.float32, device="cuda")
        dist.all_reduce(t)
        assert t[0].item() == n * (n + 1) / 2
        iters = 20 if size >= 16 << 20 else 100
        for _ in range(5):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        us = (time.perf_counter() - t0) / iters * 1e6
        if rank == 0:
            busbw = size / us / 1e3 * 2 * (n - 1) / n
            print(f"torch-nccl,{n},{size},{us:.1f},{busbw:.3f}", flush=True)
    dist.destroy_process_group()


def main():
    n = int(sys.argv[1])
    sizes = [int(s) for s in sys.argv[2:]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"# torch {torch.__version__}, nccl {torch.cuda.nccl.version()}", flush=True)
    mp.spawn(run, args=(n, port, sizes), nprocs=n)


if __name__ == "__main__":
    main()
