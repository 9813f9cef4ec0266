"""One rank of PyTorch's Gloo allreduce, for jobs whose ranks another tool starts (simulated hosts:
`tandem testbed`). Timed like `tandem bench allreduce`.

  python3 allreduce_gloo_rank.py RANK WORLD MASTER_ADDR:PORT IFNAME SIZE [SIZE ...]
Rank 0 prints one CSV line per size: peer,ranks,size,time_us,busbw_gbs. PEER_ITERS=N times N
iterations of every size (default: as `tandem bench`).
"""
import os
import sys
import time

import torch
import torch.distributed as dist


def time_sizes(rank, world, sizes):
    """Times `dist.all_reduce` of each size (after a correctness check and a warm-up) in a formed
    Gloo group; rank 0 prints the CSV lines. Also used by allreduce_gloo.py."""
    for size in sizes:
        t = torch.full((size // 4,), float(rank + 1), dtype=torch.float32)
        dist.all_reduce(t)
        assert t[0].item() == world * (world + 1) / 2
        iters = int(os.environ.get("PEER_ITERS", 0)) or (10 if size >= 16 << 20 else 30 if size >= 1 << 20 else 200)
        for _ in range(3):
            dist.all_reduce(t)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        per = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
        dist.all_reduce(per, op=dist.ReduceOp.MAX)
        if rank == 0:
            busbw = size / per.item() / 1e9 * 2 * (world - 1) / world
            print(f"gloo,{world},{size},{per.item() * 1e6:.1f},{busbw:.3f}", flush=True)


def main():
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    host, port = sys.argv[3].rsplit(":", 1)
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=port, GLOO_SOCKET_IFNAME=sys.argv[4])
    sizes = [int(s) for s in sys.argv[5:]]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    time_sizes(rank, world, sizes)
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
