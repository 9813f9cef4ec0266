"""PyTorch's Gloo allreduce over 127.0.0.1, timed like `tandem bench allreduce`.

  python3 allreduce_gloo.py NPROC SIZE [SIZE ...]
Prints one CSV line per size: peer,ranks,size,time_us,busbw_gbs
"""
import os
import socket
import sys

import torch.distributed as dist
import torch.multiprocessing as mp

from allreduce_gloo_rank import time_sizes


def run(rank, n, port, sizes):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    time_sizes(rank, n, sizes)
    dist.destroy_process_group()

if __name__ == "__main__":
    n = int(sys.argv[1])
    sizes = [int(s) for s in sys.argv[2:]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(n, port, sizes), nprocs=n)
