"""torch's distributed wrappers on the "tandem" backend: ZeroRedundancyOptimizer and FSDP's
fully_shard against one process training on the whole batch, and DDP's PowerSGD hook (ranks agree
exactly, the loss falls). Run under torchrun by test_torch.py; prints "WRAPPERS OK <rank>"."""

import copy
import sys

import torch
import torch.distributed as dist

import tandem.torch  # noqa: F401

dist.init_process_group("tandem")
r, w = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same initial weights everywhere (and in the reference)
base = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
g = torch.Generator().manual_seed(1)
X, Y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randn(32, 4, generator=g, dtype=torch.float64)
per = 32 // w
x, y = X[r * per:(r + 1) * per], Y[r * per:(r + 1) * per]
STEPS = 4


def reference(make_opt):
    m = copy.deepcopy(base)
    opt = make_opt(m.parameters())
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(X), Y).backward()
        opt.step()
    return m


def close(what, got, want, tol):
    for (k, a), b in zip(got.state_dict().items(), want.state_dict().values()):
        d = (a.detach().double() - b.double()).abs().max().item()
        if d > tol:
            sys.exit(f"rank {r}: {what}: {k} differs by {d}")


# ZeroRedundancyOptimizer under DDP.
from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: E402

m = copy.deepcopy(base)
ddp = torch.nn.parallel.DistributedDataParallel(m)
opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.Adam, lr=0.01)
for _ in range(STEPS):
    opt.zero_grad()
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    opt.step()
close("ZeroRedundancyOptimizer", m, reference(lambda p: torch.optim.Adam(p, lr=0.01)), 1e-9)
opt.consolidate_state_dict(to=0)  # gathers every shard's state on rank 0 (broadcasts of objects)
if r == 0 and len(opt.state_dict()["state"]) != len(list(m.parameters())):
    sys.exit("rank 0: consolidated ZeRO state misses parameters")

# FSDP2's fully_shard: all_gather_into_tensor forward, reduce_scatter_tensor backward.
from torch.distributed.fsdp import fully_shard  # noqa: E402

m = copy.deepcopy(base)
for layer in m:
    if isinstance(layer, torch.nn.Linear):
        fully_shard(layer)
fully_shard(m)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
for _ in range(STEPS):
    opt.zero_grad()
    torch.nn.functional.mse_loss(m(x), y).backward()
    opt.step()
full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in m.state_dict().items()}
ref = reference(lambda p: torch.optim.SGD(p, lr=0.1))
for (k, a), b in zip(full.items(), ref.state_dict().values()):
    d = (a.detach().double() - b.double()).abs().max().item()
    if d > 1e-9:
        sys.exit(f"rank {r}: fully_shard: {k} differs by {d}")

# DDP with the PowerSGD hook (rank 1 compression with error feedback).
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook  # noqa: E402

m = copy.deepcopy(base)
ddp = torch.nn.parallel.DistributedDataParallel(m)
state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2,
                                    min_compression_rate=0.5)
ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
losses = []
for _ in range(12):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(ddp(X), Y)  # every rank the whole batch: the loss is global
    loss.backward()
    opt.step()
    losses.append(loss.item())
flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
everyone = [torch.empty_like(flat) for _ in range(w)]
dist.all_gather(everyone, flat)
if any(not torch.equal(everyone[0], e) for e in everyone):
    sys.exit(f"rank {r}: PowerSGD left the ranks with different weights")
if not losses[-1] < losses[0]:
    sys.exit(f"rank {r}: PowerSGD: the loss did not fall ({losses[0]} -> {losses[-1]})")

dist.barrier()
print(f"WRAPPERS OK {r}", flush=True)
dist.destroy_process_group()
