"""One rank of the DDP step benchmark: the same script and model on any torch.distributed backend.

    torchrun --standalone --nproc_per_node 4 benches/torch_ddp_step.py --backend tandem
    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python3 benches/torch_ddp_step.py --backend gloo

The model is an MLP 1024-2048-1024 (4.2M parameters, 16.8 MB of float32 gradients), batch 32 per
rank, SGD; ``--hook bf16`` registers torch's bf16 compression hook. Rank 0 prints one CSV line:
``ddp,BACKEND,HOOK,WORLD,step_ms_median,peak_rss_mb_max`` (the largest peak RSS of any rank).
``--bucket-mb`` sets DDP's bucket size (smaller buckets let the network overlap more of backward).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="tandem")
    ap.add_argument("--hook", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="DDP's bucket_cap_mb (25 is DDP's default)")
    a = ap.parse_args()
    if a.backend == "tandem":
        import tandem.torch  # noqa: F401
    dist.init_process_group(a.backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024))
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=a.bucket_mb)
    if a.hook != "none":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, {"bf16": default_hooks.bf16_compress_hook,
                                      "fp16": default_hooks.fp16_compress_hook}[a.hook])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    x, y = torch.randn(a.batch, 1024), torch.randn(a.batch, 1024)
    times = []
    for step in range(a.warmup + a.steps):
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    # The slowest rank's median is the job's step time.
    med = torch.tensor([statistics.median(times) * 1e3], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(f"ddp,{a.backend},{a.hook},{dist.get_world_size()},{med.item():.2f},{rss.item():.0f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
