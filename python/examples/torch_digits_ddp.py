"""A CNN on the digits trained with DistributedDataParallel on the "tandem" backend.

    torchrun --standalone --nproc_per_node 2 python/examples/torch_digits_ddp.py
    python -m tandem.launch --nproc 2 python/examples/torch_digits_ddp.py

Nothing in it is specific to Tandem but the backend's name (and ``import tandem.torch``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import tandem.torch  # noqa: F401  (registers the "tandem" backend)
from torch_digits_common import CNN, accuracy, arguments, tensors, train


def main() -> None:
    a = arguments(epochs=8, lr=0.05).parse_args()
    dist.init_process_group("tandem")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)  # different initial weights: DDP makes them rank 0's
    x, y, xt, yt = tensors()
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=a.batch, sampler=sampler)
    model = DDP(CNN())
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    samples, loss, elapsed = train(model, opt, loader, sampler, a.epochs)
    total = torch.tensor([samples])
    dist.all_reduce(total)
    acc = accuracy(model.module, xt, yt)
    if rank == 0:
        print(f"mode=ddp workers={world} loss={loss.item():.4f} accuracy={acc:.4f} "
              f"samples_per_sec={total.item() / elapsed:.0f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
