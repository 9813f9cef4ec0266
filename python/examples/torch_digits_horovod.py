"""A CNN on the digits trained with Horovod's PyTorch API, from Tandem (``import tandem.torch as
hvd`` where a Horovod script has ``import horovod.torch as hvd``).

    python -m tandem.launch --nproc 2 python/examples/torch_digits_horovod.py
    torchrun --standalone --nproc_per_node 2 python/examples/torch_digits_horovod.py
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import tandem.torch as hvd
from torch_digits_common import CNN, accuracy, tensors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    a = ap.parse_args()
    hvd.init()
    torch.manual_seed(hvd.rank())
    x, y, xt, yt = tensors()
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, num_replicas=hvd.size(), rank=hvd.rank(), seed=0)
    loader = DataLoader(data, batch_size=a.batch, sampler=sampler)
    model = CNN()
    opt = torch.optim.SGD(model.parameters(), lr=a.lr * hvd.size(), momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compression=hvd.Compression.fp16)
    start, samples = time.perf_counter(), 0
    loss = torch.tensor(float("nan"))
    for epoch in range(a.epochs):
        sampler.set_epoch(epoch)
        for bx, by in loader:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(bx), by)
            loss.backward()
            opt.step()
            samples += len(bx)
    elapsed = time.perf_counter() - start
    mean_loss = hvd.allreduce(loss.detach(), name="loss").item()
    total = hvd.allreduce(torch.tensor([samples]), op=hvd.Sum).item()
    acc = accuracy(model, xt, yt)
    if hvd.rank() == 0:
        print(f"mode=horovod workers={hvd.size()} loss={mean_loss:.4f} accuracy={acc:.4f} "
              f"samples_per_sec={total / elapsed:.0f}", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
