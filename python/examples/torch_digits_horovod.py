"""A CNN on the digits trained with Horovod's PyTorch API, from Tandem (``import tandem.torch as
hvd`` where a Horovod script has ``import horovod.torch as hvd``).

    python -m tandem.launch --nproc 2 python/examples/torch_digits_horovod.py
    torchrun --standalone --nproc_per_node 2 python/examples/torch_digits_horovod.py
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import tandem.torch as hvd
from torch_digits_common import CNN, accuracy, arguments, tensors, train


def main() -> None:
    a = arguments(epochs=8, lr=0.05).parse_args()
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
    samples, loss, elapsed = train(model, opt, loader, sampler, a.epochs)
    mean_loss = hvd.allreduce(loss.detach(), name="loss").item()
    total = hvd.allreduce(torch.tensor([samples]), op=hvd.Sum).item()
    acc = accuracy(model, xt, yt)
    if hvd.rank() == 0:
        print(f"mode=horovod workers={hvd.size()} loss={mean_loss:.4f} accuracy={acc:.4f} "
              f"samples_per_sec={total / elapsed:.0f}", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
